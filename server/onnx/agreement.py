"""Does an adapter still answer the same on the exported (int4) base? Replays the held-out answers
its training run stored.

``train-adapter`` keeps, in each adapter's ``training_report.json``, up to 20 held-out prompts
with the answer the adapter gave at training time (``eval_samples``: prompt, reference,
prediction; greedy, on the base it was trained and scored on). When the onnx backend takes an
adapter onto an int4 export, ``PredictionReplay`` runs each stored prompt + answer through the
exported graph (``model.onnx``, its own onnxruntime session, the adapter's weights bound to the
LoRA inputs) in ONE teacher-forced forward and checks that greedy decoding would reproduce the
stored answer token for token, its end-of-turn token included. The result is the fraction of
stored answers reproduced (``Agreement``); below a threshold it is logged as a warning. An
adapter without stored predictions (not made by train-adapter, or an old report) gets no number.

Teacher forcing equals greedy generation as long as the prefix matches, so "every position's
argmax is the next stored token" is exactly "greedy decoding gives the stored answer" (the answer
is re-tokenized from its text, which for the short answers here gives the generated tokens).

Knows onnxruntime, tokenizers and the report's JSON; nothing of engines, HTTP or gRPC.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger("loraplex.onnx.agreement")

#: below this fraction of stored answers reproduced, a warning is logged
DEFAULT_THRESHOLD = 0.9
REPORT_FILE = "training_report.json"


@dataclass(frozen=True)
class Agreement:
    """How many of an adapter's stored held-out answers the exported model reproduces."""

    samples: int
    reproduced: int
    threshold: float
    precision: str  # the export's base precision ("int4", "fp32")

    @property
    def fraction(self) -> float:
        return self.reproduced / self.samples if self.samples else 1.0

    @property
    def ok(self) -> bool:
        return self.fraction >= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {"agreement": round(self.fraction, 4), "samples": self.samples, "reproduced": self.reproduced,
                "threshold": self.threshold, "precision": self.precision}


def report_path(adapter: Path) -> Path:
    """Where an adapter's stored answers live: ``<folder>/training_report.json`` for a peft folder,
    ``<name>.training_report.json`` beside an exported ``<name>.onnx_adapter`` (the export copies
    them there)."""
    adapter = Path(adapter)
    if adapter.is_file():
        return adapter.with_name(adapter.name[: -len(adapter.suffix)] + "." + REPORT_FILE)
    return adapter / REPORT_FILE


def stored_samples(adapter: Path) -> list[tuple[str, str]]:
    """(prompt, prediction) pairs from the adapter's training report; [] when there are none or
    the report is unreadable (it is optional and never trusted for anything but this check)."""
    try:
        report = json.loads(report_path(adapter).read_text())
        samples = report.get("eval_samples") or []
        return [(str(s["prompt"]), str(s["prediction"])) for s in samples if isinstance(s, dict) and "prompt" in s and "prediction" in s]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


class PredictionReplay:
    """``replay(adapter_dir, arrays) -> Agreement | None`` on one exported model folder.

    ``arrays``: the adapter's graph-input arrays (``onnx_adapter_arrays``: ``A^T`` [in, r],
    ``(scale * B)^T`` [r, out] by graph input name). The session is created on first use and
    shared by the worker threads (onnxruntime sessions are thread-safe for ``run``)."""

    def __init__(self, model_dir: Path, tokenizer: Any, eos_token_ids: Sequence[int], *, precision: str = "int4", threshold: float = DEFAULT_THRESHOLD) -> None:
        self.model_dir = Path(model_dir)
        self.tokenizer = tokenizer
        self.eos = frozenset(int(t) for t in eos_token_ids)
        if not self.eos:
            raise ValueError("PredictionReplay needs at least one end-of-sequence token id")
        self.precision = precision
        self.threshold = threshold
        self._session = None
        self._lock = threading.Lock()

    def _get_session(self):
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.log_severity_level = 3
                self._session = ort.InferenceSession(str(self.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
                decoder = json.loads((self.model_dir / "genai_config.json").read_text())["model"]["decoder"]
                self._kv = (int(decoder["num_hidden_layers"]), int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
                # LoRA inputs have empty defaults: onnxruntime lists them as overridable initializers
                self._input_names = {i.name for i in self._session.get_inputs()} | {i.name for i in self._session.get_overridable_initializers()}
            return self._session

    def _logits(self, tokens: list[int], arrays: Mapping[str, Any]):
        """One forward from an empty cache: logits [len(tokens), vocab]."""
        import numpy as np

        session = self._get_session()
        layers, kv_heads, head = self._kv
        feed: dict[str, Any] = {
            "input_ids": np.asarray([tokens], dtype=np.int64),  # [1, L]
            "attention_mask": np.ones((1, len(tokens)), dtype=np.int64),
        }
        if "position_ids" in self._input_names:
            feed["position_ids"] = np.arange(len(tokens), dtype=np.int64)[None, :]
        for layer in range(layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{layer}.{kind}"] = np.zeros((1, kv_heads, 0, head), dtype=np.float32)  # [1, kv, 0, head]
        unknown = sorted(set(arrays) - self._input_names)
        if unknown:
            raise ValueError(f"adapter tensors {unknown[:3]} are not inputs of {self.model_dir / 'model.onnx'}")
        feed.update(arrays)
        (logits,) = session.run(["logits"], feed)
        return logits[0]  # [L, vocab]

    def reproduces(self, prompt: str, prediction: str, arrays: Mapping[str, Any]) -> bool:
        """Would greedy decoding on the export give ``prediction`` (then end the turn)?"""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(prediction, add_special_tokens=False)["input_ids"] if prediction else []
        tokens = [*prompt_ids, *answer_ids]
        logits = self._logits(tokens, arrays)
        best = logits[len(prompt_ids) - 1 :].argmax(axis=-1)  # [len(answer) + 1]: each answer token, then what follows it
        return all(int(b) == t for b, t in zip(best, answer_ids)) and int(best[len(answer_ids)]) in self.eos

    def __call__(self, adapter: Path, arrays: Mapping[str, Any]) -> Agreement | None:
        """``adapter``: a peft folder or an exported ``.onnx_adapter`` file (see ``report_path``)."""
        samples = stored_samples(adapter)
        if not samples:
            return None
        reproduced = sum(self.reproduces(prompt, prediction, arrays) for prompt, prediction in samples)
        return Agreement(samples=len(samples), reproduced=reproduced, threshold=self.threshold, precision=self.precision)


def warn_if_low(name: str, agreement: Agreement | None) -> None:
    """The log line an operator sees when an adapter loses its trained answers on this export."""
    if agreement is not None and not agreement.ok:
        log.warning(
            "adapter %s reproduces %d of %d held-out answers from its training report on this %s export (%.0f%% < %.0f%%): "
            "it was trained on a different base precision; retrain it with train-adapter --quantization_aware onnx-int4, or export with --precision fp32",
            name, agreement.reproduced, agreement.samples, agreement.precision, 100 * agreement.fraction, 100 * agreement.threshold,
        )
