"""A tqdm progress bar for training: latest train/eval loss, samples/s and peak memory, with ETA.

Also keeps the throughput and memory figures the training report records (``ThroughputMeter``).
"""

from __future__ import annotations

import resource
import sys
import time

from tqdm.auto import tqdm
from transformers import TrainerCallback


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (CPU) and peak allocated CUDA memory, in MiB."""
    import torch

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_peak_rss_mb": round(rss_kb / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)}
    if torch.cuda.is_available():
        out["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


class ThroughputMeter(TrainerCallback):
    """Counts optimizer steps and training samples over wall time (resume-aware: only this run's steps)."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.started: float | None = None
        self.first_step = 0
        self.last_step = 0
        self.last_time: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.first_step = self.last_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step = state.global_step
        self.last_time = time.monotonic()

    def figures(self) -> dict[str, float]:
        steps = self.last_step - self.first_step
        if self.started is None or self.last_time is None or steps <= 0:
            return {}
        seconds = max(1e-9, self.last_time - self.started)
        return {"steps_per_second": round(steps / seconds, 4), "samples_per_second": round(steps * self.samples_per_step / seconds, 3)}


class LossProgressBar(TrainerCallback):
    """Replaces the Trainer's default bar: one line per adapter; loss, eval loss, samples/s and memory."""

    def __init__(self, name: str, meter: ThroughputMeter) -> None:
        self.name = name
        self.meter = meter
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=f"train {self.name}", unit="step", dynamic_ncols=True, initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, label in (("loss", "loss"), ("eval_loss", "eval_loss")):
            if key in logs:
                self.postfix[label] = f"{logs[key]:.4f}"
        rate = self.meter.figures().get("samples_per_second")
        if rate is not None:
            self.postfix["samples/s"] = f"{rate:.2f}"
        memory = peak_memory_mb()
        self.postfix["mem"] = f"{memory.get('gpu_peak_allocated_mb', memory['cpu_peak_rss_mb']):.0f}MiB"
        self.bar.set_postfix(self.postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
