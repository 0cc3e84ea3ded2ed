"""Generation-based metrics on the eval split: greedy decoding, then a score per metric.

``accuracy``: normalized answer equals the normalized reference (case, surrounding spaces and
punctuation ignored; first line only). ``exact_match``: stripped strings equal. ``f1``: macro F1
over the reference labels (classification). ``rouge``: mean ROUGE-L F-measure (rouge-score).
``loss`` is computed by the trainer, not here. This module knows nothing of adapters.
"""

from __future__ import annotations

import string
from typing import Callable, Sequence

_PUNCT = string.punctuation + " \t\r\n"


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


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
    return total / max(1, len(references))


GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "accuracy": accuracy,
    "exact_match": exact_match,
    "f1": macro_f1,
    "rouge": rouge_l,
}


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
