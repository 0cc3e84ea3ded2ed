"""Torch engine correctness against an independent reference: peft's PeftModel with one adapter,
greedy, recomputing the whole sequence each step (no KV cache). Mixed batches, joins and leaves,
prompts prefilled in chunks beside decoding rows (small token budgets), fp32 exact and bf16 within
a documented tolerance; adapter install rules through the engine protocol."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.basemodel import compute_fingerprint
from loraplex.server.engine.engine import Engine, EngineRequest, TorchAdapterPayload
from loraplex.server.engine.protocol import Engine as EngineProtocol
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.registry import BaseShapes, load_validated_adapter
from tests.oracle import Collector, cached_oracle, check_greedy_within, greedy_request, make_random_adapter, reference_logits, run_engine

N_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-adapters")
    return {
        "a": make_random_adapter(tiny_base, root / "a", seed=1),
        "b": make_random_adapter(tiny_base, root / "b", seed=2, r=8, targets=("q_proj", "v_proj")),
        "c": make_random_adapter(tiny_base, root / "c", seed=3, r=2),
    }


@pytest.fixture(scope="module")
def expected(tiny_base, adapters):
    return cached_oracle(tiny_base, adapters, N_TOKENS)


def _model(tiny_base, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=dtype).eval()


def _load(model, tiny_base):
    shapes = BaseShapes.from_model(model, compute_fingerprint(tiny_base))
    return lambda name, path: TorchAdapterPayload(name=name, modules=load_validated_adapter(path, name, shapes, max_lora_rank=64).modules)  # noqa: E731


def _engine(tiny_base, adapters, dtype=torch.float32, **kwargs):
    model = _model(tiny_base, dtype)
    load = _load(model, tiny_base)  # shapes before the engine wraps the Linear layers
    engine = Engine(model, eos_token_ids=[2], **kwargs)
    for name, path in adapters.items():
        engine.add_adapter(load(name, path))
    return engine


def _request(rid, prompt, adapter, n=N_TOKENS):
    return greedy_request(rid, prompt, adapter, n)




PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404, 405, 406], [1, 77], [1, 5000, 6000, 7000]]
LONG = [1] + list(range(300, 340))  # 41 tokens: several chunks under a small budget


def test_engine_satisfies_the_protocol(tiny_base, adapters):
    engine = _engine(tiny_base, {})
    assert isinstance(engine, EngineProtocol) and engine.payload_kind == "torch"


@pytest.mark.parametrize("budget", [512, 7])
def test_mixed_batch_with_joins_equals_peft_single_adapter(tiny_base, adapters, expected, budget):
    """Rows of 3 adapters and the base join at different steps and leave at different times;
    with budget 7, prompts are split into chunks prefilled in the same forwards as decode rows."""
    engine = _engine(tiny_base, adapters, max_batch_size=8, max_num_batched_tokens=budget)
    plan = [(PROMPTS[0], "a", 12), (PROMPTS[1], None, 5), (PROMPTS[2], "b", 12), (PROMPTS[3], "c", 9), (PROMPTS[4], "a", 12), (LONG, "b", 6)]
    requests = [_request(str(i), prompt, adapter, n) for i, (prompt, adapter, n) in enumerate(plan)]
    run_engine(engine, {0: [requests[0][0], requests[1][0]], 1: [requests[2][0]], 2: [requests[3][0], requests[5][0]], 4: [requests[4][0]]})
    assert engine.peak_batch_size >= 5
    for (prompt, adapter, n), (_, sink) in zip(plan, requests):
        assert sink.tokens == expected(adapter, prompt, n), (adapter, prompt)
        assert sink.finish == "length"
    assert engine.stats().kv_used_tokens == 0 and engine.num_running == 0
    # adapters really differ from each other and from the base on the same prompt
    outs = {name: tuple(expected(name, PROMPTS[0])) for name in ("a", "b", "c", None)}
    assert len(set(outs.values())) == 4


def test_a_long_prompt_is_chunked_while_running_rows_keep_decoding(tiny_base, adapters, expected):
    engine = _engine(tiny_base, adapters, max_batch_size=4, max_num_batched_tokens=8)
    running, running_sink = _request("run", PROMPTS[0], "a", n=30)
    engine.admit(running)
    engine.step()  # 5 prompt tokens fit the budget: decoding from now on
    assert len(running_sink.tokens) == 1
    long_req, long_sink = _request("long", LONG, "c", n=8)
    engine.admit(long_req)
    steps_to_first = 0
    while not long_sink.tokens:
        before = len(running_sink.tokens)
        engine.step()
        steps_to_first += 1
        assert len(running_sink.tokens) == before + 1  # the running stream never waits
    assert steps_to_first == -(-len(LONG) // 7)  # 7 prompt tokens per step beside the decoding row
    run_engine(engine, {})
    assert long_sink.tokens == expected("c", LONG, 8)
    assert running_sink.tokens == expected("a", PROMPTS[0], 30)


def test_many_new_prompts_are_prefilled_in_one_step(tiny_base, adapters, expected):
    engine = _engine(tiny_base, adapters, max_batch_size=8, max_num_batched_tokens=64)
    requests = [_request(str(i), p, ad, 4) for i, (p, ad) in enumerate(zip(PROMPTS, ["a", "b", None, "c", "a"]))]
    for request, _ in requests:
        engine.admit(request)
    engine.step()
    assert all(len(sink.tokens) == 1 for _, sink in requests)  # every prompt prefilled together
    run_engine(engine, {})
    for (request, sink), ad in zip(requests, ["a", "b", None, "c", "a"]):
        assert sink.tokens == expected(ad, request.prompt_ids, 4)


def _check_bf16_against_peft(base, adapters, plan, requests, n=16):
    """Each request's n greedy tokens against peft's bf16 logits on the same tokens, within twice
    the largest gap between peft's own bf16 and fp32 logits (see the test below)."""
    ties = steps = 0
    for (prompt, adapter), (_, sink) in zip(plan, requests):
        assert len(sink.tokens) == n
        folder = adapters[adapter] if adapter else None
        bf16 = reference_logits(base, folder, prompt + sink.tokens, dtype=torch.bfloat16)
        noise = float((bf16 - reference_logits(base, folder, prompt + sink.tokens)).abs().max())
        ties += check_greedy_within(bf16, len(prompt), sink.tokens, tol=max(2 * noise, 1e-3))
        steps += n
    assert steps - ties >= steps // 4  # not vacuous: many steps have a clear winner (the tiny random model's logits are flat)


@pytest.mark.parametrize(
    "budget, fold, kernel",
    [(9, False, True), (9, True, True), (64, True, True), (64, True, False)],
    ids=["small-steps-unfolded", "small-steps-folded", "folded-shrink", "folded-shrink-gemm-expand"],
)
def test_bf16_engine_agrees_with_peft_in_bf16(tiny_base, adapters, budget, fold, kernel, monkeypatch):
    """Mixed prefill+decode steps at bf16 (counted, so the coverage cannot silently vanish).
    At bf16 the engine and peft round differently (fused LoRA, another summation order), so
    tokens are checked against peft's bf16 logits with a tolerance (see check_greedy_within).
    The tolerance is measured, not guessed: twice the largest gap between peft's own bf16 and
    fp32 logits on the same tokens (two bf16 computations each within that noise of the exact
    value are within twice of each other). Once with 9-token steps and the fold off (the
    small-step LoRA paths, fp32 on bf16 rows), once with 64-token steps adding LoRA through the
    shrink folded into the base GEMMs (counted), their expand by the C kernel where it builds
    (counted) and once by the masked GEMM."""
    from loraplex.server.engine import expand_kernel, lora

    monkeypatch.setitem(lora.FOLD_A, "enabled", fold)
    engine = _engine(tiny_base, adapters, dtype=torch.bfloat16, max_batch_size=8, max_num_batched_tokens=budget, lora_expand="kernel" if kernel else "gemm")
    assert engine.lean.settle()  # the A rows folded (on a background thread) before the first step
    plan = [(PROMPTS[0], "a"), (PROMPTS[2], "b"), (LONG, "c"), (PROMPTS[1], None), (PROMPTS[4], "a")]
    requests = [_request(str(i), p, ad, 16) for i, (p, ad) in enumerate(plan)]
    mixed_steps = []  # steps whose one forward held decode rows AND prefill chunks (issue #15)
    plan_step = engine._plan_step

    def counting_plan():
        decode, chunks = plan_step()
        if decode and chunks:
            mixed_steps.append((len(decode), [n for _, n in chunks]))
        return decode, chunks

    engine._plan_step = counting_plan
    run_engine(engine, {0: [r for r, _ in requests[:3]], 2: [r for r, _ in requests[3:]]})
    assert len(mixed_steps) >= (3 if budget < 16 else 1), mixed_steps  # the long prompt's chunks and the late arrivals beside decoding rows
    _check_bf16_against_peft(tiny_base, adapters, plan, requests)
    from loraplex.server.engine.lora import pack_weight

    folded = sum(fused.shrink.uses for layer in engine.lean.layers for fused in layer.fused if fused.shrink is not None)
    can_fold = pack_weight(torch.zeros(2, 2, dtype=torch.bfloat16)) is not None  # oneDNN bf16 prepacking on this CPU build
    assert (folded > 0) == (fold and can_fold), folded
    by_kernel = sum(fused.shrink.kernel_uses for layer in engine.lean.layers for fused in layer.fused if fused.shrink is not None)
    assert (by_kernel > 0) == (fold and can_fold and kernel and expand_kernel.available()), (by_kernel, expand_kernel.why_not())
    if fold and can_fold:
        assert engine.lean.expand_reason.startswith("C kernel" if kernel and expand_kernel.available() else "masked GEMM"), engine.lean.expand_reason


def test_an_unknown_lora_expand_is_refused_naming_the_value(tiny_base):
    with pytest.raises(ValueError, match="'fast'"):
        _engine(tiny_base, {}, dtype=torch.bfloat16, lora_expand="fast")


def test_cancel_and_stop_tokens_free_rows(tiny_base, adapters, expected):
    engine = _engine(tiny_base, adapters, max_batch_size=4)
    long_req, long_sink = _request("long", PROMPTS[0], "a", n=50)
    engine.admit(long_req)
    engine.step()
    reference = expected("b", PROMPTS[1], 20)
    j = next(i for i in range(1, 20) if reference[i] not in reference[:i])  # first token not seen before
    stop_req = EngineRequest("stop", PROMPTS[1], "b", SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(reference[j],)), Collector())
    engine.admit(stop_req)
    for _ in range(j + 1):
        engine.step()
    assert stop_req.emit.tokens == reference[:j] and stop_req.emit.finish == "stop"
    assert engine.num_running == 1
    long_req.cancelled = True
    engine.step()
    assert long_sink.finish == "cancelled" and engine.num_running == 0
    assert engine.stats().kv_used_tokens == 0 and engine.kv.used_slots == set()


def test_unloading_an_adapter_in_use_is_refused(tiny_base, adapters):
    engine = _engine(tiny_base, adapters)
    request, _ = _request("x", PROMPTS[0], "a")
    engine.admit(request)  # admitted, not yet prefilled: already in use
    with pytest.raises(RuntimeError, match="still in use"):
        engine.remove_adapter("a")
    engine.step()
    with pytest.raises(RuntimeError, match="still in use"):
        engine.set_adapters([])


def test_removing_an_adapter_whose_rows_were_cancelled_succeeds(tiny_base, adapters):
    """The service cancels a row on a stop string or a disconnect and may unload at once; the
    cancelled row must not block the unload."""
    engine = _engine(tiny_base, adapters)
    request, sink = _request("x", PROMPTS[0], "a")
    engine.admit(request)
    engine.step()
    request.cancelled = True
    engine.remove_adapter("a")
    assert sink.finish == "cancelled" and engine.num_running == 0 and "a" not in engine.resident_adapters


def test_slots_are_reused_without_disturbing_running_rows(tiny_base, adapters, expected, tmp_path):
    model = _model(tiny_base)
    load = _load(model, tiny_base)
    engine = Engine(model, eos_token_ids=[2], max_batch_size=8)
    engine.add_adapter(load("a", adapters["a"]))
    engine.add_adapter(load("c", adapters["c"]))  # rank 2, all modules
    running, running_sink = _request("r", PROMPTS[2], "c")
    engine.admit(running)
    engine.step()
    engine.remove_adapter("a")  # frees slot 1 while "c" is mid-request
    engine.add_adapter(load("b", adapters["b"]))  # rank 8 on q/v: reuses slot 1
    big = make_random_adapter(tiny_base, tmp_path / "big", seed=9, r=16)
    for i in range(4):  # more adapters while "c" keeps decoding, some written from "another thread"'s path
        payload = load(f"x{i}", big)
        if i % 2:
            assert engine.try_add_adapter_in_place(payload)
        else:
            engine.add_adapter(payload)
        engine.step()
    assert engine.slot_table.slot_of("b") == 1 and engine.slot_table.slot_of("x3") == 6
    assert not engine.try_add_adapter_in_place(load("b", adapters["b"]))  # resident: replacing is the engine thread's job
    late, late_sink = _request("late", PROMPTS[3], "b")
    big_req, big_sink = _request("big", PROMPTS[1], "x2")
    engine.admit(late)
    engine.admit(big_req)
    run_engine(engine, {})
    assert running_sink.tokens == expected("c", PROMPTS[2])
    assert late_sink.tokens == expected("b", PROMPTS[3])
    big_oracle = cached_oracle(tiny_base, {"x2": big}, N_TOKENS)
    assert big_sink.tokens == big_oracle("x2", PROMPTS[1])


def test_payloads_of_another_kind_or_without_weights_are_refused(tiny_base, adapters):
    from dataclasses import dataclass

    engine = _engine(tiny_base, {})

    @dataclass(frozen=True)
    class OnnxPayload:
        name: str
        kind: str = "onnx"

    with pytest.raises(TypeError, match="'torch' adapter payloads.*'onnx'"):
        engine.add_adapter(OnnxPayload("o"))
    with pytest.raises(TypeError, match="kind 'onnx'"):
        engine.try_add_adapter_in_place(OnnxPayload("o"))
    with pytest.raises(ValueError, match="empty modules"):  # the empty-modules trap: never an empty slot serving base output
        engine.add_adapter(TorchAdapterPayload(name="e", modules={}))
    with pytest.raises(ValueError, match="empty modules"):
        engine.try_add_adapter_in_place(TorchAdapterPayload(name="e", modules={}))
    assert engine.resident_adapters == []


def test_lora_weights_are_stored_once_at_the_served_dtype(tiny_base, adapters):
    """Memory: each adapter costs its own weights at the engine's dtype, only in the layers it
    targets (no padding to a common rank or slot count)."""
    model = _model(tiny_base, torch.bfloat16)
    load = _load(model, tiny_base)
    engine = Engine(model, eos_token_ids=[2])
    payloads = {name: load(name, path) for name, path in adapters.items()}
    for payload in payloads.values():
        engine.add_adapter(payload)
    exact = sum((w.a.numel() + w.b.numel()) * 2 for p in payloads.values() for w in p.modules.values())
    assert engine.lora_bytes == exact
    engine.remove_adapter("b")
    assert engine.lora_bytes == exact - sum((w.a.numel() + w.b.numel()) * 2 for w in payloads["b"].modules.values())


def test_admission_errors_leave_the_engine_unchanged(tiny_base, adapters):
    engine = _engine(tiny_base, adapters, max_batch_size=1, max_model_len=16)
    with pytest.raises(KeyError):
        engine.admit(_request("x", PROMPTS[0], "nope")[0])
    with pytest.raises(ValueError, match="max_model_len 16"):
        engine.admit(_request("x", list(range(1, 17)), None)[0])
    engine.admit(_request("ok", PROMPTS[0], None)[0])
    with pytest.raises(RuntimeError, match="engine full"):
        engine.admit(_request("y", PROMPTS[1], None)[0])
    assert engine.num_running == 1 and engine.kv.used_slots == {0}


def test_a_failed_forward_ends_everything_and_the_engine_goes_on(tiny_base, adapters, expected):
    engine = _engine(tiny_base, adapters)
    request, sink = _request("x", PROMPTS[0], "a")
    engine.admit(request)
    engine.step()
    engine.fail_all("error")
    assert sink.finish == "error" and engine.num_running == 0 and engine.stats().kv_used_tokens == 0
    again, again_sink = _request("y", PROMPTS[0], "a")
    engine.admit(again)
    run_engine(engine, {})
    assert again_sink.tokens == expected("a", PROMPTS[0])


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory, smol_tokenizer_dir):
    """A tiny random Llama with 32-wide heads (4 heads over 2 kv heads): the decode attention
    kernel's smallest head size (the default tiny base's heads are 16 wide and keep SDPA)."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("wide-llama"), smol_tokenizer_dir, seed=4, hidden=128)


@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
def test_bf16_decode_attention_kernel_agrees_with_peft(wide_base, tmp_path, attention):
    """Mixed decode + prefill steps at bf16 where decode tokens attend through the C kernel
    (counted: it must run exactly when it builds here) or through SDPA, rows of different
    lengths and adapters in one batch, checked against peft's bf16 logits with the measured
    tolerance of the test above. A long prompt arriving late makes rows' lengths differ by
    dozens of positions and crosses the kernel's 64-position softmax blocks."""
    from loraplex.server.engine import attention_kernel

    adapters = {"a": make_random_adapter(wide_base, tmp_path / "a", seed=11), "b": make_random_adapter(wide_base, tmp_path / "b", seed=12, r=8, targets=("q_proj", "v_proj"))}
    engine = _engine(wide_base, adapters, dtype=torch.bfloat16, max_batch_size=8, max_num_batched_tokens=32, decode_attention=attention)
    long_prompt = [1] + list(range(700, 770))  # 71 tokens
    plan = [(PROMPTS[0], "a"), (PROMPTS[2], "b"), (PROMPTS[1], None), (long_prompt, "a")]
    requests = [_request(str(i), p, ad, 16) for i, (p, ad) in enumerate(plan)]
    run_engine(engine, {0: [r for r, _ in requests[:3]], 3: [requests[3][0]]})
    _check_bf16_against_peft(wide_base, adapters, plan, requests)
    uses_kernel = attention == "kernel" and attention_kernel.available()
    assert (engine.kv.kernel_calls > 0) == uses_kernel, (engine.kv.kernel_calls, engine.attention_reason)
    assert engine.attention_reason.startswith("C kernel" if uses_kernel else "SDPA"), engine.attention_reason
    from loraplex.server.engine import pointwise_kernel

    assert engine.lean.pointwise == pointwise_kernel.available(), engine.lean.pointwise_reason  # the element-wise kernels ran in these steps where they build


def test_an_unknown_decode_attention_is_refused_naming_the_value(tiny_base):
    with pytest.raises(ValueError, match="'flash'"):
        _engine(tiny_base, {}, dtype=torch.bfloat16, decode_attention="flash")


def test_the_decode_attention_reason_names_a_head_size_the_kernel_does_not_take(tiny_base):
    """The default tiny base has 16-wide heads: its bf16 engine logs SDPA and says why, and never
    builds the kernel's per-step tables."""
    engine = _engine(tiny_base, {}, dtype=torch.bfloat16)
    assert engine.attention_reason.startswith("SDPA (the C kernel takes head sizes"), engine.attention_reason
    assert "4 heads of 16 over 2" in engine.attention_reason
    assert not engine.kv.decode_kernel
