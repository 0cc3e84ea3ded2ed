"""Quantization-aware training targets: ``--quantization_aware onnx-int4``.

The int4 ONNX export (``loraplex export-onnx``, onnxruntime-genai's model builder, default
options) stores every decoder-layer projection and ``lm_head`` as a ``MatMulNBits`` weight: blocks
of 32 consecutive input features per output row, symmetric 4-bit (scale = the block's value of
largest magnitude / -8, no zero-point tensor: the op's default zero point 8), quantized by
onnxruntime's C++ kernel. With tied embeddings the builder reads the embedding rows from the same
quantized tensor (``GatherBlockQuantized``). The graph then computes with ``(q - 8) * scale``.
We call the same onnxruntime quantizer (its rounding of ties is not numpy's or torch's; a
re-implementation in torch differed on 6,000-36,000 of the base's ~134M weights, by one step) and dequantize its output.

Here the same quantize -> dequantize is applied to the torch base in place, before peft wraps it,
so an adapter trained (and scored) on it sees exactly the base weights the int4 export serves and
learns around their error. ``tests/integration/test_onnx_export.py`` checks the result equals the
dequantized initializers of a real int4 export, bit for bit. What it does not reproduce: with
``accuracy_level=4`` the CPU kernel also rounds activations to int8 per block; that error is
smaller and not modelled.

Knows torch modules and onnxruntime's weight quantizer; nothing of ONNX graphs, exports or servers.
"""

from __future__ import annotations

import re
from typing import Any

QUANTIZATION_AWARE = ("none", "onnx-int4")
#: the model builder's defaults for int4 (``int4_block_size``, ``int4_is_symmetric``)
INT4_BLOCK_SIZE = 32
_DECODER_PROJECTION = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.[A-Za-z0-9_]+$")


def int4_block_round_trip(weight: Any, block_size: int = INT4_BLOCK_SIZE) -> Any:
    """``weight`` [out, in] -> the same shape after the int4 export's quantize -> dequantize.

    The quantization is onnxruntime's own (``DefaultWeightOnlyQuantizer.qbits_block_quant``, the
    C++ kernel the model builder's ``MatMulNBitsQuantizer`` calls, with the builder's defaults:
    symmetric, ``block_size`` 32), on the transposed weight as the graph stores it ([K = in,
    N = out]); its packed nibbles and scales are then dequantized as ``MatMulNBits`` computes
    them: ``(q - 8) * scale``."""
    import numpy as np
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    out_features, in_features = weight.shape
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True))
    k_major = np.ascontiguousarray(weight.detach().to(torch.float32).cpu().numpy().T)  # [in, out]
    packed, scales, _ = quantizer.qbits_block_quant(k_major)  # [out, n_blocks, block/2] uint8, [out, n_blocks]
    n_blocks = packed.shape[1]
    low, high = packed & 0x0F, packed >> 4
    q = np.stack([low, high], axis=-1).reshape(out_features, n_blocks, block_size).astype(np.float32)
    values = (q - 8.0) * scales.reshape(out_features, n_blocks, 1)  # [out, n_blocks, block]
    restored = torch.from_numpy(values.reshape(out_features, -1)[:, :in_features].copy())
    return restored.to(weight.dtype)


def int4_target_names(model: Any) -> list[str]:
    """The Linear modules the int4 export quantizes: every decoder-layer attention/MLP projection
    and ``lm_head``."""
    import torch

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (_DECODER_PROJECTION.search(name) or name.split(".")[-1] == "lm_head"):
            names.append(name)
    return names


def apply_onnx_int4_weights(model: Any, block_size: int = INT4_BLOCK_SIZE) -> list[str]:
    """Replace, in place, the weights the int4 export quantizes by their int4 round trip; returns
    the module names changed. A tied embedding shares ``lm_head``'s tensor and so follows it,
    as in the export."""
    import torch

    names = int4_target_names(model)
    if not names:
        raise ValueError("no decoder-layer projections or lm_head found to quantize")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{name}.weight is {weight.dtype}; --quantization_aware needs a float base (not --method qlora)")
            weight.copy_(int4_block_round_trip(weight, block_size))
    return names
