"""Which layers carry LoRA, and what each of them is called in every format we read or write.

One rule, used by training (which modules may be ``--target_modules``), the torch engine (which
Linear layers it wraps), adapter validation (which modules an adapter may name) and the ONNX
export and serving (graph input names, builder node names). Three spellings of one module exist:

- Hugging Face module name: ``model.layers.3.self_attn.q_proj`` (what peft and the engine use);
- peft tensor key: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``;
- onnxruntime-genai model builder: ``model.layers.3.attn.q_proj`` (it says ``attn`` where Hugging
  Face says ``self_attn``), with graph inputs ``<that>.lora_A.weight`` and MatMul nodes
  ``/model/layers.3/attn/q_proj/lora_A/MatMul``.

Only names live here: no tensors, files, engines or servers. ``lora_targets`` looks at a model's
modules (it imports torch when called, never at import time).
"""

from __future__ import annotations

import re
from typing import Iterator

from loraplex.server.errors import AdapterInvalid

#: Linear layers that never carry LoRA: the output head (tied to the embeddings in most bases,
#: and peft does not target it by default either). Matched on the last name component.
EXCLUDED_TARGETS = frozenset({"lm_head"})

#: The blocks of a decoder layer in Hugging Face spelling -> the model builder's spelling.
_HF_TO_BUILDER_BLOCK = {"self_attn": "attn", "mlp": "mlp"}
_BUILDER_TO_HF_BLOCK = {v: k for k, v in _HF_TO_BUILDER_BLOCK.items()}

_HF_DECODER_MODULE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+))\.(?P<block>self_attn|mlp)\.(?P<proj>[A-Za-z0-9_]+)$")
_GRAPH_TENSOR = re.compile(r"^(?P<prefix>.*\.layers\.\d+)\.(?P<block>attn|mlp)\.(?P<proj>[A-Za-z0-9_]+)\.lora_(?P<kind>[AB])\.weight$")
_BUILDER_NODE = re.compile(r"^/model/layers\.(?P<layer>\d+)/(?P<block>attn|mlp)/(?P<proj>[A-Za-z0-9_]+)/lora_(?P<kind>[AB])/MatMul$")
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


# ------------------------------------------------------------------ Hugging Face modules
def is_target_name(name: str) -> bool:
    """May a Linear layer of this (full or short) name carry LoRA?"""
    return name.rsplit(".", 1)[-1] not in EXCLUDED_TARGETS


def lora_targets(model) -> Iterator[tuple[str, object]]:
    """(full name, module) of every layer of ``model`` that can carry LoRA: each ``nn.Linear``
    (bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` subclass it) except ``EXCLUDED_TARGETS``."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and is_target_name(name):
            yield name, module


def target_suffixes(model) -> list[str]:
    """The short names (``q_proj``, ``down_proj`` ...) of the model's LoRA-capable layers: what
    ``--target_modules`` may list."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in lora_targets(model)})


def is_decoder_projection(module: str) -> bool:
    """True for an attention or MLP projection of a decoder layer: the only modules the ONNX
    model builder can give LoRA inputs."""
    return _HF_DECODER_MODULE.match(module) is not None


# ------------------------------------------------------------------------- peft keys
def peft_tensor_key(module: str, kind: str) -> str:
    """peft's safetensors key of a module's ``A`` or ``B`` weight."""
    return f"base_model.model.{module}.lora_{kind}.weight"


def module_of_peft_key(key: str) -> tuple[str, str] | None:
    """(Hugging Face module name, "A" or "B") for a peft LoRA tensor key (with or without the
    ``base_model.model.`` prefix and an adapter-name infix), or None when it is not one."""
    match = _PEFT_KEY.match(key)
    return (match["module"], match["kind"]) if match else None


# -------------------------------------------------------------- ONNX model builder names
def builder_module(module: str) -> str:
    """The model builder's name of a Hugging Face decoder projection (``model.layers.3.attn.q_proj``);
    AdapterInvalid for modules outside a decoder layer's attention or MLP."""
    match = _HF_DECODER_MODULE.match(module)
    if not match:
        raise AdapterInvalid(f"module {module!r} cannot carry LoRA in an exported ONNX model (only attention and MLP projections of decoder layers can)")
    return f"{match['prefix']}.{_HF_TO_BUILDER_BLOCK[match['block']]}.{match['proj']}"


def graph_tensor_names(module: str) -> tuple[str, str]:
    """Graph input names (A, B) of a Hugging Face module name in an exported model."""
    stem = builder_module(module)
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def module_of_graph_tensor(name: str) -> tuple[str, str]:
    """(Hugging Face module name, "A" or "B") for a graph LoRA tensor name."""
    match = _GRAPH_TENSOR.match(name)
    if not match:
        raise AdapterInvalid(f"tensor {name!r} is not a LoRA weight of an exported model (expected model.layers.N.(attn|mlp).X.lora_(A|B).weight)")
    return f"{match['prefix']}.{_BUILDER_TO_HF_BLOCK[match['block']]}.{match['proj']}", match["kind"]


def builder_lora_nodes(modules: list[str]) -> list[str]:
    """The builder's MatMul node names of the LoRA path of these Hugging Face modules (modules
    the builder gives no LoRA are skipped)."""
    names = []
    for module in modules:
        match = _HF_DECODER_MODULE.match(module)
        if match:
            block = _HF_TO_BUILDER_BLOCK[match["block"]]
            names += [f"/model/layers.{match['layer']}/{block}/{match['proj']}/lora_{kind}/MatMul" for kind in ("A", "B")]
    return names


def parse_builder_lora_node(node_name: str) -> tuple[str, str, str] | None:
    """(graph input name, symbolic rank dimension, "A" or "B") for a builder LoRA MatMul node,
    or None for any other node. The rank dimension is per module (``lora_r.layers.N.attn.q_proj``)
    because adapters may give modules different ranks."""
    match = _BUILDER_NODE.match(node_name)
    if not match:
        return None
    stem = f"layers.{match['layer']}.{match['block']}.{match['proj']}"
    return f"model.{stem}.lora_{match['kind']}.weight", f"lora_r.{stem}", match["kind"]
