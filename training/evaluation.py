"""Metrics on the eval split and what they say about an adapter.

Generation metrics (greedy decoding, then a score): ``accuracy`` (normalized answer equals the
normalized reference: case, surrounding spaces and punctuation ignored, first line only),
``exact_match`` (stripped strings equal), ``f1`` (macro F1 over the reference labels), ``bleu``
(sacrebleu corpus BLEU, 0-100), ``rouge1``/``rouge2``/``rougeL``/``rougeLsum`` (mean F-measure,
rouge-score). ``loss`` and ``perplexity`` (exp of the mean eval loss per target token) come from the
trainer's eval loss. ``judge`` turns base-vs-adapter scores into a verdict in words. This module
knows nothing of adapters or training.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

_PUNCT = string.punctuation + " \t\r\n"
#: Metrics where lower is better.
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
#: Metrics that compare a predicted label with the reference label.
LABEL_METRICS = frozenset({"accuracy", "f1", "exact_match"})


def normalize_answer(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.strip(_PUNCT).lower()


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / max(1, len(references))


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(1, len(references))


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    preds = [normalize_answer(p) for p in predictions]
    refs = [normalize_answer(r) for r in references]
    scores = []
    for label in sorted(set(refs)):
        tp = sum(p == label and r == label for p, r in zip(preds, refs))
        fp = sum(p == label and r != label for p, r in zip(preds, refs))
        fn = sum(p != label and r == label for p, r in zip(preds, refs))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / max(1, len(scores))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu([p.strip() for p in predictions], [[r.strip() for r in references]]).score)


def _rouge(key: str) -> Callable[[Sequence[str], Sequence[str]], float]:
    def score(predictions: Sequence[str], references: Sequence[str]) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([key], use_stemmer=False)
        total = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(predictions, references))
        return total / max(1, len(references))

    score.__name__ = key
    return score


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _rouge("rougeL")(predictions, references)


def perplexity(eval_loss: float | None) -> float | None:
    if eval_loss is None:
        return None
    return math.exp(min(eval_loss, 700.0))  # exp overflows past ~709


GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "accuracy": accuracy,
    "exact_match": exact_match,
    "f1": macro_f1,
    "bleu": bleu,
    "rouge1": _rouge("rouge1"),
    "rouge2": _rouge("rouge2"),
    "rougeL": _rouge("rougeL"),
    "rougeLsum": _rouge("rougeLsum"),
}


def chance_level(references: Sequence[str]) -> float | None:
    """For label-like references: the share of the most common label (what always guessing it scores)."""
    labels = [normalize_answer(r) for r in references]
    counts = Counter(labels)
    if not labels or not 1 < len(counts) <= 32 or len(counts) * 2 > len(labels):
        return None
    return counts.most_common(1)[0][1] / len(labels)


@dataclass(frozen=True)
class Verdict:
    """``ok``, ``no_gain`` (the adapter does not beat the base) or ``below_chance``; ``detail`` in words."""

    status: str
    detail: str


def judge(scores: dict[str, dict[str, float | None]], primary: str, chance: float | None) -> Verdict:
    """Compare adapter with base on the primary metric, and label metrics with chance."""
    base, adapted = scores[primary]["base"], scores[primary]["adapter"]
    if chance is not None and primary in ("accuracy", "exact_match") and adapted is not None and adapted <= chance + 1e-9:
        return Verdict(
            "below_chance",
            f"{primary} {adapted:.3f} is at or below chance ({chance:.3f}, always answering the eval split's most common label): "
            "the adapter has not learned the task",
        )
    if base is None or adapted is None:
        return Verdict("ok", f"{primary}: {adapted}")
    better = adapted < base if primary in LOWER_IS_BETTER else adapted > base
    if not better:
        return Verdict("no_gain", f"the adapter does not beat the base on {primary} ({base:.4f} -> {adapted:.4f})")
    return Verdict("ok", f"the adapter beats the base on {primary} ({base:.4f} -> {adapted:.4f})")


def generate_greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of each prompt (left-padded batches); special tokens dropped."""
    import torch

    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                generated = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = saved_side
        if was_training:
            model.train()
    return outputs
