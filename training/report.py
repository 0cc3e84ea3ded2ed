"""What a training run leaves beside the adapter: training_report.json, loss.png, and the
summary table printed at the end (base vs adapter on the same eval split)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def write_report(path: Path, *, cfg, result, extra: dict[str, Any]) -> None:
    report = {
        "adapter": result.name,
        "metric": result.metric,
        "base_score": result.base_score,
        "adapter_score": result.adapter_score,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "base_eval_loss": result.base_eval_loss,
        "global_step": result.global_step,
        "seconds": round(result.seconds, 2),
        "scores": result.scores,
        "verdict": result.verdict,
        "verdict_detail": result.verdict_detail,
        "config": cfg.to_dict(),
        "log_history": result.log_history,
        **extra,
    }
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def plot_losses(log_history: Sequence[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker=".")
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_table(results: Sequence[Any]):
    """A rich Table: one row per adapter and metric, base vs adapter on the same eval split."""
    from rich.table import Table

    table = Table(title="train-adapter results on the eval split")
    for column in ("adapter", "metric", "base", "adapter", "verdict", "train loss", "steps", "samples/s", "time"):
        table.add_column(column, no_wrap=True)
    for r in results:
        scores = r.scores or {r.metric: {"base": r.base_score, "adapter": r.adapter_score}}
        if "loss" not in scores:
            scores = {**scores, "loss": {"base": r.base_eval_loss, "adapter": r.eval_loss}}
        for i, (metric, pair) in enumerate(scores.items()):
            first = i == 0
            rate = (r.throughput or {}).get("samples_per_second")
            table.add_row(
                r.name if first else "",
                metric,
                _fmt(pair["base"]),
                _fmt(pair["adapter"]),
                r.verdict if first else "",
                _fmt(r.train_loss) if first else "",
                str(r.global_step) if first else "",
                (f"{rate:.2f}" if rate else "-") if first else "",
                f"{r.seconds:.0f}s" if first else "",
            )
    return table


def verdict_lines(results: Sequence[Any]) -> list[str]:
    """One sentence per adapter: published or scored, and whether it beats the base."""
    lines = []
    for r in results:
        action = "scored" if r.global_step == 0 and r.train_loss is None else "published"
        warning = "" if r.verdict == "ok" else "WARNING: "
        lines.append(f"{warning}{action} {r.name} -> {r.path}: {r.verdict_detail or r.verdict}")
    return lines
