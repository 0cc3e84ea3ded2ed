"""Rewrite a model-builder graph so every LoRA weight is an optional graph INPUT.

The onnxruntime-genai model builder, given a template peft adapter, emits per targeted module
``/model/layers.N/(attn|mlp)/X_proj/lora_A/MatMul`` and ``.../lora_B/MatMul`` with the
template's weights as constants. We turn each weight into a graph input with an initializer of
the same name as its default: an EMPTY tensor (rank 0), so with no adapter the LoRA path adds
exactly zero and the model is the base. Each module gets its OWN symbolic rank dimension
(``lora_r.layers.N.attn.q_proj``), since adapters may have per-module ranks (one shared name
makes onnxruntime try to reuse buffers across modules of different rank), and the lora_A
output's static shape is made symbolic too.

Only the graph proto is rewritten: the external weight file the builder wrote stays as it is.
Knows nothing of adapters' contents, engines or servers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.store.onnx_adapter import module_of_graph_tensor

_LORA_NODE = re.compile(r"^/model/layers\.(?P<layer>\d+)/(?P<block>attn|mlp)/(?P<proj>[A-Za-z0-9_]+)/lora_(?P<kind>[AB])/MatMul$")


@dataclass(frozen=True)
class LoraInput:
    """One swappable LoRA weight of the exported graph."""

    name: str  # graph input, e.g. model.layers.0.attn.q_proj.lora_A.weight
    module: str  # Hugging Face module name, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "A" ([in, r]) or "B" ([r, out])
    rank_dim: str  # the symbolic dimension of this module's rank
    features: int  # in_features for A, out_features for B


def lora_matmul_node_names(modules: list[str]) -> list[str]:
    """The builder's node names of the LoRA MatMuls for these HF module names (to keep them out
    of int4 quantization: quantized, their rank would be fixed)."""
    names = []
    for module in modules:
        match = re.match(r"^.*\.layers\.(\d+)\.(self_attn|mlp)\.([A-Za-z0-9_]+)$", module)
        if not match:
            continue
        layer, block, proj = match.groups()
        block = "attn" if block == "self_attn" else "mlp"
        names += [f"/model/layers.{layer}/{block}/{proj}/lora_{kind}/MatMul" for kind in ("A", "B")]
    return names


def expose_lora_inputs(model_path: Path) -> list[LoraInput]:
    """Rewrite ``model_path`` (model.onnx) in place; return the LoRA inputs it now has."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    value_info = {v.name: v for v in graph.value_info}
    inputs: list[LoraInput] = []
    for node in graph.node:
        match = _LORA_NODE.match(node.name)
        if not match:
            continue
        constant = initializers.get(node.input[1])
        if constant is None or len(constant.dims) != 2:
            raise RuntimeError(f"LoRA node {node.name} has no 2-D constant weight {node.input[1]!r}; this builder version is not supported")
        stem = f"model.layers.{match['layer']}.{match['block']}.{match['proj']}"
        name = f"{stem}.lora_{match['kind']}.weight"
        rank_dim = f"lora_r.layers.{match['layer']}.{match['block']}.{match['proj']}"
        rows, cols = (int(d) for d in constant.dims)
        if match["kind"] == "A":  # [in, r]
            shape, empty, features = [rows, rank_dim], np.zeros((rows, 0), np.float32), rows
            out = value_info.get(node.output[0])
            if out is not None:  # [batch, seq, r] -> symbolic r
                dim = out.type.tensor_type.shape.dim[-1]
                dim.Clear()
                dim.dim_param = rank_dim
        else:  # [r, out]
            shape, empty, features = [rank_dim, cols], np.zeros((0, cols), np.float32), cols
        if constant.data_type != onnx.TensorProto.FLOAT:
            raise RuntimeError(f"LoRA weight {node.input[1]} has ONNX dtype {constant.data_type}; only float32 graphs are supported")
        node.input[1] = name
        graph.initializer.remove(constant)
        graph.input.append(helper.make_tensor_value_info(name, constant.data_type, shape))
        graph.initializer.append(numpy_helper.from_array(empty, name))
        module, _ = module_of_graph_tensor(name)
        inputs.append(LoraInput(name=name, module=module, kind=match["kind"], rank_dim=rank_dim, features=features))
    if not inputs:
        raise RuntimeError(f"{model_path}: the builder emitted no LoRA MatMul nodes (template adapter not applied?)")
    onnx.save(model, str(model_path))
    return inputs


STACKED_GRAPH = "model.stacked.onnx"
SLOTS_INPUT = "lora_slots"


def write_stacked_variant(model_path: Path, out_path: Path) -> int:
    """A second graph over the same weights file that serves rows of DIFFERENT adapters in one
    forward: every LoRA input ``X.lora_A.weight`` [in, r] becomes ``X.lora_A.stack``
    [slots, in, r] (B: [slots, r, out]) and a ``lora_slots`` [batch] input picks each row's slot
    with a Gather, so the LoRA MatMuls become batched MatMuls ([B, S, in] @ [B, in, r]).
    Slot 0 is all zeros (the bare base). Plain onnxruntime-genai keeps using model.onnx; the
    onnx backend's mixed-batch engine (``stacked.py``) uses this one. Returns the stacks made."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    lora = [i for i in graph.input if ".lora_" in i.name and i.name.endswith(".weight")]
    names = {i.name for i in lora}
    kept = [t for t in graph.initializer if t.name not in names]  # stacks have no default
    del graph.initializer[:]
    graph.initializer.extend(kept)
    gathers, stacks = [], []
    for value in lora:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        stack = value.name[: -len(".weight")] + ".stack"
        rows = value.name + ".rows"
        stacks.append(helper.make_tensor_value_info(stack, value.type.tensor_type.elem_type, ["lora_slots_total", *dims]))
        gathers.append(helper.make_node("Gather", [stack, SLOTS_INPUT], [rows], name=f"/lora_slots/{value.name}/Gather", axis=0))
        for node in graph.node:
            if node.op_type == "MatMul":
                for k, name in enumerate(node.input):
                    if name == value.name:
                        node.input[k] = rows
    inputs = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend([*inputs, helper.make_tensor_value_info(SLOTS_INPUT, TensorProto.INT64, ["batch_size"]), *stacks])
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*gathers, *nodes])  # Gathers read only graph inputs: first is topologically fine
    onnx.save(model, str(out_path))
    return len(stacks)
