"""Training data: load records with Hugging Face ``datasets``, slice splits, render, tokenize, pack.

Sources: data files of any format ``datasets`` reads (.json/.jsonl/.csv/.parquet/.arrow), a folder
written by ``save_to_disk``, or a hub dataset (``--data_name``/``--data_config``; offline that is a
clear error). Files form the split ``train``; splits use ``datasets``' own slice syntax
(``train``, ``train[:4096]``, ``train[4096:4224]``, ``train[:90%]``, ``train[:10]+train[-10:]``).
Records are rendered by format (see formats.py) with the base's chat template (loss on assistant
turns only: every other token's label is -100) or an Olive-style ``{field}`` template (loss on the
whole text). This module knows nothing of models or training loops.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from loraplex.training.config import TrainConfig, TrainInputError
from loraplex.training.formats import check_records, reference_of, text_field, to_messages

IGNORE_INDEX = -100
#: File suffix -> the ``datasets`` builder that reads it.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
Splits = dict[str, list[dict[str, Any]]]


def _datasets_cache() -> str:
    from loraplex.server.basemodel.cache import cache_root

    return str(cache_root() / "datasets")


def _json_problem(path: Path) -> str | None:
    """Name the first bad line/record of a JSON(L) file that ``datasets`` refused."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                return f"{path}:{lineno}: not valid JSON ({exc})"
            if not isinstance(value, dict):
                return f"{path}:{lineno}: record is a {type(value).__name__}, expected an object with fields"
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        return f"{path}: not valid JSON ({exc})"
    if isinstance(data, list):
        for i, value in enumerate(data):
            if not isinstance(value, dict):
                return f"{path}: record {i} is a {type(value).__name__}, expected an object with fields"
    elif not isinstance(data, dict):
        return f"{path}: expected a JSON list of records, got {type(data).__name__}"
    return None


def _as_records(dataset, where: str) -> list[dict[str, Any]]:
    records = dataset.to_list()
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise TrainInputError(f"{where}: record {i} is a {type(record).__name__}, expected an object with fields")
    return records


def _load_file(path: Path) -> list[dict[str, Any]]:
    import datasets

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise TrainInputError(
            f"data file {path}: unsupported extension {path.suffix!r}; use {', '.join(sorted(BUILDERS))} or a saved dataset folder",
            param="data_files",
        )
    if not path.read_bytes().strip():
        return []  # datasets cannot infer a schema from nothing; "no records" is reported by the caller
    problem = _json_problem(path) if builder == "json" else None  # datasets reads [1, 2] as a column: check first
    if problem:
        raise TrainInputError(problem, param="data_files")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=_datasets_cache())
    except Exception as exc:  # datasets wraps parse errors in its own types
        cause = exc.__cause__ or exc
        raise TrainInputError(problem or f"data file {path}: {builder} reader failed ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})", param="data_files") from exc
    if builder == "json" and _has_temporal(dataset.features):
        # pyarrow's JSON reader turns date-like strings ("1983-02-12") into timestamps, and no
        # option of the datasets builder stops it; JSON has no date type, so read the text as is
        return _python_json_records(path)
    return _as_records(dataset, str(path))


def _has_temporal(features) -> bool:
    """Any date/time type anywhere in a datasets ``Features`` (nested lists and dicts included)."""
    import pyarrow as pa

    def walk(t) -> bool:
        if pa.types.is_temporal(t):
            return True
        if pa.types.is_struct(t):
            return any(walk(t.field(i).type) for i in range(t.num_fields))
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return walk(t.value_type)
        return False

    return any(walk(field.type) for field in features.arrow_schema)


def _python_json_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


def _load_saved(folder: Path) -> Splits:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise TrainInputError(
            f"data folder {folder} is not a dataset saved with save_to_disk ({type(exc).__name__}: {exc})", param="data_files"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        return {name: _as_records(ds, f"{folder}[{name}]") for name, ds in loaded.items()}
    return {"train": _as_records(loaded, str(folder))}


def _load_hub(name: str, config: str | None) -> Splits:
    import datasets

    label = f"{name!r}" + (f" (config {config!r})" if config else "")
    try:
        loaded = datasets.load_dataset(name, config, cache_dir=_datasets_cache())
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TrainInputError(
            f"hub dataset {label} could not be loaded ({type(exc).__name__}: {first}); without network (or with "
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set) only datasets already in the cache load: download it where there is "
            "network, or pass local files with --data_files",
            param="data_name",
        ) from exc
    return {split: _as_records(ds, f"{name}[{split}]") for split, ds in loaded.items()}


def load_splits(cfg_or_paths: TrainConfig | Sequence[Path]) -> Splits:
    """Every record of the data source, by split name (files and plain saved datasets form 'train')."""
    if isinstance(cfg_or_paths, TrainConfig):
        if cfg_or_paths.data_name:
            splits = _load_hub(cfg_or_paths.data_name, cfg_or_paths.data_config)
            if not any(splits.values()):
                raise TrainInputError(f"hub dataset {cfg_or_paths.data_name!r} holds no records", param="data_name")
            return splits
        paths: Sequence[Path] = cfg_or_paths.data_paths
    else:
        paths = cfg_or_paths
    splits: Splits = {}
    for path in paths:
        if path.is_dir():
            for split, records in _load_saved(path).items():
                splits.setdefault(split, []).extend(records)
        elif path.is_file():
            splits.setdefault("train", []).extend(_load_file(path))
        else:
            raise TrainInputError(f"data file {path} does not exist", param="data_files")
    if not any(splits.values()):
        raise TrainInputError(f"data files {', '.join(map(str, paths))} hold no records", param="data_files")
    return splits


def load_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """All records of the 'train' split of these files (tests and simple callers)."""
    return load_splits(paths).get("train", [])


# ------------------------------------------------------------------ splits
def split_positions(spec: str, sizes: dict[str, int]) -> list[tuple[str, int]]:
    """(split name, index) pairs a split spec selects, by ``datasets.ReadInstruction`` ('train[10:20]', 'train[:90%]')."""
    from datasets import ReadInstruction

    compact = re.sub(r"\s+", "", spec)
    try:
        instructions = ReadInstruction.from_spec(compact).to_absolute(sizes)
    except (ValueError, AssertionError, KeyError) as exc:
        known = ", ".join(sorted(sizes)) or "none"
        raise TrainInputError(
            f"split {spec!r} is not understood ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); use 'train', "
            f"'train[START:END]', 'train[:P%]' or parts joined by '+' (splits here: {known})"
        ) from exc
    return [(ins.splitname, i) for ins in instructions for i in range(ins.from_, ins.to)]


def split_indices(spec: str, n: int) -> list[int]:
    """Indices selected by a split spec over ``n`` records of the single split 'train'."""
    positions = split_positions(spec, {"train": n})
    if any(name != "train" for name, _ in positions):
        raise TrainInputError(f"split {spec!r} is not understood; the data files form the single split 'train'")
    return [i for _, i in positions]


def looks_like_label(values: Sequence[Any]) -> bool:
    """Few distinct short values that repeat: a classification label."""
    distinct = {str(v) for v in values}
    return 1 < len(distinct) <= 32 and len(distinct) * 2 <= len(values) and all(len(v) <= 64 for v in distinct)


def default_holdout(labels: Sequence[Any], seed: int, fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """Hold out ``fraction`` for eval (at least 1), stratified when ``labels`` look like class labels."""
    rng = random.Random(seed)
    n = len(labels)
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


def make_splits(data: Splits | Sequence[dict], cfg: TrainConfig, fmt: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train records, eval records). With --eval_only the eval split defaults to all of 'train'."""
    splits: Splits = data if isinstance(data, dict) else {"train": list(data)}
    sizes = {name: len(records) for name, records in splits.items()}
    total = sum(sizes.values())
    if cfg.eval_only:
        eval_pos = split_positions(cfg.eval_split or "train", sizes)
        if not eval_pos:
            raise TrainInputError(f"the eval split is empty after splitting {total} records (--eval_split {cfg.eval_split!r})", param="eval_split")
        return [], [splits[s][i] for s, i in eval_pos]
    if cfg.train_split is None and cfg.eval_split is None:
        train = splits.get("train") or []
        if not train:
            raise TrainInputError(f"the data has no 'train' split (splits: {', '.join(sorted(sizes))}); pass --train_split and --eval_split", param="train_split")
        fmt = fmt or check_records(train, cfg)
        train_idx, eval_idx = default_holdout([reference_of(r, fmt, cfg) for r in train], cfg.seed)
        train_pos = [("train", i) for i in train_idx]
        eval_pos = [("train", i) for i in eval_idx]
    else:
        train_pos = split_positions(cfg.train_split, sizes) if cfg.train_split else None
        eval_pos = split_positions(cfg.eval_split, sizes) if cfg.eval_split else None
        everything = split_positions("train", sizes) if "train" in sizes else []
        if train_pos is None:
            held = set(eval_pos or [])
            train_pos = [p for p in everything if p not in held]
        if eval_pos is None:
            chosen = set(train_pos)
            eval_pos = [p for p in everything if p not in chosen]
    if not train_pos:
        raise TrainInputError(f"the training split is empty after splitting {total} records (--train_split {cfg.train_split!r})", param="train_split")
    if not eval_pos:
        raise TrainInputError(
            f"the eval split is empty after splitting {total} records (--train_split {cfg.train_split!r}, --eval_split {cfg.eval_split!r}); "
            "leave records out of --train_split or give --eval_split",
            param="eval_split",
        )
    return [splits[s][i] for s, i in train_pos], [splits[s][i] for s, i in eval_pos]


def prepare_records(cfg: TrainConfig) -> tuple[str, list[dict], list[dict]]:
    """Load, split and check every record (format, fields, types) before any model loads."""
    splits = load_splits(cfg)
    train, evaluation = make_splits(splits, cfg)
    first = (train or evaluation)[0]
    from loraplex.training.formats import detect_format

    fmt = detect_format(first, cfg)
    for part in (train, evaluation):
        if part:
            _checked = check_records(part, cfg)
            if _checked != fmt:  # e.g. the eval split of a hub dataset in another format
                raise TrainInputError(f"the training records are in {fmt} format but the eval records in {_checked}", param="eval_split")
    return fmt, train, evaluation


# --------------------------------------------------------------- rendering
@dataclass(frozen=True)
class RenderedExample:
    """One record as text: ``segments`` (text, trained?) make the training sequence; ``prompt`` is what
    generation starts from at evaluation and ``reference`` the expected answer (the last assistant turn)."""

    segments: tuple[tuple[str, bool], ...]
    prompt: str
    reference: str

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


class _StrictFormatter(string.Formatter):
    def __init__(self, index: int) -> None:
        self.index = index

    def get_value(self, key, args, kwargs):
        if isinstance(key, int) or key not in kwargs:
            raise TrainInputError(
                f"--text_template field {{{key}}} is absent from record {self.index} (its fields: {', '.join(sorted(kwargs)) or 'none'})",
                param="text_template",
            )
        return text_field(kwargs, key, self.index, f"--text_template {{{key}}}")


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class PromptRenderer:
    """Renders records for training and evaluation, with a ``{field}`` template or the chat template."""

    def __init__(self, cfg: TrainConfig, tokenizer, fmt: str | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.fmt = fmt or ("template" if cfg.text_template is not None else None)
        self.eos = tokenizer.eos_token or ""
        if cfg.text_template is None and not getattr(tokenizer, "chat_template", None):
            raise TrainInputError(
                "the base model's tokenizer has no chat template; pass --text_template to render records", param="text_template"
            )

    def _template(self, record: dict, index: int) -> RenderedExample:
        cfg = self.cfg
        template = cfg.text_template or ""
        text = _StrictFormatter(index).format(template, **record)
        marker = "{" + cfg.output_field + "}"
        if marker in template:
            prompt = _StrictFormatter(index).format(template.split(marker, 1)[0], **record)
            reference = text_field(record, cfg.output_field, index, "--output_field")
        else:
            prompt, reference = text, ""
        return RenderedExample(segments=((text + self.eos, True),), prompt=prompt, reference=reference)

    def _chat(self, messages: list[dict[str, str]], index: int) -> RenderedExample:
        """Each assistant turn is trained; everything else (system, user, template markup) is context.

        The conversation is rendered prefix by prefix: the text up to an assistant turn with the
        generation prompt, then through that turn; the difference is the turn's trained text."""
        apply = self.tokenizer.apply_chat_template
        segments: list[tuple[str, bool]] = []
        done = ""
        prompt = ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = apply(messages[:k], add_generation_prompt=True, tokenize=False)
            through = apply(messages[: k + 1], tokenize=False)
            if not before.startswith(done) or not through.startswith(before):
                raise TrainInputError(
                    f"record {index}: the base's chat template does not render this conversation turn by turn "
                    "(earlier turns change when later ones are added); use --text_template",
                    param="data_format",
                )
            segments.append((before[len(done):], False))
            segments.append((through[len(before):], True))
            done, prompt = through, before
        return RenderedExample(segments=tuple(s for s in segments if s[0]), prompt=prompt, reference=messages[-1]["content"])

    def render(self, record: dict, index: int) -> RenderedExample:
        if self.fmt == "template":
            return self._template(record, index)
        fmt = self.fmt
        if fmt is None:
            from loraplex.training.formats import detect_format

            fmt = self.fmt = detect_format(record, self.cfg)
        return self._chat(to_messages(record, index, fmt, self.cfg), index)


def tokenize_example(example: RenderedExample, tokenizer, max_seq_length: int) -> dict[str, list[int]] | None:
    """input_ids + labels (-100 on untrained segments); None if truncation left nothing to learn."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in example.segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
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


# ----------------------------------------------------------------- packing
class PackedDataset:
    """Tokenized examples packed first-fit, in order, into rows of at most ``max_seq_length`` tokens.

    Each row carries ``position_ids`` that restart at 0 for every example; with no 2-D attention mask,
    transformers' mask builder (sdpa/eager) reads the restarts as sequence boundaries and makes the
    causal mask block-diagonal, so packed examples never attend to each other. The first label of
    every example is -100: it would otherwise be predicted from the previous example's last token.
    """

    def __init__(self, items: Sequence[dict[str, list[int]]], max_seq_length: int) -> None:
        rows: list[list[dict[str, list[int]]]] = []
        lengths: list[int] = []
        for item in items:
            n = len(item["input_ids"])
            for r, used in enumerate(lengths):
                if used + n <= max_seq_length:
                    rows[r].append(item)
                    lengths[r] += n
                    break
            else:
                rows.append([item])
                lengths.append(n)
        self.examples = len(items)
        self.rows = [self._join(row) for row in rows]

    @staticmethod
    def _join(row: list[dict[str, list[int]]]) -> dict[str, list[int]]:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for item in row:
            input_ids.extend(item["input_ids"])
            labels.extend([IGNORE_INDEX] + list(item["labels"][1:]))
            positions.extend(range(len(item["input_ids"])))
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


class PackedCollator:
    """Right-pads packed rows; padding is its own 'example' (positions from 0, labels -100), so it
    attends only to itself. No attention_mask and no KV cache: that is what selects the packed path.
    Unpacked examples (the eval split) go to ``unpacked``, the ordinary padding collator."""

    def __init__(self, pad_token_id: int, unpacked=None) -> None:
        self.pad_token_id = pad_token_id
        self.unpacked = unpacked

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        if self.unpacked is not None and "position_ids" not in rows[0]:
            return self.unpacked(rows)

        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
        out: dict[str, Any] = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}  # each [rows, width]
        out["use_cache"] = False
        return out
