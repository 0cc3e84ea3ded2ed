"""Load a resolved base model (optionally quantized with bitsandbytes) and its tokenizer.

Quantization is chosen from a small table, not if/else chains. This module knows nothing of
adapters; callers wrap the returned model (peft for training, the engine for serving).
"""

from __future__ import annotations

from typing import Any, Callable

from loraplex.server.basemodel.resolve import BaseModelRef
from loraplex.server.errors import BaseModelError, RequestInvalid


def _no_quantization() -> dict[str, Any]:
    return {}


def _int8() -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}


def _nf4() -> dict[str, Any]:
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    }


#: quantize name -> from_pretrained keyword arguments
QUANTIZATIONS: dict[str, Callable[[], dict[str, Any]]] = {"none": _no_quantization, "int8": _int8, "nf4": _nf4}


def bitsandbytes_problem() -> str | None:
    """None when bitsandbytes can quantize here, else a one-line reason."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    return None


#: --dtype names -> torch dtype names ("auto" is resolved by :func:`resolve_dtype`)
DTYPES = ("auto", "bfloat16", "float16", "float32")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    try:
        flags = set()
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
        if flags:
            return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    import torch

    return "AMX" in torch.backends.cpu.get_cpu_capability().upper()


def resolve_dtype(dtype: str, device: str):
    """The torch dtype for ``--dtype``: auto = bf16 on CUDA and on CPUs with bf16 hardware
    (AMX / AVX512-BF16: about 3x the fp32 matmul rate), fp32 elsewhere."""
    import torch

    if dtype not in DTYPES:
        raise RequestInvalid(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
    if dtype == "auto":
        if device.startswith("cuda") or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(ref: BaseModelRef):
    """The base's tokenizer, with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ref.path))
    except Exception as exc:
        raise BaseModelError(f"cannot load a tokenizer from {ref.path}: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(ref: BaseModelRef, *, quantize: str = "none", device: str | None = None, dtype: str | None = None):
    """Load the base for inference or training; ``quantize`` is one of QUANTIZATIONS, ``dtype``
    one of DTYPES (None: fp32 on CPU, bf16 on CUDA, what training uses)."""
    import torch
    from transformers import AutoModelForCausalLM

    if quantize not in QUANTIZATIONS:
        raise RequestInvalid(f"quantize={quantize!r} is not supported; choose one of {sorted(QUANTIZATIONS)}")
    if quantize != "none":
        problem = bitsandbytes_problem()
        if problem:
            raise RequestInvalid(f"quantize={quantize!r} needs bitsandbytes, which cannot run here: {problem}")
    device = device or default_device()
    kwargs = QUANTIZATIONS[quantize]()
    torch_dtype = (torch.float32 if device == "cpu" else torch.bfloat16) if dtype is None else resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(ref.path), dtype=torch_dtype, device_map=device, **kwargs)
    except Exception as exc:
        raise BaseModelError(f"cannot load base model from {ref.path}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return model
