"""--bf16 auto from CPU flags, and the metrics + verdict helpers (expected values worked by hand)."""

from __future__ import annotations

import math

import pytest

from loraplex.training.evaluation import bleu, chance_level, judge, perplexity, GENERATION_METRICS
from loraplex.training.precision import cpu_flags, use_bf16


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
    return path


@pytest.mark.parametrize("flags, expected", [("avx512f amx_bf16 amx_tile", True), ("avx512f avx512_bf16", True), ("avx2 avx512f", False)])
def test_bf16_auto_follows_the_cpu_flags(tmp_path, monkeypatch, flags, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on, why = use_bf16("auto", _cpuinfo(tmp_path, flags))
    assert on is expected and why.startswith("--bf16 auto: CPU ")
    assert use_bf16("false", _cpuinfo(tmp_path, flags))[0] is False and use_bf16("true", _cpuinfo(tmp_path, flags))[0] is True


def test_cpu_flags_of_a_missing_file_are_empty(tmp_path):
    assert cpu_flags(tmp_path / "none") == set()


def test_rouge_scores_are_the_f_measures():
    preds, refs = ["the cat sat"], ["the cat sat on the mat"]
    # unigram overlap 3 of 3 predicted and 3 of 6 reference words: P=1, R=0.5, F=2/3
    assert math.isclose(GENERATION_METRICS["rouge1"](preds, refs), 2 / 3)
    # bigrams: "the cat", "cat sat" match: P=2/2, R=2/5, F=4/7
    assert math.isclose(GENERATION_METRICS["rouge2"](preds, refs), 4 / 7)
    assert math.isclose(GENERATION_METRICS["rougeL"](preds, refs), 2 / 3)
    assert math.isclose(GENERATION_METRICS["rougeLsum"](["a b\nc"], ["a b\nc"]), 1.0)


def test_bleu_and_perplexity():
    assert bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(100.0)
    assert bleu(["completely different words here"], ["the quick brown fox jumps"]) < 5
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_chance_is_the_majority_share_of_label_references():
    assert chance_level(["yes", "no", "yes", "yes"]) == 0.75
    assert chance_level(["a long free text answer", "another one"]) is None


@pytest.mark.parametrize(
    "scores, primary, chance, status",
    [
        ({"accuracy": {"base": 0.1, "adapter": 0.9}}, "accuracy", 0.5, "ok"),
        ({"accuracy": {"base": 0.1, "adapter": 0.5}}, "accuracy", 0.5, "below_chance"),
        ({"accuracy": {"base": 0.6, "adapter": 0.55}}, "accuracy", None, "no_gain"),
        ({"loss": {"base": 2.0, "adapter": 1.0}}, "loss", None, "ok"),
        ({"perplexity": {"base": 5.0, "adapter": 6.0}}, "perplexity", None, "no_gain"),
    ],
)
def test_verdicts(scores, primary, chance, status):
    verdict = judge(scores, primary, chance)
    assert verdict.status == status
    if status == "no_gain":
        assert "does not beat the base" in verdict.detail
