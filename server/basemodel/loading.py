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


def load_base_model(ref: BaseModelRef, *, quantize: str = "none", device: str | None = None):
    """Load the base for inference or training; ``quantize`` is one of QUANTIZATIONS."""
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
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(str(ref.path), dtype=dtype, device_map=device, **kwargs)
    except Exception as exc:
        raise BaseModelError(f"cannot load base model from {ref.path}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return model
