"""Validate an adapter against the loaded base and read its weights: the gate at load time.

An adapter is refused (``AdapterInvalid``, message naming the value and the limit) when:
its name or path breaks the store rules (name pattern, containment unless external paths are
allowed); its config uses unsupported peft features; its weights are not safetensors (pickled
files are never opened) or the file is corrupt/truncated; its manifest's base fingerprint differs
from the loaded base; a module's rank exceeds ``max_lora_rank``; a targeted module does not exist
in the base; a tensor's shape does not fit the base layer; a module has only one of A and B.

``.onnx_adapter`` files (from ``loraplex export-onnx``) pass the same module, shape, rank and
finiteness checks after their tensors are mapped back to A and B.

The result holds plain tensors per module (A: [r, in], B: [out, r], and the scale), which the
engine stacks into its slots. Nothing here mutates the model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from loraplex.server.errors import AdapterInvalid, AdapterNotFound
from loraplex.server.store import ADAPTER_WEIGHTS, AdapterManifest, AdapterStore, LoraSpec, read_lora_spec, read_manifest, sha256_file
from loraplex.server.store.names import validate_adapter_name
from loraplex.server.store.onnx_adapter import ONNX_ADAPTER_SUFFIX, read_onnx_adapter
from loraplex.server.store.targets import lora_targets, module_of_graph_tensor, module_of_peft_key

_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")


@dataclass(frozen=True)
class BaseShapes:
    """What validation needs to know about the loaded base: fingerprint and Linear shapes."""

    fingerprint: str
    linear_shapes: Mapping[str, tuple[int, int]]  # full module name -> (in_features, out_features)
    missing_module_hint: str = "does not exist in the base (or is not a Linear layer)"

    @classmethod
    def from_model(cls, model, fingerprint: str) -> "BaseShapes":
        shapes = {name: (module.in_features, module.out_features) for name, module in lora_targets(model)}  # store/targets.py
        return cls(fingerprint=fingerprint, linear_shapes=shapes)

    @classmethod
    def from_config(cls, model_dir: Path, fingerprint: str) -> "BaseShapes":
        """The same, from config.json alone (the model is built on the meta device: no weights)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model, fingerprint)


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted module: A [r, in], B [out, r], output scale."""

    a: object  # torch.Tensor
    b: object  # torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class ValidatedAdapter:
    name: str
    path: Path
    spec: LoraSpec | None  # None for an .onnx_adapter file
    manifest: AdapterManifest | None
    modules: Mapping[str, LoraModuleWeights]  # empty when a backend's cache vouches for the adapter (see artifact)
    weights_sha256: str
    size_bytes: int
    # a file the backend loads as is (an .onnx_adapter), with what validation found when the
    # tensors were checked (used when ``modules`` is empty)
    artifact: Path | None = None
    summary_rank: int | None = None
    summary_modules: tuple[str, ...] = ()

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values()) if self.modules else int(self.summary_rank or 0)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.modules)) if self.modules else self.summary_modules


def resolve_adapter_path(store: AdapterStore, name: str, path: str | None, *, allow_external: bool) -> Path:
    """The folder to load for ``name``: inside the store unless external paths are allowed."""
    validate_adapter_name(name)
    if path is None:
        return store.existing(name)
    if not isinstance(path, str) or "\x00" in path or not path.isprintable():
        raise AdapterInvalid(f"adapter path {path!r} contains a NUL or another non-printable character", param="lora_path")
    if ".." in Path(path).parts:
        raise AdapterInvalid(f"adapter path {path!r} contains '..'", param="lora_path")
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = store.root / candidate
    elif not allow_external:
        real_root = os.path.realpath(store.root)
        if os.path.commonpath([real_root, os.path.realpath(candidate)]) != real_root:
            raise AdapterInvalid(
                f"adapter path {path!r} is outside the adapters dir {store.root} (start the server with "
                "--allow-external-adapter-paths to permit it)",
                param="lora_path",
            )
    real_root, real = os.path.realpath(store.root), os.path.realpath(candidate)
    if not allow_external and os.path.commonpath([real_root, real]) != real_root:
        raise AdapterInvalid(f"adapter path {path!r} resolves to {real}, outside the adapters dir {store.root}", param="lora_path")
    if not candidate.is_dir():
        raise AdapterNotFound(f"adapter path {path!r} is not a folder", param="lora_path")
    return candidate


def _scale_for(spec: LoraSpec, module: str, rank: int) -> float:
    alpha = spec.lora_alpha
    for pattern, value in spec.alpha_pattern.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            alpha = value
    return spec.scaling(rank, alpha)


def _read_tensors(weights: Path) -> dict[str, object]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterInvalid(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def load_validated_adapter(path: Path, name: str, base: BaseShapes, *, max_lora_rank: int) -> ValidatedAdapter:
    """Read and check an adapter against the base; raise AdapterInvalid on any mismatch.

    ``path`` is a peft folder, or an ``.onnx_adapter`` file written by ``loraplex export-onnx``
    (A^T and scaled B^T per module; read back as A, B with scale 1).
    """
    if path.is_file() and path.suffix == ONNX_ADAPTER_SUFFIX:
        return _load_onnx_adapter_file(path, name, base, max_lora_rank=max_lora_rank)
    return _load_peft_folder(path, name, base, max_lora_rank=max_lora_rank)


def _load_peft_folder(folder: Path, name: str, base: BaseShapes, *, max_lora_rank: int) -> ValidatedAdapter:
    import torch

    spec = read_lora_spec(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p for p in _PICKLED if (folder / p).exists()]
        detail = f"found {', '.join(pickled)}: pickled weights are refused, convert to safetensors" if pickled else "no weights file"
        raise AdapterInvalid(f"adapter {name!r}: {ADAPTER_WEIGHTS} missing ({detail})")
    manifest = read_manifest(folder)
    if manifest is not None and manifest.base_fingerprint != base.fingerprint:
        raise AdapterInvalid(
            f"adapter {name!r} was trained on base fingerprint {manifest.base_fingerprint} "
            f"({manifest.base_model_id}); the loaded base is {base.fingerprint}"
        )
    if spec.max_rank > max_lora_rank:
        raise AdapterInvalid(f"adapter {name!r} has rank {spec.max_rank}, above --max-lora-rank {max_lora_rank}")
    weights_sha256 = sha256_file(weights)
    if manifest is not None and manifest.weights_sha256 != weights_sha256:
        raise AdapterInvalid(
            f"adapter {name!r}: {ADAPTER_WEIGHTS} has sha256 {weights_sha256[:16]}..., the manifest says "
            f"{manifest.weights_sha256[:16]}... (file replaced or corrupted)"
        )
    if spec.fan_in_fan_out:
        raise AdapterInvalid(f"adapter {name!r}: fan_in_fan_out=true (Conv1D-style weights) is not supported")
    tensors = _read_tensors(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = module_of_peft_key(key)
        if parsed is None:
            raise AdapterInvalid(f"adapter {name!r}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported; no embeddings or modules_to_save)")
        module, kind = parsed
        pairs.setdefault(module, {})[kind] = tensor
    modules = _check_modules(name, pairs, base, max_lora_rank=max_lora_rank, scale_of=lambda module, rank: _scale_for(spec, module, rank))
    return ValidatedAdapter(
        name=name,
        path=folder,
        spec=spec,
        manifest=manifest,
        modules=modules,
        weights_sha256=weights_sha256,
        size_bytes=weights.stat().st_size,
    )


def _load_onnx_adapter_file(path: Path, name: str, base: BaseShapes, *, max_lora_rank: int) -> ValidatedAdapter:
    import torch

    arrays = read_onnx_adapter(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in arrays.items():
        module, kind = module_of_graph_tensor(key)
        if array.ndim != 2:
            raise AdapterInvalid(f"adapter {name!r}: tensor {key} has shape {tuple(array.shape)}; expected 2 dimensions")
        pairs.setdefault(module, {})[kind] = torch.from_numpy(array.astype("float32").T.copy())  # back to A [r, in], B [out, r]
    modules = _check_modules(name, pairs, base, max_lora_rank=max_lora_rank, scale_of=lambda module, rank: 1.0)
    return ValidatedAdapter(
        name=name,
        path=path,
        spec=None,
        manifest=None,
        modules=modules,
        weights_sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
    )


def _check_modules(name: str, pairs, base: BaseShapes, *, max_lora_rank: int, scale_of) -> dict[str, LoraModuleWeights]:
    """Shape, rank, target and finiteness checks shared by every adapter format."""
    import torch

    if not pairs:
        raise AdapterInvalid(f"adapter {name!r} holds no LoRA tensors")
    modules: dict[str, LoraModuleWeights] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterInvalid(f"adapter {name!r}: module {module} has lora_{''.join(pair)} but not both A and B")
        if module not in base.linear_shapes:
            raise AdapterInvalid(f"adapter {name!r}: target module {module} {base.missing_module_hint}")
        a, b = pair["A"], pair["B"]
        in_features, out_features = base.linear_shapes[module]
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features or b.shape[1] != rank:
            raise AdapterInvalid(
                f"adapter {name!r}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"the base layer needs A (r, {in_features}) and B ({out_features}, r)"
            )
        if rank > max_lora_rank:
            raise AdapterInvalid(f"adapter {name!r}: module {module} has rank {rank}, above --max-lora-rank {max_lora_rank}")
        if rank == 0:
            raise AdapterInvalid(f"adapter {name!r}: module {module} has rank 0")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterInvalid(f"adapter {name!r}: module {module} has NaN or infinite weights")
        modules[module] = LoraModuleWeights(a=a.float(), b=b.float(), scale=scale_of(module, rank))
    return modules
