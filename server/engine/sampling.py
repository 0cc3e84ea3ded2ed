"""Token sampling for a whole batch in one pass: greedy, temperature, top-k, top-p, seeds,
logit bias, min_tokens and presence/frequency/repetition penalties, each per row.

:func:`sample_batch` takes the logits of every row that samples this step ``[R, vocab]`` and one
:class:`RowSampling` per row (its parameters, its generator, its tokens so far); every per-row
parameter becomes a column tensor ``[R, 1]`` so the work is a handful of batched tensor ops, and
the result comes back to the host once (``tolist``). A further per-row control (a token mask for
structured output, logprobs) is one more tensor in the same pass.

Seeded rows stay reproducible whatever shares the batch: the only random number a row consumes
is one uniform draw per step from its own ``torch.Generator`` (inverse-CDF sampling), never a
batch-wide random tensor. Knows token ids only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


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
    # Applied by the sampler (the HTTP API refuses them until it passes them through):
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


def sample_batch(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int]:
    """One token id per row from ``logits [R, vocab]``; one host sync."""
    scores = logits.float()  # [R, V] (a copy when logits are bf16; penalties may write into it)
    if any(r.params.logit_bias or r.params.min_tokens or r.params.penalized for r in rows):
        if scores.data_ptr() == logits.data_ptr():
            scores = scores.clone()
        scores = _apply_controls(scores, rows)
    tokens = torch.argmax(scores, dim=-1)  # [R] (greedy rows keep these)
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
    return tokens.tolist()


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a [vocab] row of logits (the batch sampler on one row)."""
    return sample_batch(logits[None], [RowSampling(params, generator)])[0]
