"""The base weights an int4 export really serves, read back from its ``MatMulNBits`` initializers.

The onnxruntime-genai model builder turns each projection ``y = x W^T`` (W: [out, in]) into a
``MatMulNBits`` node (attributes K = in, N = out, bits = 4, block_size) whose packed weight
``<name>.MatMul.weight_Q4`` is [N, n_blocks, block_size / 2] uint8 (two 4-bit values per byte,
the first in the low nibble), ``weight_scales`` [N, n_blocks] (or flat), and an optional
``weight_zp`` (absent for the builder's default symmetric quantization: zero point 8). The value
it computes with is ``(q - zp) * scale``. ``dequantized_weights`` returns those values under the
Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``), as
[out, in] float32 arrays: the reference that ``train-adapter --quantization_aware onnx-int4``
must reproduce (checked by tests/integration/test_onnx_export.py).

Reads ONNX files only; knows nothing of engines, training or servers.
"""

from __future__ import annotations

import re
from pathlib import Path

_NODE = re.compile(r"^/model/layers\.(?P<layer>\d+)/(?P<block>attn|mlp)/(?P<proj>[A-Za-z0-9_]+)/MatMul_Q4$")
_BLOCKS = {"attn": "self_attn", "mlp": "mlp"}


def hf_weight_name(node_name: str) -> str | None:
    """The Hugging Face weight a builder ``MatMulNBits`` node stands for, or None."""
    if node_name == "/lm_head/MatMul_Q4":
        return "lm_head.weight"
    match = _NODE.match(node_name)
    if not match:
        return None
    return f"model.layers.{match['layer']}.{_BLOCKS[match['block']]}.{match['proj']}.weight"


def unpack_int4(packed, rows: int, columns: int, block_size: int):
    """uint8 [rows, n_blocks, block_size / 2] (or flat) -> int values [rows, columns]."""
    import numpy as np

    packed = np.asarray(packed, dtype=np.uint8).reshape(rows, -1, block_size // 2)
    low, high = packed & 0x0F, packed >> 4
    values = np.stack([low, high], axis=-1).reshape(rows, -1)  # [rows, n_blocks * block_size]
    return values[:, :columns].astype(np.int32)


def dequantize_node(packed, scales, zero_points, *, rows: int, columns: int, block_size: int):
    """One MatMulNBits weight -> float32 [rows = N = out, columns = K = in]."""
    import numpy as np

    n_blocks = -(-columns // block_size)
    q = unpack_int4(packed, rows, n_blocks * block_size, block_size)  # [N, n_blocks * block]
    scale = np.asarray(scales, dtype=np.float32).reshape(rows, n_blocks)
    if zero_points is None:
        zp = np.full((rows, n_blocks), 8, dtype=np.int32)
    else:  # packed two per byte along the blocks of a row
        zp = unpack_int4(zero_points, rows, n_blocks, 2 * -(-n_blocks // 2))
    values = (q.reshape(rows, n_blocks, block_size) - zp[:, :, None]) * scale[:, :, None]
    return values.reshape(rows, -1)[:, :columns].astype(np.float32)


def dequantized_weights(model_dir: Path) -> dict[str, "object"]:
    """Every int4 weight of ``model_dir/model.onnx`` (an int4 export), dequantized, by HF name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    out: dict[str, object] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        name = hf_weight_name(node.name)
        if name is None:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4:
            raise ValueError(f"{node.name}: {attrs.get('bits')}-bit weights; only int4 is read")
        packed = numpy_helper.to_array(initializers[node.input[1]])
        scales = numpy_helper.to_array(initializers[node.input[2]])
        zp_name = node.input[3] if len(node.input) > 3 else ""
        zero_points = numpy_helper.to_array(initializers[zp_name]) if zp_name else None
        out[name] = dequantize_node(packed, scales, zero_points, rows=int(attrs["N"]), columns=int(attrs["K"]), block_size=int(attrs["block_size"]))
    return out
