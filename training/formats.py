"""Record formats: which one a dataset is in, and each record as chat messages.

Formats, detected from the first record (``--data_format auto``) or named:

- ``chat``: OpenAI fine-tuning format, ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}``;
  every assistant turn is a training target, system prompts are kept, conversations may be multi-turn.
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}]}`` (``user``/``assistant``
  accepted as ``from`` values too).
- ``alpaca``: ``{"instruction": str, "input": str (may be empty), "output": str}``.
- ``input_output``: the ``--input_field`` / ``--output_field`` pair (default ``input`` / ``output``); naming a
  field with either flag selects this format.
- ``template``: ``--text_template`` (rendering lives in data.py).

Every record is checked here, before any model loads: a missing or non-text field is an error naming the
field and the record index. This module knows nothing of tokenizers or models.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from loraplex.training.config import TrainConfig, TrainInputError

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
#: Format -> the record key that marks it.
_MARKERS = (("chat", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"))
Messages = list[dict[str, str]]


def _present(record: dict, key: str) -> bool:
    value = record.get(key)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _fields(record: dict) -> str:
    return ", ".join(sorted(map(str, record))) or "none"


def detect_format(record: dict, cfg: TrainConfig) -> str:
    """The format of ``record`` (the first of the data) under cfg's flags."""
    if cfg.text_template is not None:
        return "template"
    if cfg.data_format != "auto":
        return cfg.data_format
    if cfg.input_field != "input" or cfg.output_field != "output":
        return "input_output"  # the user named the fields: take them at their word (and check them)
    found = [fmt for fmt, key in _MARKERS if _present(record, key)]
    if "alpaca" not in found and _present(record, "input") and _present(record, "output"):
        found.append("input_output")
    if len(found) == 1:
        return found[0]
    if not found:
        raise TrainInputError(
            f"record 0 matches no known data format (its fields: {_fields(record)}); expected 'messages' (OpenAI chat), "
            "'conversations' (ShareGPT), instruction/input/output (alpaca) or input/output; name other fields with "
            "--input_field/--output_field or render them with --text_template",
            param="data_format",
        )
    raise TrainInputError(
        f"record 0 has the fields of several data formats ({', '.join(found)}); pass --data_format {'|'.join(found)} to choose",
        param="data_format",
    )


def text_field(record: dict, name: str, index: int, flag: str, *, optional: bool = False) -> str:
    """A field as text: strings as they are, numbers as written; anything else is refused."""
    if not _present(record, name):
        if optional:
            return ""
        raise TrainInputError(
            f"field {name!r} ({flag}) is absent from record {index} (its fields: {_fields(record)})", param=flag.lstrip("-")
        )
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        hint = ""
        if isinstance(value, list) and value and isinstance(value[0], dict) and ({"role", "content"} <= set(value[0]) or {"from", "value"} <= set(value[0])):
            hint = "; it holds a conversation: drop --input_field/--output_field so the format is detected (or pass --data_format chat|sharegpt)"
        raise TrainInputError(
            f"field {name!r} ({flag}) of record {index} is a {type(value).__name__}, not text{hint}", param=flag.lstrip("-")
        )
    return str(value)


def _turns(record: dict, index: int, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> Messages:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise TrainInputError(f"record {index}: {key!r} must be a non-empty list of turns, got {type(turns).__name__}", param="data_files")
    messages: Messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise TrainInputError(f"record {index}: {key}[{t}] is a {type(turn).__name__}, expected an object with {role_key!r} and {text_key!r}", param="data_files")
        role = turn.get(role_key)
        if role not in roles:
            raise TrainInputError(f"record {index}: {key}[{t}].{role_key} is {role!r}; expected one of {', '.join(roles)}", param="data_files")
        text = turn.get(text_key)
        if not isinstance(text, str):
            raise TrainInputError(f"record {index}: {key}[{t}].{text_key} is a {type(text).__name__}, not text", param="data_files")
        messages.append({"role": roles[role], "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainInputError(f"record {index}: {key!r} has no assistant turn to learn from", param="data_files")
    if messages[-1]["role"] != "assistant":
        raise TrainInputError(f"record {index}: {key!r} must end with an assistant turn (the last turn is {messages[-1]['role']!r})", param="data_files")
    return messages


def to_messages(record: dict, index: int, fmt: str, cfg: TrainConfig) -> Messages:
    """One record as chat messages (any format but ``template``)."""
    if fmt == "chat":
        return _turns(record, index, "messages", "role", "content", {r: r for r in CHAT_ROLES})
    if fmt == "sharegpt":
        return _turns(record, index, "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        instruction = text_field(record, "instruction", index, "alpaca 'instruction'")
        extra = text_field(record, "input", index, "alpaca 'input'", optional=True)
        output = text_field(record, "output", index, "alpaca 'output'")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "input_output":
        user = text_field(record, cfg.input_field, index, "--input_field")
        answer = text_field(record, cfg.output_field, index, "--output_field")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    raise TrainInputError(f"--data_format {fmt!r} is not one of chat, alpaca, sharegpt, input_output", param="data_format")


def reference_of(record: dict, fmt: str, cfg: TrainConfig) -> Any:
    """The expected answer of a record (the last assistant turn), for stratified splits and metrics."""
    if fmt in ("template", "input_output"):
        return record.get(cfg.output_field)
    if fmt == "alpaca":
        return record.get("output")
    key, text_key = ("messages", "content") if fmt == "chat" else ("conversations", "value")
    turns = record.get(key)
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
        return turns[-1].get(text_key)
    return None


def check_records(records: Sequence[dict], cfg: TrainConfig) -> str:
    """Detect the format and check every record against it (no tokenizer, no model); returns the format."""
    fmt = detect_format(records[0], cfg)
    for i, record in enumerate(records):
        if fmt == "template":
            from loraplex.training.data import template_fields

            for name in template_fields(cfg.text_template or ""):
                text_field(record, name, i, f"--text_template {{{name}}}")
        else:
            to_messages(record, i, fmt, cfg)
    return fmt
