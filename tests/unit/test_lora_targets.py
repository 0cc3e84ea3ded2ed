"""The one LoRA target-naming module (server/store/targets.py): which layers carry LoRA, checked
against peft's own ``all-linear`` choice, and the three spellings of a module checked against
literal names (the onnxruntime-genai model builder's are written out by hand here)."""

from __future__ import annotations

import pytest

from loraplex.server.errors import AdapterInvalid
from loraplex.server.store import targets


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def test_targets_are_the_linear_layers_peft_all_linear_picks():
    from peft import LoraConfig, get_peft_model

    model = _tiny_llama()
    ours = {name for name, _ in targets.lora_targets(model)}
    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    theirs = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    assert ours == theirs
    assert len(ours) == 2 * 7  # q k v o gate up down in each of 2 layers
    assert "lm_head" not in ours


def test_target_suffixes_are_the_projection_names():
    assert targets.target_suffixes(_tiny_llama()) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("name, expected", [("lm_head", False), ("model.lm_head", False), ("model.layers.0.mlp.up_proj", True), ("q_proj", True)])
def test_is_target_name(name, expected):
    assert targets.is_target_name(name) is expected


def test_peft_keys_round_trip():
    key = targets.peft_tensor_key("model.layers.1.self_attn.v_proj", "B")
    assert key == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert targets.module_of_peft_key(key) == ("model.layers.1.self_attn.v_proj", "B")
    # peft writes an adapter-name infix in some versions; both spellings name the same module
    assert targets.module_of_peft_key("base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight") == ("model.layers.1.mlp.up_proj", "A")
    assert targets.module_of_peft_key("base_model.model.model.embed_tokens.weight") is None


def test_builder_names_of_a_decoder_projection():
    module = "model.layers.3.self_attn.q_proj"
    assert targets.builder_module(module) == "model.layers.3.attn.q_proj"
    assert targets.graph_tensor_names(module) == ("model.layers.3.attn.q_proj.lora_A.weight", "model.layers.3.attn.q_proj.lora_B.weight")
    assert targets.module_of_graph_tensor("model.layers.3.attn.q_proj.lora_B.weight") == (module, "B")
    assert targets.module_of_graph_tensor("model.layers.0.mlp.down_proj.lora_A.weight") == ("model.layers.0.mlp.down_proj", "A")
    assert targets.builder_lora_nodes([module, "lm_head"]) == ["/model/layers.3/attn/q_proj/lora_A/MatMul", "/model/layers.3/attn/q_proj/lora_B/MatMul"]
    assert targets.parse_builder_lora_node("/model/layers.3/attn/q_proj/lora_B/MatMul") == (
        "model.layers.3.attn.q_proj.lora_B.weight",
        "lora_r.layers.3.attn.q_proj",
        "B",
    )
    assert targets.parse_builder_lora_node("/model/layers.3/attn/q_proj/MatMul") is None


def test_every_target_of_a_llama_has_builder_names_that_round_trip():
    for name, _ in targets.lora_targets(_tiny_llama()):
        assert targets.is_decoder_projection(name)
        a, b = targets.graph_tensor_names(name)
        assert targets.module_of_graph_tensor(a) == (name, "A")
        assert targets.module_of_graph_tensor(b) == (name, "B")
        nodes = targets.builder_lora_nodes([name])
        assert [targets.parse_builder_lora_node(n)[0] for n in nodes] == [a, b]


@pytest.mark.parametrize("bad", ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm.weight"])
def test_modules_outside_decoder_projections_have_no_builder_name(bad):
    assert not targets.is_decoder_projection(bad)
    with pytest.raises(AdapterInvalid, match="cannot carry LoRA"):
        targets.graph_tensor_names(bad)


def test_graph_tensor_names_that_are_not_lora_weights_are_refused():
    with pytest.raises(AdapterInvalid, match="not a LoRA weight"):
        targets.module_of_graph_tensor("model.layers.0.attn.q_proj.weight")
