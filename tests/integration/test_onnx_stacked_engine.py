"""The onnx backend's mixed-adapter batch engine (model.stacked.onnx on an onnxruntime session,
driven directly through the engine protocol, admit/step, as the scheduler does): rows of
different adapters and prompt lengths are prefilled together and decode in one forward while
rows join and leave, with the KV cache written in place (the buffers are never reallocated);
slots are reused by smaller ranks and the stacks grow all-or-nothing; every sequence equals
peft's PeftModel with its single adapter (tests/oracle.py)."""

from __future__ import annotations

import pytest

from loraplex.server.cli import main as loraplex_main
from tests.oracle import greedy_request, make_random_adapter, reference_greedy

PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404], [1, 77], [1, 5000, 6000, 7000, 12, 13, 14, 15], [1, 12, 13]]


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("stacked")
    adapters = {
        "r8": make_random_adapter(tiny_base, root / "r8", seed=51, r=8),
        "r2": make_random_adapter(tiny_base, root / "r2", seed=52, r=2, targets=("q_proj", "o_proj", "up_proj")),
        "r4": make_random_adapter(tiny_base, root / "r4", seed=53, r=4),
        "r1": make_random_adapter(tiny_base, root / "r1", seed=54, r=1, targets=("v_proj",)),
    }
    model = root / "model"
    assert loraplex_main(["export-onnx", "--base", str(tiny_base), "--adapter_paths", ",".join(str(p) for p in adapters.values()),
                          "--output_path", str(model), "--precision", "fp32"]) == 0
    return model, adapters


def _engine(model, **kw):
    from loraplex.server.onnx.stacked import StackedOnnxEngine

    return StackedOnnxEngine(model, "model.stacked.onnx", eos_token_ids=[], max_batch_size=kw.get("max_batch_size", 8), max_model_len=256)


def _arrays(model, name):
    from loraplex.server.store.onnx_adapter import read_onnx_adapter

    return read_onnx_adapter(model / f"{name}.onnx_adapter")


def _request(i, adapter, prompt, n):
    return greedy_request(f"r{i}", prompt, adapter, n)


def _run(engine, arrivals):
    """arrivals: step -> requests admitted before that step; steps until all finish."""
    step = 0
    while step in arrivals or engine.num_running or any(s > step for s in arrivals):
        for request in arrivals.get(step, []):
            engine.admit(request)
        if engine.num_running:
            engine.step()
        step += 1


def _add(engine, name, arrays):
    engine.add_adapter_arrays(name, arrays)


def test_mixed_batch_with_joins_and_leaves_matches_peft(setup, tiny_base):
    model, adapters = setup
    from loraplex.server.onnx.engine import OnnxAdapterPayload

    engine = _engine(model)
    for name in ("r8", "r2", "r4"):  # through the protocol's payload (the file read by the engine)
        engine.add_adapter(OnnxAdapterPayload(name=name, path=model / f"{name}.onnx_adapter"))
    buffers = [(id(b), b.ctypes.data) for b in engine.kv]
    plan = [("r8", 0, 6), ("r2", 0, 12), (None, 1, 9), ("r4", 3, 12), ("r8", 3, 5), ("r2", 7, 10)]
    arrivals, sinks = {}, []
    for i, (adapter, step, n) in enumerate(plan):
        request, sink = _request(i, adapter, PROMPTS[i], n)
        arrivals.setdefault(step, []).append(request)
        sinks.append(sink)
    _run(engine, arrivals)
    assert engine.peak_batch_size >= 4  # rows of different adapters really shared forwards
    for i, (adapter, _, n) in enumerate(plan):
        assert sinks[i].finish == "length"
        assert sinks[i].tokens == reference_greedy(tiny_base, adapters[adapter] if adapter else None, PROMPTS[i], n=n), plan[i]
    from loraplex.server.engine.protocol import Engine

    assert isinstance(engine, Engine) and engine.payload_kind == "onnx"
    assert engine.num_running == 0 and engine.stats().kv_used_tokens == 0  # everything left
    assert [(id(b), b.ctypes.data) for b in engine.kv] == buffers  # KV written in place: never reallocated


def test_a_burst_is_prefilled_together_within_the_token_budget(setup, tiny_base, monkeypatch):
    """Six prompts of different lengths admitted at once: one prefill forward for all of them
    (right-padded), then decode; with a budget of 12 tokens they are split into several forwards."""
    model, adapters = setup
    for budget, forwards in ((512, 1), (12, 4)):
        engine = _engine(model)
        engine.max_num_batched_tokens = budget
        for name in ("r8", "r2", "r4"):
            engine.add_adapter_arrays(name, _arrays(model, name))
        prefills = []
        run = engine._run
        monkeypatch.setattr(engine, "_run", lambda rows, ids, mask, slots: (prefills.append(ids.shape) if ids.shape[1] > 1 else None, run(rows, ids, mask, slots))[1])
        plan = [("r8", 8), ("r2", 6), (None, 5), ("r4", 9), ("r8", 4), ("r2", 7)]
        sinks, requests = [], []
        for i, (adapter, n) in enumerate(plan):
            request, sink = _request(i, adapter, PROMPTS[i], n)
            requests.append(request)
            sinks.append(sink)
        _run(engine, {0: requests})
        assert len(prefills) == forwards, prefills
        assert all(rows * width <= budget or rows == 1 for rows, width in prefills)
        for i, (adapter, n) in enumerate(plan):
            assert sinks[i].finish == "length"
            assert sinks[i].tokens == reference_greedy(tiny_base, adapters[adapter] if adapter else None, PROMPTS[i], n=n), (budget, plan[i])


def test_slot_reuse_by_a_smaller_rank_and_growth(setup, tiny_base):
    model, adapters = setup
    engine = _engine(model)
    engine.add_adapter_arrays("r8", _arrays(model, "r8"))
    slot = engine.slot_table.slot_of("r8")
    engine.remove_adapter("r8")
    engine.add_adapter_arrays("r1", _arrays(model, "r1"))  # takes r8's slot: no stale rank-8 columns may remain
    assert engine.slot_table.slot_of("r1") == slot
    for name in ("r2", "r4", "r8"):  # more adapters than the first capacity: stacks grow
        engine.add_adapter_arrays(name, _arrays(model, name))
    assert engine.num_slots > 3
    plan = [("r1", PROMPTS[0]), ("r8", PROMPTS[1]), ("r2", PROMPTS[2]), ("r4", PROMPTS[3])]
    arrivals, sinks = {0: []}, []
    for i, (adapter, prompt) in enumerate(plan):
        request, sink = _request(i, adapter, prompt, 8)
        arrivals[0].append(request)
        sinks.append(sink)
    _run(engine, arrivals)
    for (adapter, prompt), sink in zip(plan, sinks):
        assert sink.tokens == reference_greedy(tiny_base, adapters[adapter], prompt, n=8), adapter


def test_busy_adapter_cannot_be_removed_and_cancel_frees_the_row(setup):
    model, _ = setup
    engine = _engine(model)
    engine.add_adapter_arrays("r4", _arrays(model, "r4"))
    request, sink = _request(0, "r4", PROMPTS[0], 50)
    engine.admit(request)
    engine.step()
    with pytest.raises(RuntimeError, match="still in use"):
        engine.remove_adapter("r4")
    request.cancelled = True
    engine.remove_adapter("r4")  # the cancelled row leaves first, then the slot is freed
    assert sink.finish == "cancelled" and engine.num_running == 0 and "r4" not in engine.resident_adapters
    with pytest.raises(ValueError, match="no LoRA input"):
        engine.add_adapter_arrays("bad", {"model.layers.9.attn.q_proj.lora_A.weight": _arrays(model, "r4")["model.layers.0.attn.q_proj.lora_A.weight"]})


def test_a_failed_install_leaves_the_engine_as_it_was(setup, tiny_base, monkeypatch):
    """Out of memory while the stacks grow: nothing changes, and the next install works."""
    import numpy

    import loraplex.server.onnx.stacked as stacked

    model, adapters = setup
    engine = _engine(model)
    engine.add_adapter_arrays("r2", _arrays(model, "r2"))
    while engine.slot_table.free:  # fill every slot, so the next install must grow the stacks
        engine.add_adapter_arrays(f"fill{len(engine.slot_table.free)}", _arrays(model, "r1"))
    before = {name: s.array.shape for name, s in engine.stacks.items()}
    slots_before, ranks_before = dict(engine.slot_table.slots), dict(engine.store.ranks)
    capacity_before = engine.slot_table.capacity

    class OutOfMemory:  # numpy whose 6th allocation fails: midway through growing the stacks
        calls = 0

        def __getattr__(self, name):
            return getattr(numpy, name)

        def zeros(self, *args, **kwargs):
            OutOfMemory.calls += 1
            if OutOfMemory.calls > 5:
                raise MemoryError("simulated")
            return numpy.zeros(*args, **kwargs)

    monkeypatch.setattr(stacked, "np", OutOfMemory())
    with pytest.raises(MemoryError):
        engine.add_adapter_arrays("r8", _arrays(model, "r8"))
    monkeypatch.undo()
    assert {name: s.array.shape for name, s in engine.stacks.items()} == before
    assert engine.slot_table.slots == slots_before and engine.store.ranks == ranks_before and not engine.slot_table.free
    assert engine.slot_table.capacity == capacity_before
    engine.add_adapter_arrays("r8", _arrays(model, "r8"))
    request, sink = _request(0, "r8", PROMPTS[0], 6)
    other, other_sink = _request(1, "r2", PROMPTS[1], 6)
    _run(engine, {0: [request, other]})
    assert sink.tokens == reference_greedy(tiny_base, adapters["r8"], PROMPTS[0], n=6)
    assert other_sink.tokens == reference_greedy(tiny_base, adapters["r2"], PROMPTS[1], n=6)


def test_a_write_failing_midway_takes_no_slot_and_leaves_it_zero(setup, tiny_base):
    """A tensor of the wrong shape deep in the file: the stacks written before it are zeroed
    again, the slot stays free, and an in-place install fails the same way."""
    import numpy

    model, adapters = setup
    engine = _engine(model)
    engine.add_adapter_arrays("r2", _arrays(model, "r2"))
    good = _arrays(model, "r4")

    def broken(arrays):  # the last tensor has 3 columns too many: broadcasting fails mid-write
        arrays = dict(arrays)
        last = sorted(arrays)[-1]
        arrays[last] = numpy.zeros((arrays[last].shape[0], arrays[last].shape[1] + 3), numpy.float32)
        return arrays

    free_before, slots_before = engine.slot_table.free, dict(engine.slot_table.slots)
    shapes_before = {name: s.array.shape for name, s in engine.stacks.items()}
    # the engine-thread install (grows the ranks first), then an in-place one (r2's ranks fit)
    for install in (lambda: engine.add_adapter_arrays("bad", broken(good)), lambda: engine.slot_table.try_add_in_place("bad", broken(_arrays(model, "r2")))):
        with pytest.raises(ValueError):
            install()
        assert engine.slot_table.free == free_before and dict(engine.slot_table.slots) == slots_before
        assert {name: s.array.shape for name, s in engine.stacks.items()} == shapes_before
        assert all(not s.array[free_before[0]].any() for s in engine.stacks.values())  # nothing left behind
    engine.add_adapter_arrays("r4", good)
    assert engine.slot_table.slot_of("r4") == free_before[0]
    request, sink = _request(0, "r4", PROMPTS[2], 6)
    _run(engine, {0: [request]})
    assert sink.tokens == reference_greedy(tiny_base, adapters["r4"], PROMPTS[2], n=6)
