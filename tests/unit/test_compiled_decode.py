"""The compiled one-row decode step (server/engine/compiled_decode.py, ``--compile-decode``) on
the int4 test model: compiled in the background on first use, then serving single streams with an
adapter and on the bare base, checked against peft at bf16 like the eager int4 path; never used
for steps of several rows; off, with the reason, where it cannot run."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.compiled_decode import why_not_available
from loraplex.server.engine.int4 import available
from tests.oracle import check_greedy_within, greedy_request, make_random_adapter, reference_logits, run_engine
from tests.unit.test_int4_decode import int4_base  # noqa: F401 (the fixture)
from tests.unit.test_llama_forward import _engine

pytestmark = [
    pytest.mark.skipif(not available(), reason="this torch has no int4 weight-only CPU kernel"),
    pytest.mark.skipif(why_not_available() is not None, reason=f"torch.compile cannot run here: {why_not_available()}"),
]

PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7, 6, 5], [1, 77, 4000, 12]]


def test_single_streams_use_the_compiled_step_and_agree_with_peft(int4_base, tmp_path):  # noqa: F811
    adapter = make_random_adapter(int4_base, tmp_path / "a", seed=21)
    other = make_random_adapter(int4_base, tmp_path / "b", seed=22)  # same rank and targets: the same compiled signature
    engine = _engine(int4_base, {"a": adapter, "b": other}, dtype=torch.bfloat16, int4_decode_rows=4, compile_decode=True)
    assert engine.lean.compile_reason.startswith("on"), engine.lean.compile_reason
    step = engine.lean.one_row
    for name in ("a", None):  # the first one-row steps queue the compiles and run eagerly
        request, sink = greedy_request(f"warm-{name}", PROMPTS[2], name, 3)
        run_engine(engine, {0: [request]})
        assert len(sink.tokens) == 3
    assert step.settle(timeout=900), "the background compile did not finish"
    assert step.ready == 2 and not step._broken  # one signature with the adapter's rows, one without

    used = []
    original = type(engine.lean)._one_row_step
    type(engine.lean)._one_row_step = lambda self, *a: (lambda out: (used.append(out is not None), out)[1])(original(self, *a))
    try:
        checked = ties = 0
        for prompt, name in ((PROMPTS[0], "a"), (PROMPTS[1], None)):
            used.clear()
            request, sink = greedy_request(f"s-{name}", prompt, name, 12)
            run_engine(engine, {0: [request]})
            assert len(used) == 11 and all(used), used  # every decode step after the prefill ran compiled
            adapter_dir = adapter if name else None
            bf16 = reference_logits(int4_base, adapter_dir, prompt + sink.tokens, dtype=torch.bfloat16)
            noise = float((bf16 - reference_logits(int4_base, adapter_dir, prompt + sink.tokens)).abs().max())
            ties += check_greedy_within(bf16, len(prompt), sink.tokens, tol=max(2 * noise, 1e-3))
            checked += len(sink.tokens)
        assert checked - ties >= checked // 4

        used.clear()  # two streams at once: two-row steps, never the compiled step
        both = [greedy_request("m0", PROMPTS[0], "a", 6), greedy_request("m1", PROMPTS[1], None, 6)]
        run_engine(engine, {0: [r for r, _ in both]})
        assert not used and all(len(sink.tokens) == 6 for _, sink in both)

        # a short stream in KV row 0 and a long one on the other adapter in row 1: once the short
        # one ends, the long one decodes alone from row 1, its cache growing past 128 positions
        # (buffers reallocated, attention lengths 16 .. 256) on the same compiled step
        used.clear()
        short, _ = greedy_request("short", PROMPTS[0], "a", 2)
        long, long_sink = greedy_request("long", PROMPTS[1], "b", 140)
        long.logprobs = 0  # each token's logprob, checked below
        run_engine(engine, {0: [short, long]})
        assert engine.kv.len_cap > 128 and len(long_sink.tokens) == 140
        assert len(used) >= 130 and all(used), used.count(False)
        # every step's chosen-token logprob against peft's, teacher-forced on the same tokens (the
        # tiny model's long continuations are near-ties, so token checks alone would say little)
        ids = PROMPTS[1] + long_sink.tokens
        bf16 = torch.log_softmax(reference_logits(int4_base, other, ids, dtype=torch.bfloat16), dim=-1)
        fp32 = torch.log_softmax(reference_logits(int4_base, other, ids), dim=-1)
        start = len(PROMPTS[1]) - 1
        for a in range(0, 140, 28):  # windows of 28 tokens, each against its own bf16 noise
            rows = torch.arange(start + a, start + a + 28)
            chosen = torch.tensor(long_sink.tokens[a : a + 28])
            noise = float((bf16 - fp32)[rows, chosen].abs().max())
            got = torch.tensor([lp.logprob for lp in long_sink.logprobs[a : a + 28]])
            error = float((got - bf16[rows, chosen]).abs().max())
            assert error <= max(4 * noise, 5e-2), (a, error, noise)
        assert step.ready == 2 and not step._broken
    finally:
        type(engine.lean)._one_row_step = original


def test_compiled_decode_is_off_unless_asked_and_possible(tiny_base, int4_base):  # noqa: F811
    assert _engine(int4_base, {}, dtype=torch.bfloat16, int4_decode_rows=4).lean.compile_reason == "off"
    off = _engine(tiny_base, {}, dtype=torch.bfloat16, compile_decode=True).lean
    assert off.one_row is None and off.compile_reason.startswith("off (it runs on the int4 decode GEMMs, which are off")


def test_a_server_of_one_row_still_compiles_its_step(int4_base):  # noqa: F811
    """--max-batch-size 1: the cache keeps 2 rows so the compiled step's dynamic row count is
    never 1 (torch.compile specializes sizes of 1, which would refuse every step)."""
    from transformers import AutoModelForCausalLM

    from loraplex.server.engine.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(str(int4_base), dtype=torch.bfloat16).eval()
    engine = Engine(model, eos_token_ids=[2], max_batch_size=1, int4_decode_rows=4, compile_decode=True)
    request, _ = greedy_request("warm", PROMPTS[2], None, 3)
    run_engine(engine, {0: [request]})
    assert engine.lean.one_row.settle(timeout=900) and engine.lean.one_row.ready == 1
    used = []
    original = type(engine.lean)._one_row_step
    type(engine.lean)._one_row_step = lambda self, *a: (lambda out: (used.append(out is not None), out)[1])(original(self, *a))
    try:
        request, sink = greedy_request("one", PROMPTS[0], None, 6)
        run_engine(engine, {0: [request]})
    finally:
        type(engine.lean)._one_row_step = original
    assert len(sink.tokens) == 6 and used and all(used) and not engine.lean.one_row._broken
