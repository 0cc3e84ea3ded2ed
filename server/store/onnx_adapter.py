"""The ``.onnx_adapter`` format: one LoRA adapter as onnxruntime's adapter file, for a model
exported by ``loraplex export-onnx``.

The exported graph computes ``y = x @ W + (x @ A_in) @ B_in`` per targeted module, with
``A_in`` and ``B_in`` optional graph inputs named after the module as the onnxruntime-genai
model builder names it (``model.layers.N.attn.q_proj.lora_A.weight``; the builder says ``attn``
where Hugging Face says ``self_attn``). An adapter file therefore holds, per module,
``A^T`` ([in, r]) and ``(scale * B)^T`` ([r, out]), in the graph's float dtype (float32 on CPU).

This module owns reading/writing such files (onnxruntime's own ``AdapterFormat``); the naming
rule both ways lives in ``store/targets.py``. It knows nothing of graphs, engines or servers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from loraplex.server.errors import AdapterInvalid
from loraplex.server.store.targets import graph_tensor_names, module_of_graph_tensor  # noqa: F401  (re-exported)

ONNX_ADAPTER_SUFFIX = ".onnx_adapter"


def onnx_adapter_arrays(modules: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Graph-input arrays for validated modules (objects with ``a`` [r, in], ``b`` [out, r] and
    ``scale``, as torch tensors): ``A^T`` and ``(scale * B)^T``, float32, C-contiguous."""
    arrays: dict[str, np.ndarray] = {}
    for module, weights in modules.items():
        a_name, b_name = graph_tensor_names(module)
        a = weights.a.detach().float().cpu().numpy()
        b = weights.b.detach().float().cpu().numpy() * np.float32(weights.scale)
        arrays[a_name] = np.ascontiguousarray(a.T, dtype=np.float32)
        arrays[b_name] = np.ascontiguousarray(b.T, dtype=np.float32)
    return arrays


def write_onnx_adapter(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write an onnxruntime adapter file atomically (temp file + rename)."""
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()})
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ONNX_ADAPTER_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; served files must be readable by the server's user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_onnx_adapter(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of an onnxruntime adapter file, as arrays of their own (copies);
    AdapterInvalid when it cannot be read."""
    tensors = OnnxAdapterTensors(path)  # must outlive the copies: the views point into its buffers
    return {name: array.copy() for name, array in tensors.arrays().items()}


class OnnxAdapterTensors:
    """An adapter file's tensors as numpy VIEWS of onnxruntime's own buffers (no copy), valid
    only while this object lives (the views do not keep it alive): for copying straight into
    other memory (the onnx backend's stacks)."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        try:
            self._format = ort.AdapterFormat.read_adapter(str(path))
            self._values = self._format.get_parameters()
        except Exception as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise AdapterInvalid(f"{path}: not a readable onnxruntime adapter file ({type(exc).__name__}: {detail})") from exc

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self._values.items()}
