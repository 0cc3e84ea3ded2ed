"""A tqdm progress bar for training that shows the latest train and eval loss, with ETA."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback


class LossProgressBar(TrainerCallback):
    """Replaces the Trainer's default bar: one line per adapter, loss and eval loss in the postfix."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=f"train {self.name}", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, label in (("loss", "loss"), ("eval_loss", "eval_loss")):
            if key in logs:
                self.postfix[label] = f"{logs[key]:.4f}"
        self.bar.set_postfix(self.postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
