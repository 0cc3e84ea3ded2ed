"""Value checks for one generation request, shared by both fronts (HTTP and gRPC) through the
service: strict types, ranges, and text that must be valid Unicode. Every failure is a
:class:`RequestInvalid` naming the field, the value and the limit.

It knows nothing of HTTP, gRPC, the tokenizer or the engine; the service calls it.
"""

from __future__ import annotations

import math
from typing import Any

from loraplex.server.errors import RequestInvalid

#: a temperature below this is greedy decoding (dividing logits by 1e-40 gives inf/nan)
GREEDY_BELOW = 1e-5
TEMPERATURE_MAX = 2.0
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
#: top logprobs per token at most (chat top_logprobs, completions logprobs; vLLM's limit)
LOGPROBS_MAX = 20
PENALTY_MAX = 2.0  # presence_penalty, frequency_penalty in [-2, 2] (OpenAI)
REPETITION_PENALTY_MAX = 10.0  # repetition_penalty in (0, 10] (HF/vLLM: > 0; 1 = off)
LOGIT_BIAS_MAX = 100.0  # each logit_bias value in [-100, 100] (OpenAI)
#: longest model name echoed in an error (names are adapter names, <= 64 characters, or the base's)
MODEL_NAME_MAX = 256


def fail(message: str, param: str) -> None:
    raise RequestInvalid(message, param=param)


def short(value: Any, limit: int = 60) -> str:
    """A repr of a user value that is safe to put in an error message (ASCII, bounded)."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def text(value: Any, param: str, *, allow_empty: bool = True) -> str:
    """A str that encodes to UTF-8 (a lone surrogate such as "\\ud800" does not)."""
    if not isinstance(value, str):
        fail(f"{param} must be a string, got {type(value).__name__}", param)
    if not allow_empty and value == "":
        fail(f"{param} is empty", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        fail(f"{param} is not valid Unicode text: {short(value[exc.start : exc.end])} at index {exc.start} is a lone surrogate", param)
    return value


def integer(value: Any, param: str, *, low: int | None = None, high: int | None = None) -> int:
    """An int (never a bool, float or string) within [low, high]."""
    if type(value) is not int:
        fail(f"{param} must be an integer, got {short(value)} ({type(value).__name__})", param)
    if low is not None and value < low:
        fail(f"{param} must be >= {low}, got {value}", param)
    if high is not None and value > high:
        fail(f"{param} must be <= {high}, got {value}", param)
    return value


def number(value: Any, param: str) -> float:
    """A finite int or float (never a bool or string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"{param} must be a number, got {short(value)} ({type(value).__name__})", param)
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        fail(f"{param} must be a finite number, got {short(value)}", param)
    return result


def temperature(value: Any) -> float:
    """[0, 2]; below ``GREEDY_BELOW`` it means greedy (returns 0.0)."""
    if value is None:
        return 1.0
    result = number(value, "temperature")
    if not 0.0 <= result <= TEMPERATURE_MAX:
        fail(f"temperature must be in [0, {TEMPERATURE_MAX:g}], got {result}", "temperature")
    return 0.0 if result < GREEDY_BELOW else result


def top_p(value: Any) -> float:
    if value is None:
        return 1.0
    result = number(value, "top_p")
    if not 0.0 < result <= 1.0:
        fail(f"top_p must be in (0, 1], got {result}", "top_p")
    return result


def top_k(value: Any) -> int:
    """-1 or 0 = off (returns 0); a positive integer keeps that many tokens."""
    if value is None:
        return 0
    if type(value) is not int or value < -1:
        fail(f"top_k must be -1, 0 or a positive integer, got {short(value)}", "top_k")
    return 0 if value == -1 else value


def seed(value: Any) -> int | None:
    if value is None:
        return None
    return integer(value, "seed", low=SEED_MIN, high=SEED_MAX)


def flag(value: Any, param: str) -> bool:
    if type(value) is not bool:
        fail(f"{param} must be true or false, got {short(value)}", param)
    return value


def model_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        fail("model is required: an adapter name or the base model's name", "model")
    text(value, "model")
    if len(value) > MODEL_NAME_MAX:
        fail(f"model name has {len(value)} characters; the limit is {MODEL_NAME_MAX}", "model")
    return value


def token_ids(values: Any, param: str, vocab: int) -> list[int]:
    """Integers in [0, vocab) (strict: no bools or floats)."""
    out = []
    for value in values:
        if type(value) is not int or not 0 <= value < vocab:
            fail(f"{param} value {short(value)} is outside the vocabulary [0, {vocab})", param)
        out.append(value)
    return out


def penalty(value: Any, param: str) -> float:
    """presence_penalty / frequency_penalty: [-2, 2]; None = 0 (off)."""
    if value is None:
        return 0.0
    result = number(value, param)
    if not -PENALTY_MAX <= result <= PENALTY_MAX:
        fail(f"{param} must be in [-{PENALTY_MAX:g}, {PENALTY_MAX:g}], got {result}", param)
    return result


def repetition_penalty(value: Any) -> float:
    """(0, REPETITION_PENALTY_MAX]; None = 1 (off)."""
    if value is None:
        return 1.0
    result = number(value, "repetition_penalty")
    if not 0.0 < result <= REPETITION_PENALTY_MAX:
        fail(f"repetition_penalty must be in (0, {REPETITION_PENALTY_MAX:g}], got {result}", "repetition_penalty")
    return result


def logit_bias(value: Any, vocab: int, max_entries: int) -> tuple[tuple[int, float], ...]:
    """{token id (int or its decimal string): bias in [-100, 100]}, at most ``max_entries``;
    returned sorted by token id."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        fail(f"logit_bias must be an object mapping token ids to numbers, got {type(value).__name__}", "logit_bias")
    if len(value) > max_entries:
        fail(f"logit_bias has {len(value)} entries; the limit is {max_entries} (--max-logit-bias)", "logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit() and key.strip() == key and len(key) <= 12:
            token = int(key)
        if type(token) is not int or not 0 <= token < vocab:
            fail(f"logit_bias key {short(key)} is not a token id in the vocabulary [0, {vocab})", "logit_bias")
        amount = number(bias, "logit_bias")
        if not -LOGIT_BIAS_MAX <= amount <= LOGIT_BIAS_MAX:
            fail(f"logit_bias[{token}] must be in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}], got {amount}", "logit_bias")
        if token in out:
            fail(f"logit_bias names token {token} twice", "logit_bias")
        out[token] = amount
    return tuple(sorted(out.items()))
