"""The batch sampler: per-row parameters in one pass; seeded rows reproducible whatever shares the
batch; the draws follow the filtered distribution (checked against probabilities computed here
independently); logit bias, min_tokens and penalties change only their own row; logprobs are of
the raw logits; constraint bitmasks use xgrammar's layout (checked against xgrammar's kernel) and
constrained draws follow the masked distribution."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.sampling import (
    MAX_TOP_LOGPROBS,
    RowSampling,
    SamplingParams,
    bitmask_to_allowed,
    make_generator,
    sample_batch,
    sample_step,
)

V = 50


def _logits(rows=4, seed=0):
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def _row(**kw):
    params = SamplingParams(**kw)
    return RowSampling(params, make_generator(params))


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = _logits()
    rows = [_row(temperature=0.0), _row(temperature=1.0, seed=1), _row(temperature=0.0), _row(temperature=0.7, top_k=1, seed=2)]
    tokens = sample_batch(logits, rows)
    best = logits.argmax(dim=-1).tolist()
    assert tokens[0] == best[0] and tokens[2] == best[2] and tokens[3] == best[3]  # top_k=1 is greedy


def test_a_seeded_row_is_reproducible_whatever_shares_the_batch():
    logits = _logits(rows=6)
    seq_alone, seq_mixed = [], []
    solo, mixed = _row(temperature=1.0, top_p=0.9, seed=42), _row(temperature=1.0, top_p=0.9, seed=42)
    for step in range(20):
        seq_alone.append(sample_batch(logits[2:3], [solo])[0])
        others = [_row(temperature=1.3, seed=step), _row(temperature=0.0), _row(temperature=0.8, top_k=5)]
        batch = sample_batch(torch.cat([logits[:2], logits[2:3], logits[3:4]]), [others[0], others[1], mixed, others[2]])
        seq_mixed.append(batch[2])
    assert seq_alone == seq_mixed
    assert len(set(seq_alone)) > 1  # really sampling


def _empirical(logits_row, n=4000, **kw):
    params = SamplingParams(**kw)
    gen = torch.Generator().manual_seed(7)
    rows = [RowSampling(params, gen) for _ in range(n)]
    tokens = sample_batch(logits_row[None].expand(n, V), rows)
    return torch.bincount(torch.tensor(tokens), minlength=V).float() / n


def test_draws_follow_temperature_top_k_and_top_p():
    logits = _logits(rows=1, seed=3)[0]
    # temperature only
    expect = torch.softmax(logits / 0.8, dim=-1)
    assert (_empirical(logits, temperature=0.8) - expect).abs().max() < 0.03
    # top-k: only the 5 best, renormalized
    top = torch.topk(logits, 5).indices
    expect = torch.zeros(V)
    expect[top] = torch.softmax(logits[top], dim=-1)
    got = _empirical(logits, temperature=1.0, top_k=5)
    assert got[expect == 0].sum() == 0 and (got - expect).abs().max() < 0.03
    # top-p: the smallest set of best tokens whose mass reaches p
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(probs, descending=True)
    keep = order[: int((torch.cumsum(probs[order], 0) < 0.6).sum()) + 1]
    expect = torch.zeros(V)
    expect[keep] = probs[keep] / probs[keep].sum()
    got = _empirical(logits, temperature=1.0, top_p=0.6)
    assert got[expect == 0].sum() == 0 and (got - expect).abs().max() < 0.03


def test_logit_bias_min_tokens_and_penalties_act_on_their_row_only():
    logits = torch.zeros(3, V)
    logits[:, 7] = 5.0  # every row's favourite is 7
    rows = [
        RowSampling(SamplingParams(temperature=0.0, logit_bias=((3, 10.0),)), None),
        RowSampling(SamplingParams(temperature=0.0, min_tokens=2), None, output_ids=[1], stop_ids=frozenset({7})),
        RowSampling(SamplingParams(temperature=0.0), None),
    ]
    assert sample_batch(logits, rows) == [3, 0, 7]  # row 1: its stop id 7 is masked, the rest tie at 0 -> token 0
    freq = RowSampling(SamplingParams(temperature=0.0, frequency_penalty=2.0), None, output_ids=[7, 7, 7])
    presence = RowSampling(SamplingParams(temperature=0.0, presence_penalty=2.0), None, output_ids=[7, 7, 7])
    repetition = RowSampling(SamplingParams(temperature=0.0, repetition_penalty=10.0), None, prompt_ids=[7])
    logits[:, 9] = 1.0  # the runner-up
    # freq: 5 - 3*2 = -1 < 1; presence: 5 - 2 = 3 still wins; repetition: 5 / 10 = 0.5 < 1
    assert sample_batch(logits, [freq, presence, repetition]) == [9, 7, 9]
    assert torch.all(logits[:, 7] == 5.0)  # the caller's logits are not modified


# ------------------------------------------------- logprobs, constraint masks


class _Allowed:
    """A constraint allowing a fixed set (the sampler only calls fill_bitmask)."""

    def __init__(self, allowed):
        self.allowed = sorted(allowed)

    def fill_bitmask(self, bitmask, index):
        words = [0] * bitmask.shape[1]
        for t in self.allowed:
            words[t // 32] |= 1 << (t % 32)
        bitmask[index] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)

    def accept(self, token):
        return token in self.allowed

    def is_terminated(self):
        return False


def test_the_bitmask_layout_is_xgrammars():
    """Our bitmask decoding against xgrammar's own kernel on the same random int32 words
    (including the sign bit): the tokens it leaves finite are exactly the ones we allow."""
    xgr = pytest.importorskip("xgrammar")
    vocab = 100  # not a multiple of 32: the last word is partial
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int64, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    logits = torch.zeros(3, vocab)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    assert torch.equal(bitmask_to_allowed(bitmask, vocab), torch.isfinite(logits))


def test_logprobs_are_the_raw_logits_whatever_the_row_samples_with():
    logits = _logits(rows=3, seed=5)
    rows = [
        RowSampling(SamplingParams(temperature=0.5, seed=1, logit_bias=((4, 3.0),), presence_penalty=1.0), make_generator(SamplingParams(temperature=0.5, seed=1)), output_ids=[4], logprobs=3),
        RowSampling(SamplingParams(temperature=0.0), None, logprobs=None),
        RowSampling(SamplingParams(temperature=0.0), None, logprobs=99, constraint=_Allowed({1, 2, 3})),
    ]
    out = sample_step(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None and out.dead == [False, False, False]
    assert out.tokens[2] in {1, 2, 3} and out.tokens[2] == 1 + int(logits[2, 1:4].argmax())
    for i, k in ((0, 3), (2, MAX_TOP_LOGPROBS)):  # k is capped at 20
        lp = out.logprobs[i]
        assert lp.token_id == out.tokens[i] and abs(lp.logprob - float(raw[i, out.tokens[i]])) < 1e-6
        values, ids = torch.topk(raw[i], k)
        assert [t for t, _ in lp.top] == ids.tolist() and torch.allclose(torch.tensor([v for _, v in lp.top]), values)


def test_constrained_draws_follow_the_masked_distribution_and_empty_masks_are_flagged():
    logits = _logits(rows=1, seed=9)[0]
    allowed = [0, 5, 31, 32, 49]
    n = 4000
    gen = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=1.0)
    out = sample_step(logits[None].expand(n, V), [RowSampling(params, gen, constraint=_Allowed(allowed)) for _ in range(n)])
    got = torch.bincount(torch.tensor(out.tokens), minlength=V).float() / n
    expect = torch.zeros(V)
    expect[allowed] = torch.softmax(logits[allowed], dim=-1)
    assert got[expect == 0].sum() == 0 and (got - expect).abs().max() < 0.03
    # a mask allowing nothing (here: only a stop id, itself masked by min_tokens) ends the row
    rows = [
        RowSampling(SamplingParams(temperature=0.0, min_tokens=3), None, stop_ids=frozenset({7}), constraint=_Allowed({7})),
        RowSampling(SamplingParams(temperature=0.0), None),
    ]
    assert sample_step(_logits(rows=2), rows).dead == [True, False]


def test_greedy_tokens_are_torch_argmax_with_ties_nan_and_masked_rows():
    """The two-pass argmax returns torch.argmax's indices: first maximum on ties (inside one
    chunk and across chunks), NaN counted as the maximum, all -inf rows, odd vocabularies."""
    from loraplex.server.engine.sampling import greedy_tokens

    gen = torch.Generator().manual_seed(3)
    for vocab in (49152, 1024, 320, 1000):  # 1000: no chunk size divides it (torch.argmax)
        scores = torch.randn(12, vocab, generator=gen)
        scores[0, 7] = scores[0, vocab - 1] = 50.0  # tie across chunks: the first wins
        scores[1, 3] = scores[1, 4] = 60.0  # tie inside a chunk
        scores[2] = float("-inf")  # a row a constraint masked entirely
        scores[3, vocab // 2] = float("nan")
        scores[4, vocab - 1] = 70.0  # the last column
        scores[5] = scores[5].round()  # many ties
        assert torch.equal(greedy_tokens(scores), torch.argmax(scores, dim=-1)), vocab
        for rows in (1, 2, 3):
            assert torch.equal(greedy_tokens(scores[:rows]), torch.argmax(scores[:rows], dim=-1))
