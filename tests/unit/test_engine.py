"""Engine correctness against an independent reference: peft's PeftModel with one adapter,
greedy, recomputing the whole sequence each step (no KV cache). Mixed batches, joins and leaves."""

from __future__ import annotations

import pytest

from loraplex.server.basemodel import compute_fingerprint
from loraplex.server.engine.engine import Engine, EngineRequest
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.registry import BaseShapes, load_validated_adapter
from tests.oracle import Collector, greedy_request, make_random_adapter, reference_greedy

N_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-adapters")
    return {
        "a": make_random_adapter(tiny_base, root / "a", seed=1),
        "b": make_random_adapter(tiny_base, root / "b", seed=2, r=8, targets=("q_proj", "v_proj")),
        "c": make_random_adapter(tiny_base, root / "c", seed=3, r=2),
    }


def _engine(tiny_base, adapters, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    shapes = BaseShapes.from_model(model, compute_fingerprint(tiny_base))
    engine = Engine(model, eos_token_ids=[2], **kwargs)
    validated = [(name, load_validated_adapter(path, name, shapes, max_lora_rank=64).modules) for name, path in adapters.items()]
    engine.set_adapters(validated)
    return engine


def _request(rid, prompt, adapter, n=N_TOKENS):
    return greedy_request(rid, prompt, adapter, n)


PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404, 405, 406], [1, 77], [1, 5000, 6000, 7000]]


def test_mixed_batch_with_joins_equals_peft_single_adapter(tiny_base, adapters):
    engine = _engine(tiny_base, adapters, max_batch_size=8)
    plan = [(PROMPTS[0], "a"), (PROMPTS[1], None), (PROMPTS[2], "b"), (PROMPTS[3], "c"), (PROMPTS[4], "a")]
    sinks = []
    # requests join at different steps: 2 at once, then one every decode step
    for i, (prompt, adapter) in enumerate(plan):
        request, sink = _request(str(i), prompt, adapter)
        sinks.append(sink)
        engine.prefill(request)
        if i >= 1:
            engine.decode()
    while engine.num_running:
        engine.decode()
    assert engine.peak_batch_size >= 4
    for (prompt, adapter), sink in zip(plan, sinks):
        expected = reference_greedy(tiny_base, adapters[adapter] if adapter else None, prompt)
        assert sink.tokens == expected, (adapter, prompt)
        assert sink.finish == "length"
    # adapters really differ from each other and from the base on the same prompt
    outs = {name: tuple(reference_greedy(tiny_base, adapters.get(name), PROMPTS[0])) for name in ("a", "b", "c", None)}
    assert len(set(outs.values())) == 4


def test_cancel_and_stop_tokens_free_rows(tiny_base, adapters):
    engine = _engine(tiny_base, adapters, max_batch_size=4)
    long_req, long_sink = _request("long", PROMPTS[0], "a", n=50)
    engine.prefill(long_req)
    expected = reference_greedy(tiny_base, adapters["b"], PROMPTS[1], n=20)
    j = next(i for i in range(1, 20) if expected[i] not in expected[:i])  # first token not seen before
    stop_req = EngineRequest("stop", PROMPTS[1], "b", SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(expected[j],)), Collector())
    engine.prefill(stop_req)
    for _ in range(j):
        engine.decode()
    assert stop_req.emit.tokens == expected[:j] and stop_req.emit.finish == "stop"
    assert engine.num_running == 1
    long_req.cancelled = True
    engine.decode()
    assert long_sink.finish == "cancelled" and engine.num_running == 0 and engine.batch is None


def test_unloading_an_adapter_in_use_is_refused(tiny_base, adapters):
    engine = _engine(tiny_base, adapters)
    request, _ = _request("x", PROMPTS[0], "a")
    engine.prefill(request)
    with pytest.raises(RuntimeError, match="still in use"):
        engine.set_adapters([])


def test_slots_are_reused_and_grow_without_disturbing_running_rows(tiny_base, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    shapes = BaseShapes.from_model(model, compute_fingerprint(tiny_base))
    engine = Engine(model, eos_token_ids=[2], max_batch_size=8)
    load = lambda name, path: load_validated_adapter(path, name, shapes, max_lora_rank=64).modules  # noqa: E731
    engine.add_adapter("a", load("a", adapters["a"]))
    engine.add_adapter("c", load("c", adapters["c"]))  # rank 2, all modules
    running, running_sink = _request("r", PROMPTS[2], "c")
    engine.prefill(running)
    engine.decode()
    engine.remove_adapter("a")  # frees slot 1 while "c" is mid-request
    engine.add_adapter("b", load("b", adapters["b"]))  # rank 8 on q/v: reuses slot 1 and grows the rank
    big = make_random_adapter(tiny_base, tmp_path / "big", seed=9, r=16)
    for i in range(4):  # more adapters than the initial capacity: stacks double while "c" keeps decoding
        engine.add_adapter(f"x{i}", load(f"x{i}", big))
        engine.decode()
    assert engine.slot_table.slot_of("b") == 1 and engine.slot_table.slot_of("x3") == 6
    late, late_sink = _request("late", PROMPTS[3], "b")
    engine.prefill(late)
    while engine.num_running:
        engine.decode()
    assert running_sink.tokens == reference_greedy(tiny_base, adapters["c"], PROMPTS[2], n=N_TOKENS)
    assert late_sink.tokens == reference_greedy(tiny_base, adapters["b"], PROMPTS[3], n=N_TOKENS)


def test_removing_an_adapter_whose_rows_were_cancelled_succeeds(tiny_base, adapters):
    """The service cancels a row on a stop string or a disconnect and may unload at once; the
    cancelled row must not block the unload."""
    engine = _engine(tiny_base, adapters)
    request, sink = _request("x", PROMPTS[0], "a")
    engine.prefill(request)
    request.cancelled = True
    engine.remove_adapter("a")
    assert sink.finish == "cancelled" and engine.num_running == 0 and "a" not in engine.slot_table.slots


def test_in_place_add_only_when_it_fits_and_is_correct(tiny_base, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    shapes = BaseShapes.from_model(model, compute_fingerprint(tiny_base))
    engine = Engine(model, eos_token_ids=[2], max_batch_size=8)
    load = lambda name, path: load_validated_adapter(path, name, shapes, max_lora_rank=64).modules  # noqa: E731
    assert not engine.add_adapter_in_place("a", load("a", adapters["a"]))  # no stacks yet: needs the engine path
    engine.add_adapter("a", load("a", adapters["a"]))  # slot 1, capacity 2, rank 4
    engine.add_adapter("b", load("b", adapters["b"]))  # slot 2: capacity grows to 4, rank 8 on q/v
    running, running_sink = _request("r", PROMPTS[0], "a")
    engine.prefill(running)
    engine.decode()
    assert engine.add_adapter_in_place("c", load("c", adapters["c"]))  # slot 3 fits (rank 2 <= every layer's rank)
    assert not engine.add_adapter_in_place("big", load("big", make_random_adapter(tiny_base, tmp_path / "big", seed=5, r=16)))
    late, late_sink = _request("late", PROMPTS[1], "c")
    engine.prefill(late)
    while engine.num_running:
        engine.decode()
    assert running_sink.tokens == reference_greedy(tiny_base, adapters["a"], PROMPTS[0], n=N_TOKENS)
    assert late_sink.tokens == reference_greedy(tiny_base, adapters["c"], PROMPTS[1], n=N_TOKENS)
