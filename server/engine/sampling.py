"""Token sampling for a whole batch in one pass: greedy, temperature, top-k, top-p, seeds,
logit bias, min_tokens, presence/frequency/repetition penalties, structured-output token masks
and logprobs, each per row.

:func:`sample_step` takes the logits of every row that samples this step ``[R, vocab]`` and one
:class:`RowSampling` per row (its parameters, its generator, its tokens so far, its constraint,
its logprobs setting); every per-row parameter becomes a column tensor ``[R, 1]`` so the work is
a handful of batched tensor ops, and the result comes back to the host once (one ``tolist`` of
one packed tensor: tokens, logprobs and the rows a constraint left without any allowed token).

Logprobs are ``log_softmax`` of the RAW logits in fp32 (before temperature, penalties, bias and
masks): what a full forward of the model gives, whatever the row's sampling controls.

Structured output: each constrained row's :class:`TokenConstraint` writes its row of one int32
bitmask ``[C, ceil(vocab / 32)]`` (bit set = allowed; xgrammar's and llguidance's layout), which
becomes a -inf mask with torch ops. Grammar engines are the service's business: nothing here
imports one. Advancing a constraint with the chosen token is the engine's job (``rows.py``).

Seeded rows stay reproducible whatever shares the batch: the only random number a row consumes
is one uniform draw per step from its own ``torch.Generator`` (inverse-CDF sampling), never a
batch-wide random tensor. Knows token ids only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

#: the most top logprobs a row may ask for (OpenAI's limit)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Validated by the service layer before it reaches the engine."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0  # stop ids (EOS included) are masked until this many tokens are out
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per occurrence in the generated text
    repetition_penalty: float = 1.0  # HF/vLLM: tokens of prompt or output, logit / p if > 0 else * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (log_softmax of the raw fp32 logits)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k best (token_id, logprob), best first; () when k == 0


@runtime_checkable
class TokenConstraint(Protocol):
    """One row's structured-output state (built by the service from a grammar engine's matcher)."""

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write row ``index`` of an int32 bitmask [R, ceil(vocab/32)]: bit set = token allowed."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance with the sampled token; False = refused (the row ends with "error")."""
        ...

    def is_terminated(self) -> bool:
        """Nothing may follow: the row ends with "stop"."""
        ...


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator for the row's random draws (None for greedy rows)."""
    if params.greedy:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


@dataclass
class RowSampling:
    """What the sampler needs of one row this step."""

    params: SamplingParams
    generator: torch.Generator | None
    output_ids: Sequence[int] = ()  # generated so far (penalties)
    prompt_ids: Sequence[int] = ()  # (repetition penalty)
    stop_ids: frozenset[int] = frozenset()  # masked while fewer than min_tokens are out
    logprobs: int | None = None  # None = off; k = the chosen token's logprob and the k best
    constraint: TokenConstraint | None = None  # its bitmask row masks the logits


@dataclass
class StepSample:
    """The sampler's answer for R rows."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]  # per row; None where the row did not ask
    dead: list[bool]  # per row: its constraint allowed no token at all (the row must end)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)[:, None]  # [R, 1]


def _apply_controls(scores: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Logit bias, min_tokens and penalties on fp32 scores [R, V] (in place where it can)."""
    idx_r: list[int] = []
    idx_t: list[int] = []
    vals: list[float] = []
    for i, row in enumerate(rows):
        p = row.params
        for token, bias in p.logit_bias:
            idx_r.append(i)
            idx_t.append(token)
            vals.append(bias)
        if p.min_tokens and len(row.output_ids) < p.min_tokens:
            for token in row.stop_ids:
                idx_r.append(i)
                idx_t.append(token)
                vals.append(float("-inf"))
    if idx_r:
        dev = scores.device
        scores.index_put_(
            (torch.tensor(idx_r, device=dev), torch.tensor(idx_t, device=dev)),
            torch.tensor(vals, dtype=scores.dtype, device=dev),
            accumulate=True,
        )
    penalized = [i for i, row in enumerate(rows) if row.params.penalized]
    if penalized:
        dev, vocab = scores.device, scores.shape[1]
        sub = scores[penalized]  # [P, V]
        counts = torch.zeros_like(sub)  # output occurrences per token
        seen = torch.zeros_like(sub, dtype=torch.bool)  # in prompt or output
        for j, i in enumerate(penalized):
            out = torch.tensor(list(rows[i].output_ids), dtype=torch.long, device=dev)
            if out.numel():
                counts[j].index_add_(0, out, torch.ones(out.numel(), device=dev))
            both = torch.tensor(list(rows[i].prompt_ids) + list(rows[i].output_ids), dtype=torch.long, device=dev)
            if both.numel():
                seen[j, both.clamp(0, vocab - 1)] = True
        ps = [rows[i].params for i in penalized]
        rep = _column([p.repetition_penalty for p in ps], sub)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - _column([p.frequency_penalty for p in ps], sub) * counts
        sub = sub - _column([p.presence_penalty for p in ps], sub) * (counts > 0).float()
        scores[penalized] = sub
    return scores


def bitmask_to_allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 bitmask [C, ceil(vocab/32)] (bit j of word w = token 32*w + j) -> bool [C, vocab]."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [C, W, 32] (arithmetic shift: & 1 keeps bit j)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def _apply_constraints(scores: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor | None:
    """-inf where a constrained row's bitmask forbids a token; returns [R] bool "no token
    allowed" (None when no row is constrained)."""
    constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
    if not constrained:
        return None
    vocab = scores.shape[1]
    bitmask = torch.zeros(len(constrained), (vocab + 31) // 32, dtype=torch.int32)  # CPU: the matchers write it
    for j, i in enumerate(constrained):
        rows[i].constraint.fill_bitmask(bitmask, j)
    allowed = bitmask_to_allowed(bitmask.to(scores.device), vocab)  # [C, V]
    index = torch.tensor(constrained, device=scores.device)
    masked = scores[index].masked_fill(~allowed, float("-inf"))  # [C, V]
    none = torch.isneginf(masked).all(dim=-1)  # [C]: the mask (with min_tokens, bias) left nothing
    scores[index] = masked.masked_fill(none[:, None], 0.0)  # such a row samples anything; its token is discarded
    dead = torch.zeros(len(rows), dtype=torch.bool, device=scores.device)
    dead[index] = none
    return dead


#: the two-pass argmax below instead of ``torch.argmax``; a switch for tools/engine_bench.py
CHUNKED_ARGMAX = {"enabled": True}


def greedy_tokens(scores: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(scores, dim=-1)`` for ``scores [R, V]``, the same indices (first maximum,
    NaN counted as the maximum), in two passes: the maximum of each chunk of ``C`` columns
    (``amax``, vectorized), the first chunk holding the row's maximum, then the first maximum
    inside that chunk. torch's CPU argmax over a vocabulary row is not vectorized: [64, 49152]
    fp32 took 3.7 ms here against 0.7 ms this way. Rows of one or two tokens, and vocabularies
    no chunk size divides, use torch.argmax."""
    rows, vocab = scores.shape
    chunk = next((c for c in (256, 128, 64) if vocab % c == 0), 0)
    if not CHUNKED_ARGMAX["enabled"] or rows <= 2 or not chunk or scores.device.type != "cpu":
        return torch.argmax(scores, dim=-1)
    best_chunk = scores.view(rows, vocab // chunk, chunk).amax(dim=-1).argmax(dim=-1)  # [R]
    columns = best_chunk[:, None] * chunk + torch.arange(chunk, device=scores.device)  # [R, C]
    return best_chunk * chunk + scores.gather(1, columns).argmax(dim=-1)  # [R]


def sample_step(logits: torch.Tensor, rows: Sequence[RowSampling]) -> StepSample:
    """One token per row from ``logits [R, vocab]``, with logprobs where asked; one host sync."""
    R = len(rows)
    scores = logits.float()  # [R, V] (a copy when logits are bf16; controls may write into it)
    controlled = any(r.params.logit_bias or r.params.min_tokens or r.params.penalized for r in rows)
    constrained = any(r.constraint is not None for r in rows)
    if (controlled or constrained) and scores.data_ptr() == logits.data_ptr():
        scores = scores.clone()
    if controlled:
        scores = _apply_controls(scores, rows)
    dead = _apply_constraints(scores, rows) if constrained else None
    tokens = greedy_tokens(scores)  # [R] (greedy rows keep these)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        ps = [rows[i].params for i in sampled]
        sub = scores[sampled] / _column([p.temperature for p in ps], scores)  # [S, V]
        # one uniform per row, from the row's own generator (reproducible whatever shares the batch)
        u = torch.tensor([float(torch.rand(1, generator=rows[i].generator)) for i in sampled], device=scores.device)
        top_k = [p.top_k if 0 < p.top_k < sub.shape[1] else 0 for p in ps]
        top_p = [p.top_p for p in ps]
        if any(top_k) or any(p < 1.0 for p in top_p):
            sorted_scores, order = torch.sort(sub, dim=-1, descending=True)  # [S, V]
            ranks = torch.arange(sub.shape[1], device=sub.device)[None, :]
            k = torch.tensor([k or sub.shape[1] for k in top_k], device=sub.device)[:, None]
            sorted_scores = sorted_scores.masked_fill(ranks >= k, float("-inf"))
            probs = torch.softmax(sorted_scores, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
            probs = probs.masked_fill(before > _column(top_p, probs), 0.0)  # keep the smallest set reaching top_p
            cdf = torch.cumsum(probs, dim=-1)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1]).clamp_(min=1e-30)[:, None]).clamp_(max=sub.shape[1] - 1)  # [S, 1]
            chosen = order.gather(1, pick)[:, 0]
        else:
            cdf = torch.cumsum(torch.softmax(sub, dim=-1), dim=-1)
            chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).clamp_(min=1e-30)[:, None]).clamp_(max=sub.shape[1] - 1)[:, 0]
        tokens[torch.tensor(sampled, device=tokens.device)] = chosen
    # everything the host needs, packed into one float64 tensor: one transfer
    parts = [tokens.double()]
    if dead is not None:
        parts.append(dead.double())
    asking = [i for i, r in enumerate(rows) if r.logprobs is not None]
    k_max = 0
    if asking:
        k_max = min(max(rows[i].logprobs for i in asking), MAX_TOP_LOGPROBS, logits.shape[1])
        index = torch.tensor(asking, device=logits.device)
        lp = torch.log_softmax(logits[index].float(), dim=-1)  # [A, V] raw logits, fp32
        parts.append(lp.gather(1, tokens[index][:, None])[:, 0].double())  # [A]
        if k_max:
            top_v, top_i = torch.topk(lp, k_max, dim=-1)  # [A, k]
            parts += [top_v.double().flatten(), top_i.double().flatten()]
    packed = torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()
    out_tokens = [int(t) for t in packed[:R]]
    pos = R
    out_dead = [False] * R
    if dead is not None:
        out_dead = [bool(d) for d in packed[pos : pos + R]]
        pos += R
    out_lps: list[TokenLogprob | None] = [None] * R
    if asking:
        A = len(asking)
        chosen_lp = packed[pos : pos + A]
        pos += A
        top_v = packed[pos : pos + A * k_max]
        top_i = packed[pos + A * k_max : pos + 2 * A * k_max]
        for j, i in enumerate(asking):
            k = min(rows[i].logprobs, k_max)
            top = tuple((int(top_i[j * k_max + t]), top_v[j * k_max + t]) for t in range(k))
            out_lps[i] = TokenLogprob(out_tokens[i], chosen_lp[j], top)
    return StepSample(out_tokens, out_lps, out_dead)


def sample_batch(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int]:
    """One token id per row from ``logits [R, vocab]`` (``sample_step`` without the extras)."""
    return sample_step(logits, rows).tokens


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a [vocab] row of logits (the batch sampler on one row)."""
    return sample_batch(logits[None], [RowSampling(params, generator)])[0]


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``log_softmax`` of raw ``logits [P, V]`` in fp32: the targets' logprobs [P] and the k best
    (values [P, k], ids [P, k]; None when k == 0). For prompt logprobs (echo)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
    chosen = lp.gather(1, targets[:, None])[:, 0]
    if k <= 0:
        return chosen, None, None
    values, ids = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
    return chosen, values, ids
