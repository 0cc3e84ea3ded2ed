"""Training data: read records, slice splits, render prompts, tokenize with label masking.

Records come from .json (a list of objects), .jsonl or .csv files. Splits use the slice syntax of
Hugging Face datasets on the single split ``train``: ``train``, ``train[:4096]``,
``train[4096:4224]``, ``train[:90%]``. Rendering is either an Olive-style ``{field}`` template
(loss on the whole text) or the base's chat template (loss on the response tokens only: every
prompt token's label is -100). This module knows nothing of models or training loops.
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from loraplex.training.config import TrainConfig, TrainInputError

IGNORE_INDEX = -100
_SPLIT = re.compile(r"^\s*train\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")
_LOADERS = {}


def _loader(*suffixes: str):
    def register(fn):
        for suffix in suffixes:
            _LOADERS[suffix] = fn
        return fn

    return register


@_loader(".jsonl")
def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise TrainInputError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
    return records


@_loader(".json")
def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TrainInputError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise TrainInputError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}), got {type(data).__name__}")
    return data


@_loader(".csv")
def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """All records of all files, in order; each must be a JSON object / CSV row."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_file():
            raise TrainInputError(f"data file {path} does not exist", param="data_files")
        loader = _LOADERS.get(path.suffix.lower())
        if loader is None:
            raise TrainInputError(f"data file {path}: unsupported extension {path.suffix!r}; use .json, .jsonl or .csv", param="data_files")
        for i, record in enumerate(loader(path)):
            if not isinstance(record, dict):
                raise TrainInputError(f"{path}: record {i} is a {type(record).__name__}, expected an object with fields")
            records.append(record)
    if not records:
        raise TrainInputError(f"data files {', '.join(map(str, paths))} hold no records", param="data_files")
    return records


# ------------------------------------------------------------------ splits
def _bound(token: str | None, n: int, default: int) -> int:
    if token is None:
        return default
    if token.endswith("%"):
        value = round(n * int(token[:-1]) / 100)
        return value if not token.startswith("-") else n + value
    value = int(token)
    return value if value >= 0 else n + value


def split_indices(spec: str, n: int) -> list[int]:
    """Indices selected by a split spec over ``n`` records ('train[10:20]', 'train[:90%]')."""
    match = _SPLIT.match(spec)
    if not match:
        raise TrainInputError(
            f"split {spec!r} is not understood; use 'train', 'train[START:END]' or 'train[:P%]' (the data files form the split 'train')"
        )
    start = max(0, min(n, _bound(match.group(1), n, 0)))
    end = max(0, min(n, _bound(match.group(2), n, n)))
    return list(range(start, end))


def looks_like_label(values: Sequence[Any]) -> bool:
    """Few distinct short values that repeat: a classification label."""
    distinct = {str(v) for v in values}
    return 1 < len(distinct) <= 32 and len(distinct) * 2 <= len(values) and all(len(v) <= 64 for v in distinct)


def default_holdout(records: Sequence[dict], output_field: str, seed: int, fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """Hold out ``fraction`` for eval (at least 1), stratified by label when the output is a label."""
    rng = random.Random(seed)
    n = len(records)
    labels = [r.get(output_field) for r in records]
    if looks_like_label(labels):
        by_label: dict[str, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            by_label[str(label)].append(i)
        eval_idx: list[int] = []
        for label in sorted(by_label):
            group = by_label[label]
            rng.shuffle(group)
            eval_idx.extend(group[: max(1, round(len(group) * fraction))])
    else:
        order = list(range(n))
        rng.shuffle(order)
        eval_idx = order[: max(1, round(n * fraction))]
    held = set(eval_idx)
    return [i for i in range(n) if i not in held], sorted(held)


def make_splits(records: Sequence[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    n = len(records)
    if cfg.train_split is None and cfg.eval_split is None:
        train_idx, eval_idx = default_holdout(records, cfg.output_field, cfg.seed)
    else:
        train_idx = split_indices(cfg.train_split, n) if cfg.train_split else None
        eval_idx = split_indices(cfg.eval_split, n) if cfg.eval_split else None
        if train_idx is None:
            held = set(eval_idx or [])
            train_idx = [i for i in range(n) if i not in held]
        if eval_idx is None:
            chosen = set(train_idx)
            eval_idx = [i for i in range(n) if i not in chosen]
    if not train_idx:
        raise TrainInputError(f"the training split is empty after splitting {n} records (--train_split {cfg.train_split!r})", param="train_split")
    if not eval_idx:
        raise TrainInputError(
            f"the eval split is empty after splitting {n} records (--train_split {cfg.train_split!r}, --eval_split {cfg.eval_split!r}); "
            "leave records out of --train_split or give --eval_split",
            param="eval_split",
        )
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


# --------------------------------------------------------------- rendering
@dataclass(frozen=True)
class RenderedExample:
    """One record as text: the prompt, the target, and whether loss covers the prompt too."""

    prompt: str
    target: str
    reference: str
    loss_on_prompt: bool


class _StrictFormatter(string.Formatter):
    def __init__(self, index: int) -> None:
        self.index = index

    def get_value(self, key, args, kwargs):
        if isinstance(key, int) or key not in kwargs:
            raise TrainInputError(
                f"--text_template field {{{key}}} is absent from record {self.index} (its fields: {', '.join(sorted(kwargs)) or 'none'})",
                param="text_template",
            )
        return kwargs[key]


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class PromptRenderer:
    """Renders records for training and evaluation, in template or chat mode."""

    def __init__(self, cfg: TrainConfig, tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""
        if cfg.text_template is None and not getattr(tokenizer, "chat_template", None):
            raise TrainInputError(
                "the base model's tokenizer has no chat template; pass --text_template to render records", param="text_template"
            )

    def _field(self, record: dict, name: str, index: int, flag: str) -> str:
        if name not in record or record[name] is None:
            raise TrainInputError(
                f"field {name!r} ({flag}) is absent from record {index} (its fields: {', '.join(sorted(map(str, record))) or 'none'})",
                param=flag.lstrip("-"),
            )
        return str(record[name])

    def render(self, record: dict, index: int) -> RenderedExample:
        cfg = self.cfg
        if cfg.text_template is not None:
            text = _StrictFormatter(index).format(cfg.text_template, **record)
            marker = "{" + cfg.output_field + "}"
            if marker in cfg.text_template:
                head = cfg.text_template.split(marker, 1)[0]
                prompt = _StrictFormatter(index).format(head, **record)
                reference = self._field(record, cfg.output_field, index, "--output_field")
            else:
                prompt, reference = text, ""
            return RenderedExample(prompt=prompt, target=text[len(prompt):] + self.eos, reference=reference, loss_on_prompt=True)
        user = self._field(record, cfg.input_field, index, "--input_field")
        answer = self._field(record, cfg.output_field, index, "--output_field")
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        return RenderedExample(prompt=prompt, target=answer + self.eos, reference=answer, loss_on_prompt=False)


def tokenize_example(example: RenderedExample, tokenizer, max_seq_length: int) -> dict[str, list[int]] | None:
    """input_ids + labels (prompt labels are -100 unless loss_on_prompt); None if nothing to learn remains."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + target_ids)[:max_seq_length]
    prompt_labels = list(prompt_ids) if example.loss_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + list(target_ids))[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class SupervisedDataset:
    """A list of tokenized examples, indexable as a torch Dataset."""

    def __init__(self, records: Sequence[dict], renderer: PromptRenderer, tokenizer, max_seq_length: int, *, split: str) -> None:
        self.rendered = [renderer.render(r, i) for i, r in enumerate(records)]
        self.items = []
        self.dropped = 0
        for example in self.rendered:
            item = tokenize_example(example, tokenizer, max_seq_length)
            if item is None:
                self.dropped += 1
            else:
                self.items.append(item)
        if not self.items:
            raise TrainInputError(
                f"every {split} example lost its answer to truncation at --max_seq_length {max_seq_length}; raise it",
                param="max_seq_length",
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]
