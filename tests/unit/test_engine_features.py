"""Per-request engine features (issue #11) on the torch engine, each against an independent
reference: logprobs and prompt logprobs (echo) against a full forward of peft's PeftModel with the
adapter (fp32 and bf16), n > 1 forks against separate requests (greedy: the peft oracle; seeded:
the same seeds as separate requests) with the prompt prefilled once, structured-output
constraints (masks, accept, terminate) in batches with free rows, and weighted adapter mixes
against peft's ``add_weighted_adapter(combination_type="cat")``, batched with single-adapter and
base rows. Small token budgets make prompts arrive in chunks beside decoding rows."""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.server.basemodel import compute_fingerprint
from loraplex.server.engine.engine import Engine, EngineRequest, TorchAdapterPayload
from loraplex.server.engine.rows import ALL_FEATURES, RowEngine
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.registry import BaseShapes, load_validated_adapter
from loraplex.server.scheduler import Scheduler
from tests.oracle import (
    Collector,
    cached_oracle,
    check_greedy_within,
    greedy_with,
    reference_logits,
    reference_mix_model,
    run_engine,
    two_adapters,
)

N = 8
PROMPT = [1, 520, 3000, 44, 17, 900, 12]
OTHER = [1, 9, 8, 7]
LONGER = [1, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410]
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    return two_adapters(tiny_base, tmp_path_factory.mktemp("feature-adapters"))


@pytest.fixture(scope="module")
def expected(tiny_base, adapters):
    return cached_oracle(tiny_base, adapters, N)


def _engine(tiny_base, adapters, dtype=torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=dtype).eval()
    shapes = BaseShapes.from_model(model, compute_fingerprint(tiny_base))  # before the engine wraps the Linears
    payloads = [TorchAdapterPayload(name=n, modules=load_validated_adapter(p, n, shapes, max_lora_rank=64).modules) for n, p in adapters.items()]
    engine = Engine(model, eos_token_ids=[2], **kwargs)
    for payload in payloads:
        engine.add_adapter(payload)
    return engine


def _req(rid, prompt, adapter, n=N, **kw):
    sink = Collector()
    fields = {k: kw.pop(k) for k in ("logprobs", "prompt_logprobs", "constraint", "mix", "forks") if k in kw}
    request = EngineRequest(rid, list(prompt), adapter, SamplingParams(max_tokens=n, **{**GREEDY, **kw}), sink, **fields)
    if request.prompt_logprobs is not None:
        request.on_prompt_logprobs = sink.on_prompt_logprobs
    return request, sink




def _ref_logprobs(tiny_base, folder, ids, dtype):
    """log_softmax (fp32) of peft's raw logits at ``dtype`` for every prefix of ``ids``."""
    return torch.log_softmax(reference_logits(tiny_base, folder, ids, dtype=dtype), dim=-1)  # [len, V]


def _check_logprob(got, ref_row, token, k, tol):
    """One TokenLogprob against the reference log-probabilities of that position."""
    assert got.token_id == token
    assert abs(got.logprob - float(ref_row[token])) <= tol, (token, got.logprob, float(ref_row[token]))
    assert len(got.top) == k
    if k:
        best = torch.topk(ref_row, k).values
        values = torch.tensor([v for _, v in got.top])
        assert torch.all(values[:-1] >= values[1:]), "top logprobs best first"
        assert (values - best).abs().max() <= tol  # the k best values (ids may swap inside a near-tie)
        for token_id, value in got.top:
            assert abs(value - float(ref_row[token_id])) <= tol


# ------------------------------------------------------------------ logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_and_prompt_logprobs_equal_a_peft_forward(tiny_base, adapters, dtype):
    """Generated-token and prompt logprobs (top-k included) equal log_softmax of peft's logits
    for the same tokens (teacher-forced), whatever the row's sampling controls (temperature,
    repetition penalty act on sampling only). Prompts arrive in chunks (budget 6, at most 4
    logprob positions per step) beside decoding rows.

    Tolerance: fp32 1e-4 (the engine sums in another order: fused LoRA, chunked attention;
    observed gaps ~1e-6). bf16: measured, twice the largest gap between peft's own bf16 and fp32
    logprobs on the same positions (each bf16 computation is within that noise of the exact
    value), at least 1e-3."""
    engine = _engine(tiny_base, adapters, dtype=dtype, max_batch_size=4, max_num_batched_tokens=6, max_prompt_logprob_tokens=4)
    scored, scored_sink = _req("scored", PROMPT, "a", logprobs=5, prompt_logprobs=3)
    sampled, sampled_sink = _req("sampled", LONGER, "b", logprobs=0, prompt_logprobs=0, temperature=0.8, seed=3, repetition_penalty=1.3, logit_bias=((777, 8.0),))
    plain, plain_sink = _req("plain", OTHER, None)
    run_engine(engine, {0: [plain], 1: [scored, sampled]})
    assert plain_sink.logprobs == [None] * N  # no logprobs asked: the two-argument emit
    assert plain_sink.prompt_logprobs is None
    for request, sink, folder, k_gen, k_prompt in [(scored, scored_sink, adapters["a"], 5, 3), (sampled, sampled_sink, adapters["b"], 0, 0)]:
        prompt = request.prompt_ids
        assert sink.finish == "length" and len(sink.tokens) == N and sink.prompt_calls == 1
        ids = prompt + sink.tokens
        ref = _ref_logprobs(tiny_base, folder, ids, dtype)
        tol = 1e-4
        if dtype != torch.float32:
            tol = max(2 * float((ref - _ref_logprobs(tiny_base, folder, ids, torch.float32)).abs().max()), 1e-3)
        prompt_lps = sink.prompt_logprobs
        assert len(prompt_lps) == len(prompt) and prompt_lps[0] is None
        for j in range(1, len(prompt)):
            _check_logprob(prompt_lps[j], ref[j - 1], prompt[j], k_prompt, tol)
        for i, (token, got) in enumerate(zip(sink.tokens, sink.logprobs)):
            _check_logprob(got, ref[len(prompt) - 1 + i], token, k_gen, tol)
    # not vacuous: the sampled row did not simply take the argmax everywhere
    ref = _ref_logprobs(tiny_base, adapters["b"], LONGER + sampled_sink.tokens, torch.float32)
    argmax = ref[len(LONGER) - 1 : -1].argmax(dim=-1).tolist()
    assert argmax != sampled_sink.tokens


def test_scoring_only_prefills_delivers_and_finishes_with_length(tiny_base, adapters):
    engine = _engine(tiny_base, adapters, max_batch_size=4, max_num_batched_tokens=5, max_prompt_logprob_tokens=3)
    running, running_sink = _req("run", OTHER, "b", n=10)
    score, score_sink = _req("score", PROMPT, "a", n=0, prompt_logprobs=0)
    run_engine(engine, {0: [running], 1: [score]})
    assert score_sink.tokens == [] and score_sink.finish == "length" and score_sink.finishes == 1 and score_sink.prompt_calls == 1
    ref = _ref_logprobs(tiny_base, adapters["a"], PROMPT, torch.float32)
    got = torch.tensor([lp.logprob for lp in score_sink.prompt_logprobs[1:]])
    want = ref[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert (got - want).abs().max() < 1e-4 and all(lp.top == () for lp in score_sink.prompt_logprobs[1:])
    assert running_sink.finish == "length" and len(running_sink.tokens) == 10
    assert engine.kv.used_slots == set()
    with pytest.raises(ValueError, match="max_tokens"):  # 0 tokens without prompt logprobs: nothing to return
        engine.admit(_req("zero", PROMPT, None, n=0)[0])


# --------------------------------------------------------------------- forks


def _group(prompt, adapter, ns, per=None):
    """A primary with forks; ns = max_tokens of each member; per: member index -> its fields."""
    per = per or {}
    members = [_req(f"m{i}", prompt, adapter, n, **per.get(i, {})) for i, n in enumerate(ns)]
    primary = members[0][0]
    primary.forks = tuple(r for r, _ in members[1:])
    return primary, [s for _, s in members]


def test_greedy_forks_equal_separate_requests_and_prefill_the_prompt_once(tiny_base, adapters, expected):
    engine = _engine(tiny_base, adapters, max_batch_size=6, max_num_batched_tokens=4)
    primary, sinks = _group(PROMPT, "a", [N, 5, N], {0: {"logprobs": 1}, 2: {"logprobs": 1}})
    assert primary.rows == 3 and engine.has_capacity(3)
    run_engine(engine, {0: [primary]})
    for sink, n in zip(sinks, [N, 5, N]):
        assert sink.tokens == expected("a", PROMPT, n) and sink.finish == "length" and sink.finishes == 1
    assert sinks[0].logprobs == sinks[2].logprobs  # the same logits for the same tokens
    # the prompt went through the model once; then each row forwards its tokens but the last
    assert engine.tokens_forwarded == len(PROMPT) + (N - 1) + (5 - 1) + (N - 1)
    assert engine.kv.used_slots == set() and engine.num_running == 0


def test_seeded_forks_equal_separate_requests_with_the_same_seeds(tiny_base, adapters):
    seeds = [11, 12, 13]
    params = {i: {"temperature": 1.0, "top_p": 0.95, "seed": s} for i, s in enumerate(seeds)}
    engine = _engine(tiny_base, adapters, max_batch_size=6)
    primary, fork_sinks = _group(LONGER, "b", [N, N, N], params)
    run_engine(engine, {0: [primary]})
    separate = [_req(f"s{i}", LONGER, "b", N, **params[i]) for i in range(3)]
    run_engine(engine, {0: [r for r, _ in separate]})
    assert [s.tokens for s in fork_sinks] == [s.tokens for _, s in separate]
    assert len({tuple(s.tokens) for s in fork_sinks}) > 1  # different seeds really differ


def test_cancelling_one_fork_or_the_primary_leaves_the_others(tiny_base, adapters, expected):
    engine = _engine(tiny_base, adapters, max_batch_size=6, max_num_batched_tokens=3)
    # one fork cancelled mid-decode
    primary, sinks = _group(OTHER, None, [N, N, N])
    engine.admit(primary)
    for _ in range(4):
        engine.step()
    primary.forks[0].cancelled = True
    run_engine(engine, {})
    assert sinks[1].finish == "cancelled" and 0 < len(sinks[1].tokens) < N and sinks[1].finishes == 1
    for sink in (sinks[0], sinks[2]):
        assert sink.tokens == expected(None, OTHER) and sink.finish == "length"
    # the primary cancelled while its prompt is still being prefilled (3 tokens a step)
    before = engine.tokens_forwarded
    primary, sinks = _group(PROMPT, "b", [N, N, 6])
    engine.admit(primary)
    engine.step()
    primary.cancelled = True
    run_engine(engine, {})
    assert sinks[0].finish == "cancelled" and sinks[0].tokens == [] and sinks[0].finishes == 1
    assert sinks[1].tokens == expected("b", PROMPT) and sinks[2].tokens == expected("b", PROMPT, 6)
    assert engine.tokens_forwarded - before == len(PROMPT) + (N - 1) + (6 - 1)
    # everyone cancelled during the prefill: all rows freed, one finish each
    primary, sinks = _group(PROMPT, "a", [N, N])
    engine.admit(primary)
    engine.step()
    primary.cancelled = primary.forks[0].cancelled = True
    run_engine(engine, {})
    assert [s.finish for s in sinks] == ["cancelled", "cancelled"] and all(s.finishes == 1 and not s.tokens for s in sinks)
    assert engine.kv.used_slots == set() and engine.num_running == 0


def test_a_group_needs_a_row_per_fork(tiny_base, adapters):
    engine = _engine(tiny_base, adapters, max_batch_size=3)
    primary, _ = _group(PROMPT, "a", [N, N, N, N])
    assert not engine.has_capacity(primary.rows)
    with pytest.raises(RuntimeError, match="engine full"):
        engine.admit(primary)
    assert engine.num_running == 0 and engine.kv.used_slots == set()
    bad, _ = _group(PROMPT, "a", [N, N])
    bad.forks[0].prompt_ids = OTHER
    with pytest.raises(ValueError, match="must share the prompt"):
        engine.admit(bad)


def test_scheduler_admits_a_group_when_its_rows_are_free_and_spares_forks_of_a_cancelled_primary(tiny_base, adapters, expected):
    engine = _engine(tiny_base, adapters, max_batch_size=3)
    scheduler = Scheduler(engine, max_queue=8)
    assert scheduler.features == ALL_FEATURES
    done = threading.Event()
    finished: list[str] = []

    def track(request):
        sink = request.emit

        def emit(token, finish, logprob=None):
            sink(token, finish, logprob)
            if finish is not None:
                finished.append(request.request_id)
                if len(finished) == 5:
                    done.set()

        request.emit = emit

    long_req, long_sink = _req("long", OTHER, "b", n=30)
    primary, sinks = _group(PROMPT, "a", [N, N, 5])
    for request in (long_req, primary, *primary.forks):
        track(request)
    other, other_sink = _req("other", OTHER, None, n=3)  # behind the group: first come, first served
    track(other)
    scheduler.submit(long_req)
    scheduler.start()
    try:
        while long_sink.tokens == []:
            threading.Event().wait(0.01)
        scheduler.submit(primary)  # 3 rows: waits for the long request's row
        scheduler.submit(other)
        scheduler.cancel(primary, "cancelled")  # queued: its forks stay and run
        assert done.wait(120), finished
    finally:
        scheduler.stop()
    assert long_sink.tokens == expected("b", OTHER, 30)
    assert sinks[0].finish == "cancelled" and sinks[0].tokens == []
    assert sinks[1].tokens == expected("a", PROMPT) and sinks[2].tokens == expected("a", PROMPT, 5)
    assert other_sink.tokens == expected(None, OTHER, 3)
    assert all(s.finishes == 1 for s in (*sinks, long_sink, other_sink))


def test_an_engine_refuses_the_features_it_does_not_declare():
    class NoExtras(RowEngine):
        features = frozenset({"logprobs"})

    engine = NoExtras(eos_token_ids=[2], max_batch_size=4, max_model_len=64)
    primary, _ = _group(PROMPT, None, [N, N])
    with pytest.raises(ValueError, match="does not support n"):
        engine.admit(primary)
    with pytest.raises(ValueError, match="does not support constraint, mix"):
        engine.admit(_req("x", PROMPT, None, constraint=FixedSequence([5]), mix=(("a", 1.0),))[0])
    with pytest.raises(ValueError, match="does not support penalties"):
        engine.admit(_req("x", PROMPT, None, presence_penalty=0.5)[0])
    engine.admit(_req("ok", PROMPT, None, logprobs=2)[0])
    assert engine.num_running == 1


def test_onnx_engines_declare_what_they_support():
    from loraplex.server.onnx.engine import OnnxEngine
    from loraplex.server.onnx.stacked import StackedOnnxEngine

    assert OnnxEngine.features == {"logprobs", "constraint", "penalties"}
    assert StackedOnnxEngine.features == {"logprobs", "prompt_logprobs", "n", "constraint", "penalties"}
    assert Engine.features == ALL_FEATURES


# --------------------------------------------------------------- constraints


def _bitmask_row(allowed, words):
    """int32 words, bit j of word w = token 32 w + j allowed (xgrammar's layout)."""
    values = [0] * words
    for token in allowed:
        values[token // 32] |= 1 << (token % 32)
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


class AllowedSet:
    """Only ``allowed`` tokens, terminated after ``length`` of them."""

    def __init__(self, allowed, length):
        self.allowed, self.length, self.seen = frozenset(allowed), length, []

    def fill_bitmask(self, bitmask, index):
        bitmask[index] = _bitmask_row(self.allowed, bitmask.shape[1])

    def accept(self, token):
        self.seen.append(token)
        return token in self.allowed

    def is_terminated(self):
        return len(self.seen) >= self.length


class FixedSequence:
    """Exactly ``tokens``, then terminated."""

    def __init__(self, tokens):
        self.tokens, self.pos = list(tokens), 0

    def fill_bitmask(self, bitmask, index):
        bitmask[index] = _bitmask_row([self.tokens[self.pos]], bitmask.shape[1])

    def accept(self, token):
        ok = self.pos < len(self.tokens) and token == self.tokens[self.pos]
        self.pos += ok
        return ok

    def is_terminated(self):
        return self.pos >= len(self.tokens)


class Refuses(AllowedSet):
    def accept(self, token):
        return False


def test_constraints_mask_accept_and_terminate_beside_free_rows(tiny_base, adapters, expected):
    # the allowed set includes bit 31 of several words (int32's sign bit) and tokens past 32 * 1535
    allowed = {31, 63, 95, 777, 4000, 12345, 40000, 49151}
    engine = _engine(tiny_base, adapters, max_batch_size=8, max_num_batched_tokens=6)
    greedy_set, greedy_sink = _req("set", PROMPT, "a", n=20, constraint=AllowedSet(allowed, 6), logprobs=0)
    sampled_set, sampled_sink = _req("sampled", LONGER, "b", n=20, constraint=AllowedSet(allowed, 9), temperature=1.5, seed=5)
    fixed, fixed_sink = _req("fixed", OTHER, None, n=20, constraint=FixedSequence([100, 200, 300]))
    refused, refused_sink = _req("refused", OTHER, "a", constraint=Refuses(allowed, 5))
    nothing, nothing_sink = _req("nothing", OTHER, "b", constraint=AllowedSet((), 5))
    free_a, free_a_sink = _req("free-a", PROMPT, "a")
    free_base, free_base_sink = _req("free-base", LONGER, None)
    run_engine(engine, {0: [free_a, greedy_set, fixed], 1: [sampled_set, refused, free_base, nothing]})
    assert greedy_sink.finish == "stop" and len(greedy_sink.tokens) == 6
    assert sampled_sink.finish == "stop" and len(sampled_sink.tokens) == 9
    assert set(greedy_sink.tokens) <= allowed and set(sampled_sink.tokens) <= allowed
    assert fixed_sink.tokens == [100, 200, 300] and fixed_sink.finish == "stop"
    assert refused_sink.tokens == [] and refused_sink.finish == "error"
    assert nothing_sink.tokens == [] and nothing_sink.finish == "error"
    assert free_a_sink.tokens == expected("a", PROMPT) and free_base_sink.tokens == expected(None, LONGER)
    # greedy under the mask = peft's best allowed token at each step; its logprob is the raw one
    ref = _ref_logprobs(tiny_base, adapters["a"], PROMPT + greedy_sink.tokens, torch.float32)
    index = torch.tensor(sorted(allowed))
    for i, (token, lp) in enumerate(zip(greedy_sink.tokens, greedy_sink.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert token == int(index[row[index].argmax()])
        assert abs(lp.logprob - float(row[token])) < 1e-4 and float(row[token]) < float(row.max())  # not renormalized
    assert engine.kv.used_slots == set()


def test_a_stop_token_allowed_by_the_constraint_ends_the_row_with_stop(tiny_base, adapters):
    engine = _engine(tiny_base, adapters)
    request = EngineRequest("eos", OTHER, None, SamplingParams(max_tokens=10, temperature=0.0), Collector(), constraint=FixedSequence([100, 2]))
    run_engine(engine, {0: [request]})
    assert request.emit.tokens == [100] and request.emit.finish == "stop"  # EOS (2) ends it, never emitted


# ----------------------------------------------------------------------- mixes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mix_rows_equal_peft_weighted_cat_beside_single_adapter_and_base_rows(tiny_base, adapters, expected, dtype):
    """A 2-adapter mix row (its prompt chunked beside decoding rows), single-adapter rows and a
    base row in the same forwards; the mix's greedy tokens equal peft's own weighted adapter
    (``add_weighted_adapter(combination_type="cat")``) at the same dtype: exactly in fp32, within
    the measured bf16 noise otherwise (see test_engine's bf16 test)."""
    weights = [{"a": 0.7, "b": 0.3}, {"a": -0.5, "b": 1.5}]
    engine = _engine(tiny_base, adapters, dtype=dtype, max_batch_size=8, max_num_batched_tokens=5)
    mixes = [_req(f"mix{i}", PROMPT, None, mix=tuple(w.items())) for i, w in enumerate(weights)]
    single, single_sink = _req("a", PROMPT, "a")
    single_b, single_b_sink = _req("b", LONGER, "b")
    base, base_sink = _req("base", OTHER, None)
    run_engine(engine, {0: [single, base], 1: [mixes[0][0], single_b], 2: [mixes[1][0]]})
    with pytest.raises(KeyError):
        engine.admit(_req("missing", PROMPT, None, mix=(("a", 0.5), ("zzz", 0.5)))[0])
    if dtype == torch.float32:
        assert single_sink.tokens == expected("a", PROMPT) and single_b_sink.tokens == expected("b", LONGER) and base_sink.tokens == expected(None, OTHER)
    outputs = []
    for w, (_, sink) in zip(weights, mixes):
        model = reference_mix_model(tiny_base, adapters, w, dtype=dtype)
        if dtype == torch.float32:
            assert sink.tokens == greedy_with(model, PROMPT, N), w
        else:
            with torch.no_grad():
                bf16 = model(input_ids=torch.tensor([PROMPT + sink.tokens])).logits[0].float()
            exact = reference_mix_model(tiny_base, adapters, w)
            with torch.no_grad():
                fp32 = exact(input_ids=torch.tensor([PROMPT + sink.tokens])).logits[0].float()
            check_greedy_within(bf16, len(PROMPT), sink.tokens, tol=max(2 * float((bf16 - fp32).abs().max()), 1e-3))
        outputs.append(tuple(sink.tokens))
    # not vacuous: the mixes differ from each other and from either adapter alone
    assert len({*outputs, tuple(expected("a", PROMPT)), tuple(expected("b", PROMPT))}) == 4


def test_a_mix_member_in_use_cannot_be_removed(tiny_base, adapters):
    engine = _engine(tiny_base, adapters)
    request, sink = _req("mix", PROMPT, None, mix=(("a", 0.5), ("b", 0.5)))
    engine.admit(request)
    engine.step()
    with pytest.raises(RuntimeError, match="still in use"):
        engine.remove_adapter("b")
    request.cancelled = True
    engine.remove_adapter("b")
    assert sink.finish == "cancelled"


# ------------------------------------------------------------------ onnx engines


@pytest.fixture(scope="module")
def onnx_model(tiny_base, adapters, tmp_path_factory):
    from loraplex.server.cli import main as loraplex_main

    model = tmp_path_factory.mktemp("onnx-features") / "model"
    assert loraplex_main(["export-onnx", "--base", str(tiny_base), "--adapter_paths", str(adapters["a"]), "--output_path", str(model), "--precision", "fp32"]) == 0
    return model


@pytest.mark.parametrize("kind", ["stacked", "per-request"])
def test_onnx_engines_honour_logprobs_constraints_and_penalties(tiny_base, adapters, expected, onnx_model, kind):
    """The onnx engines share the sampler: generated-token logprobs equal peft's (fp32 export;
    tolerance 1e-3: onnxruntime's kernels sum in another order than torch), constraints mask and
    terminate, penalties apply; the stacked engine also returns prompt logprobs, and a
    scoring-only row prefilled between two others leaves their rows (K/V) intact."""
    from loraplex.server.onnx.engine import OnnxAdapterPayload, OnnxEngine
    from loraplex.server.onnx.stacked import StackedOnnxEngine

    if kind == "stacked":
        engine = StackedOnnxEngine(onnx_model, "model.stacked.onnx", eos_token_ids=[2], max_batch_size=8, max_model_len=128)
    else:
        engine = OnnxEngine(onnx_model, eos_token_ids=[2], max_batch_size=8, max_model_len=128)
    engine.add_adapter(OnnxAdapterPayload(name="a", path=onnx_model / "a.onnx_adapter"))
    scored, scored_sink = _req("scored", PROMPT, "a", logprobs=4)
    fixed, fixed_sink = _req("fixed", OTHER, None, n=20, constraint=FixedSequence([100, 200, 300]))
    penalized, penalized_sink = _req("penalized", OTHER, "a", n=12, frequency_penalty=100.0)
    requests = [scored, fixed, penalized]
    score_only = None
    if kind == "stacked":
        score_only, score_sink = _req("score", LONGER, "a", n=0, prompt_logprobs=3)
        scored.prompt_logprobs, scored.on_prompt_logprobs = 2, scored_sink.on_prompt_logprobs
        after, after_sink = _req("after", OTHER, None)  # its K/V row moves down past the scoring-only one
        requests = [scored, score_only, after, fixed, penalized]
    else:
        with pytest.raises(ValueError, match="does not support prompt_logprobs"):
            engine.admit(_req("echo", PROMPT, "a", prompt_logprobs=0)[0])
    run_engine(engine, {0: requests})
    assert scored_sink.tokens == expected("a", PROMPT) and scored_sink.finish == "length"
    ref = _ref_logprobs(tiny_base, adapters["a"], PROMPT + scored_sink.tokens, torch.float32)
    for i, (token, got) in enumerate(zip(scored_sink.tokens, scored_sink.logprobs)):
        _check_logprob(got, ref[len(PROMPT) - 1 + i], token, 4, 1e-3)
    assert fixed_sink.tokens == [100, 200, 300] and fixed_sink.finish == "stop"
    assert len(penalized_sink.tokens) == 12 and len(set(penalized_sink.tokens)) == 12  # a repeat costs 100: never chosen
    assert len(set(expected("a", OTHER, 12))) < 12  # ... while the unpenalized row repeats itself
    if score_only is not None:
        assert score_sink.finish == "length" and score_sink.tokens == [] and score_sink.prompt_calls == 1
        assert after_sink.tokens == expected(None, OTHER)
        ref_long = _ref_logprobs(tiny_base, adapters["a"], LONGER, torch.float32)
        for j in range(1, len(LONGER)):
            _check_logprob(score_sink.prompt_logprobs[j], ref_long[j - 1], LONGER[j], 3, 1e-3)
        for j in range(1, len(PROMPT)):
            _check_logprob(scored_sink.prompt_logprobs[j], ref[j - 1], PROMPT[j], 2, 1e-3)
    assert engine.num_running == 0


def test_stacked_onnx_forks_prefill_once_and_equal_separate_requests(tiny_base, adapters, expected, onnx_model):
    """n > 1 on the onnx mixed-batch engine: greedy forks equal the peft oracle, seeded forks
    equal separate requests with the same seeds; groups share a prefill forward with a
    scoring-only row and a plain row (their K/V rows are laid out around the forks'); a group
    whose primary is cancelled before its prefill still runs its forks."""
    from loraplex.server.onnx.engine import OnnxAdapterPayload
    from loraplex.server.onnx.stacked import StackedOnnxEngine

    engine = StackedOnnxEngine(onnx_model, "model.stacked.onnx", eos_token_ids=[2], max_batch_size=12, max_model_len=128)
    engine.add_adapter(OnnxAdapterPayload(name="a", path=onnx_model / "a.onnx_adapter"))
    forward_tokens = []
    run = engine._run
    engine._run = lambda rows, ids, mask, slots: (forward_tokens.append(int(mask.sum()) if ids.shape[1] > 1 else 0), run(rows, ids, mask, slots))[1]
    score, score_sink = _req("score", LONGER, "a", n=0, prompt_logprobs=0)
    greedy, greedy_sinks = _group(PROMPT, "a", [N, 5, N])
    seeds = {i: {"temperature": 1.0, "seed": 20 + i} for i in range(3)}
    seeded, seeded_sinks = _group(OTHER, None, [N, N, N], seeds)
    plain, plain_sink = _req("plain", OTHER, "a")
    cancelled, cancelled_sinks = _group(LONGER, None, [N, N, 6])
    cancelled.cancelled = True
    assert engine.has_capacity(1 + 3 + 3 + 1) and not engine.has_capacity(13)
    for request in (score, greedy, seeded, plain):
        engine.admit(request)
    assert engine.num_running == 8 and not engine.has_capacity(5)
    run_engine(engine, {})
    assert forward_tokens[0] == len(LONGER) + len(PROMPT) + len(OTHER) + len(OTHER)  # each prompt once, all in one forward
    engine.admit(cancelled)
    run_engine(engine, {})
    assert [s.tokens for s in greedy_sinks] == [expected("a", PROMPT), expected("a", PROMPT, 5), expected("a", PROMPT)]
    assert plain_sink.tokens == expected("a", OTHER) and score_sink.finish == "length"
    assert cancelled_sinks[0].finish == "cancelled" and cancelled_sinks[0].tokens == []
    assert cancelled_sinks[1].tokens == expected(None, LONGER) and cancelled_sinks[2].tokens == expected(None, LONGER, 6)
    separate = [_req(f"s{i}", OTHER, None, N, **seeds[i]) for i in range(3)]
    run_engine(engine, {0: [r for r, _ in separate]})
    assert [s.tokens for s in seeded_sinks] == [s.tokens for _, s in separate]
    assert len({tuple(s.tokens) for s in seeded_sinks}) > 1
    assert all(s.finishes == 1 for s in (*greedy_sinks, *seeded_sinks, *cancelled_sinks, plain_sink, score_sink))
    assert engine.num_running == 0
