"""Weighted adapter mixes named by a request: what a mix is (``MixSpec``) and how a request names
one (``parse_mix``), with every limit checked here so HTTP and gRPC refuse the same things.

Two request forms name a mix:

* the body field ``adapters``: ``[{"name": "extract", "weight": 0.7}, {"name": "datefmt",
  "weight": 0.3}]``, with ``model`` set to the base's served name;
* the compact model name ``extract:0.7+datefmt:0.3`` (for clients that can only set ``model``);
  ``,`` may separate members too, and a member without ``:weight`` has weight 1.

Adapter names never contain ``:``, ``+`` or ``,`` (``store/names.py``), so the compact form can
never be mistaken for an adapter. A mix's output for a token is the base plus
``sum_i weight_i * scale_i * B_i A_i x``: the same as peft's ``add_weighted_adapter(...,
combination_type="cat")`` (rank concatenation), exactly for LoRA.

Knows names and numbers only: nothing of the registry, the engine, HTTP or gRPC.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from loraplex.server.errors import RequestInvalid
from loraplex.server.store.names import MAX_NAME_LENGTH, NAME_PATTERN

#: the largest |weight| a member may have (larger ones only blow the logits up)
MAX_MIX_WEIGHT = 8.0
#: what separates members in the compact form (and in ``loraplex adapters mix`` recipes)
_SEPARATORS = re.compile(r"[+,]")
#: the keys an entry of the ``adapters`` body field may have
_ENTRY_KEYS = frozenset({"name", "weight"})


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_weight(weight: float) -> str:
    """The shortest spelling that reads back as the same float (``0.7``, ``1``, ``-0.25``)."""
    short = f"{weight:g}"
    return short if float(short) == weight else repr(weight)


@dataclass(frozen=True)
class MixSpec:
    """A weighted mix of adapters: (name, weight) in request order, names unique."""

    members: tuple[tuple[str, float], ...]
    #: the request field it came from ("adapters" or "model"): errors about the mix name it
    field: str = field(default="adapters", compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.members)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for _, weight in self.members)

    @property
    def label(self) -> str:
        """Canonical spelling, ``a:0.7+b:0.3`` (request order): logs, and a valid compact model name."""
        return "+".join(f"{name}:{format_weight(weight)}" for name, weight in self.members)

    @property
    def member_set(self) -> str:
        """The members' names sorted and joined with ``+`` (no weights): the ``members`` label of
        the mix metrics, so that tuning a weight does not mint a new series."""
        return "+".join(sorted(self.names))


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise RequestInvalid(message, param=param)


def _check_name(name: Any, where: str, param: str, base_name: str) -> str:
    _check(isinstance(name, str), f"{where} must be a string (an adapter name), got {_short(name)}", param)
    _check(
        0 < len(name) <= MAX_NAME_LENGTH and NAME_PATTERN.fullmatch(name) is not None and not name.startswith("."),
        f"{where} {_short(name)} is not an adapter name (A-Z a-z 0-9 . _ -, 1 to {MAX_NAME_LENGTH} characters, not starting with '.')",
        param,
    )
    _check(name != base_name, f"{where} {_short(name)} is the base model, not an adapter; a mix combines adapters only", param)
    return name


def _check_weight(weight: Any, where: str, param: str) -> float:
    _check(
        isinstance(weight, (int, float)) and not isinstance(weight, bool),
        f"{where} must be a number, got {_short(weight)}",
        param,
    )
    value = float(weight)
    _check(math.isfinite(value), f"{where} must be finite, got {_short(weight)}", param)
    _check(value != 0, f"{where} is 0: drop the member instead", param)
    _check(abs(value) <= MAX_MIX_WEIGHT, f"{where} is {format_weight(value)}; |weight| may be at most {format_weight(MAX_MIX_WEIGHT)}", param)
    return value


def _finish(members: list[tuple[str, float]], *, param: str, max_members: int, source: str) -> MixSpec:
    _check(len(members) > 0, f"{source} names no adapters", param)
    _check(
        len(members) <= max_members,
        f"{source} mixes {len(members)} adapters; the limit is {max_members} (--max-mix-adapters)",
        param,
    )
    seen: set[str] = set()
    for name, _ in members:
        _check(name not in seen, f"{source} names adapter {name!r} twice", param)
        seen.add(name)
    return MixSpec(tuple(members), field=param)


def parse_members(text: str, *, param: str, base_name: str = "", max_members: int) -> MixSpec:
    """A compact recipe ``a:0.7+b:0.3`` (or ``a:0.7,b:0.3``; a member without ``:w`` weighs 1)
    as a MixSpec; RequestInvalid with ``param`` naming what is wrong. Shared by requests (the
    compact model name) and ``loraplex adapters mix``."""
    _check(isinstance(text, str), f"{param} must be a string, got {_short(text)}", param)
    parts = _SEPARATORS.split(text)
    # counted before the members are read, so a huge list costs nothing
    _check(
        len(parts) <= max_members,
        f"{param} {_short(text)} mixes {len(parts)} adapters; the limit is {max_members} (--max-mix-adapters)",
        param,
    )
    members = []
    for i, part in enumerate(parts):
        item = part.strip()
        _check(item != "", f"{param} {_short(text)} has an empty member (#{i + 1}); write name:weight joined by '+'", param)
        name, colon, weight_text = item.partition(":")
        name = name.strip()
        _check_name(name, f"member #{i + 1} of {param} {_short(text)}:", param, base_name)
        weight = 1.0
        if colon:
            weight_text = weight_text.strip()
            try:
                weight = float(weight_text)
            except ValueError:
                raise RequestInvalid(f"the weight of {name!r} in {param} {_short(text)} is {weight_text!r}, not a number", param=param) from None
            weight = _check_weight(weight, f"the weight of {name!r} in {param}", param)
        members.append((name, weight))
    return _finish(members, param=param, max_members=max_members, source=f"{param} {_short(text)}")


def is_compact_mix(model: Any) -> bool:
    """Does this model name use the compact mix form (``:``, ``+`` or ``,``)?"""
    return isinstance(model, str) and any(c in model for c in ":+,")


def parse_mix(model: str, adapters: list | None, *, base_name: str, max_members: int) -> MixSpec | None:
    """The mix a request names, or None when it names one adapter or the base (``model`` plain).

    * ``adapters`` given (the body field): ``model`` must be the base's served name, and each
      entry ``{"name": str, "weight": number}`` (weight defaults to 1; no other keys).
    * else a ``model`` with ``:``, ``+`` or ``,`` is the compact form ``a:0.7+b:0.3``.

    RequestInvalid (400, ``param`` = ``adapters`` or ``model``) for: no members, more than
    ``max_members``, a name twice, a name that is not an adapter name (or is the base), a weight
    that is not a finite non-zero number with |w| <= 8, ``adapters`` with a model other than the
    base, an entry that is not an object or has other keys.
    """
    if adapters is not None:
        _check(
            model == base_name,
            f"the adapters field mixes adapters over the base, so model must be the base's name {base_name!r}; got model {_short(model)}",
            "adapters",
        )
        _check(isinstance(adapters, (list, tuple)), f"adapters must be a list of {{\"name\", \"weight\"}} objects, got {_short(adapters)}", "adapters")
        _check(len(adapters) > 0, "adapters is an empty list; name at least one adapter (or leave the field out)", "adapters")
        _check(
            len(adapters) <= max_members,
            f"adapters mixes {len(adapters)} adapters; the limit is {max_members} (--max-mix-adapters)",
            "adapters",
        )
        members = []
        for i, entry in enumerate(adapters):
            where = f"adapters[{i}]"
            _check(isinstance(entry, dict), f"{where} must be an object {{\"name\", \"weight\"}}, got {_short(entry)}", "adapters")
            unknown = sorted(str(k) for k in entry if k not in _ENTRY_KEYS)
            _check(not unknown, f"{where} has unsupported keys {unknown}; an entry has only name and weight", "adapters")
            _check("name" in entry, f"{where} has no name", "adapters")
            name = _check_name(entry["name"], f"{where}.name", "adapters", base_name)
            weight = _check_weight(entry["weight"], f"{where}.weight", "adapters") if "weight" in entry else 1.0
            members.append((name, weight))
        return _finish(members, param="adapters", max_members=max_members, source="adapters")
    if model == base_name or not is_compact_mix(model):
        return None
    return parse_members(model, param="model", base_name=base_name, max_members=max_members)


def mix_from_pairs(pairs: Sequence[tuple[str, float]], *, base_name: str = "", max_members: int) -> MixSpec:
    """A MixSpec from (name, weight) pairs that came from a typed source (gRPC fields, code), with
    the same checks as the ``adapters`` body field."""
    return parse_mix(base_name, [{"name": n, "weight": w} for n, w in pairs], base_name=base_name, max_members=max_members)  # type: ignore[return-value]
