"""The engine's lean Llama forward (server/engine/llama_forward.py) against independent
references: transformers' own forward through the same engine (logprobs of every generated token,
mixed prefill+decode steps), peft's PeftModel for a Qwen2 base (q/k/v biases), and the fallback
to transformers' forward for a model the lean forward does not cover."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.server.basemodel import compute_fingerprint
from loraplex.server.engine.engine import Engine, EngineRequest, TorchAdapterPayload
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.registry import BaseShapes, load_validated_adapter
from tests.oracle import Collector, greedy_request, make_random_adapter, reference_greedy, run_engine, two_adapters

PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404, 405, 406], [1, 77]]
LONG = [1] + list(range(300, 330))


def _engine(base_dir, adapters: dict, dtype=torch.float32, **kwargs) -> Engine:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).eval()
    shapes = BaseShapes.from_model(model, compute_fingerprint(base_dir))
    engine = Engine(model, eos_token_ids=[2], max_batch_size=8, **kwargs)
    for name, path in adapters.items():
        engine.add_adapter(TorchAdapterPayload(name=name, modules=load_validated_adapter(path, name, shapes, max_lora_rank=64).modules))
    return engine


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    return two_adapters(tiny_base, tmp_path_factory.mktemp("lean-adapters"))


def _logprob_requests():
    plan = [(PROMPTS[0], "a"), (PROMPTS[1], None), (LONG, "b"), (PROMPTS[2], "a"), (PROMPTS[3], (("a", 0.6), ("b", 0.4)))]
    requests = []
    for i, (prompt, adapter) in enumerate(plan):
        sink = Collector()
        mix = adapter if isinstance(adapter, tuple) else ()
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        requests.append((EngineRequest(str(i), list(prompt), None if mix else adapter, params, sink, logprobs=3, mix=mix), sink))
    return requests


@pytest.mark.parametrize("diag_b", [True, False], ids=["b-diag", "b-per-member"])
def test_lean_forward_equals_transformers_forward_on_mixed_steps(tiny_base, adapters, diag_b, monkeypatch):
    """Same requests (3 adapters' worth of rows, a mix, the base, a long prompt in chunks beside
    decoding rows) through the lean forward and through transformers' forward, fp32: the same
    tokens, and every token's logprob and top-3 within 1e-4. Both ways a grouped LoRA adds its B
    rows: one GEMM over the block-diagonal B, or one per member."""
    from loraplex.server.engine import lora

    monkeypatch.setitem(lora.DIAG_B, "enabled", diag_b)
    results = {}
    for lean in (True, False):
        engine = _engine(tiny_base, adapters, lean_forward=lean, max_num_batched_tokens=9)
        assert engine.forward_path == ("lean" if lean else "transformers")
        requests = _logprob_requests()
        run_engine(engine, {0: [r for r, _ in requests[:3]], 2: [r for r, _ in requests[3:]]})
        results[lean] = [sink for _, sink in requests]
    for lean_sink, hf_sink in zip(results[True], results[False]):
        assert lean_sink.tokens == hf_sink.tokens and len(lean_sink.tokens) == 10
        for a, b in zip(lean_sink.logprobs, hf_sink.logprobs):
            assert math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert all(math.isclose(x, y, abs_tol=1e-4) for (_, x), (_, y) in zip(a.top, b.top))


def test_the_lean_forward_keeps_one_copy_of_the_fused_weights(tiny_base, adapters):
    """q/k/v and gate/up run as one GEMM over a fused weight; the modules keep views into it."""
    engine = _engine(tiny_base, {})
    layer = engine.lean.layers[0]
    q = engine.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q.untyped_storage().data_ptr() == layer.qkv.weight.untyped_storage().data_ptr()
    assert layer.qkv.spans[0] == (0, q.shape[0])


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # visible biases (Qwen2's q/k/v carry them)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_a_qwen2_base_with_qkv_biases_runs_lean_and_equals_peft(tiny_qwen2, tmp_path):
    adapter = make_random_adapter(tiny_qwen2, tmp_path / "q", seed=3)
    engine = _engine(tiny_qwen2, {"q": adapter}, max_num_batched_tokens=6)
    assert engine.forward_path == "lean"
    prompts = [[1, 20, 30, 40, 50, 60, 70, 80, 90], [1, 5, 6]]
    requests = [greedy_request("0", prompts[0], "q", 8), greedy_request("1", prompts[1], None, 8)]
    run_engine(engine, {0: [requests[0][0]], 1: [requests[1][0]]})
    assert requests[0][1].tokens == reference_greedy(tiny_qwen2, adapter, prompts[0], n=8)
    assert requests[1][1].tokens == reference_greedy(tiny_qwen2, None, prompts[1], n=8)


def test_a_model_the_lean_forward_does_not_cover_runs_transformers_forward(tmp_path, smol_tokenizer_dir):
    """A gelu MLP is not Llama's: the engine says why and serves through transformers' forward,
    still equal to peft."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_act="gelu", bos_token_id=1, eos_token_id=2)
    base = tmp_path / "gelu"
    LlamaForCausalLM(config).save_pretrained(str(base), safe_serialization=True)
    adapter = make_random_adapter(base, tmp_path / "g", seed=4)
    engine = _engine(base, {"g": adapter})
    assert engine.forward_path == "transformers" and engine.lean is None
    request, sink = greedy_request("0", [1, 8, 9, 10], "g", 6)
    run_engine(engine, {0: [request]})
    assert sink.tokens == reference_greedy(base, adapter, [1, 8, 9, 10], n=6)


def test_a_lone_adapter_stream_at_bf16_equals_peft_and_follows_a_new_adapter_in_the_same_slot(tiny_base, adapters):
    """One row with one adapter: the small-step LoRA path (an fp32 copy of the slot's rows, kept
    while the slot streams alone). Another adapter written into the same slot must show at once
    (the copy is keyed on the rows' version): its tokens equal a fresh engine's and peft's."""
    from tests.oracle import check_greedy_within, reference_logits

    def stream(engine, name):
        request, sink = greedy_request(name, PROMPTS[0], name, 10)
        run_engine(engine, {0: [request]})
        return sink.tokens

    engine = _engine(tiny_base, {"a": adapters["a"]}, dtype=torch.bfloat16)
    slot = engine.slot_table.slot_of("a")
    tokens = {"a": stream(engine, "a")}
    engine.remove_adapter("a")
    fresh = _engine(tiny_base, {"b": adapters["b"]}, dtype=torch.bfloat16)
    engine.add_adapter(TorchAdapterPayload(name="b", modules=_payload(tiny_base, adapters["b"], "b").modules))
    assert engine.slot_table.slot_of("b") == slot  # the freed slot is reused
    tokens["b"] = stream(engine, "b")
    assert tokens["b"] == stream(fresh, "b") and tokens["b"] != tokens["a"]
    for name, got in tokens.items():
        bf16 = reference_logits(tiny_base, adapters[name], PROMPTS[0] + got, dtype=torch.bfloat16)
        noise = float((bf16 - reference_logits(tiny_base, adapters[name], PROMPTS[0] + got)).abs().max())
        check_greedy_within(bf16, len(PROMPTS[0]), got, tol=max(2 * noise, 1e-3))


def _payload(base_dir, adapter_dir, name):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(base_dir))
    return load_validated_adapter(adapter_dir, name, BaseShapes.from_model(plain, compute_fingerprint(base_dir)), max_lora_rank=64)
