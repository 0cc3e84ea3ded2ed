"""Structured output: request fields -> a grammar -> one token matcher per row.

Owns three things:
  * :func:`constraint_from_fields`: the request fields that ask for constrained output (OpenAI
    ``response_format``; vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
    ``guided_grammar``) read into one :class:`ConstraintSpec`, or a :class:`RequestInvalid`
    naming the field (bad shape, two constraint fields at once, a schema keyword the grammar
    engine would not enforce);
  * :class:`ConstraintCompiler`: specs compiled by xgrammar against the served tokenizer, in a
    bounded, thread-safe LRU cache (compiling takes milliseconds to seconds: call it off the
    event loop);
  * :class:`GrammarConstraint`: the per-row matcher the engine drives through its
    ``TokenConstraint`` protocol (``fill_bitmask`` / ``accept`` / ``is_terminated``).

Why xgrammar (and not llguidance): measured in docs/structured-output.md (tools/grammar_engines.py).

What the matchers guarantee: a row only ever samples tokens that keep the output a prefix of a
sentence of the grammar; EOS (the tokenizer's, or the ids given as ``stop_token_ids``) is allowed
exactly where the output is complete, and accepting it terminates the matcher. Logit columns
past the tokenizer's vocabulary (padding of the model's head) and special tokens are never
allowed. JSON comes out on one line with ", " and ": " separators (no free whitespace: a small
model can otherwise loop on blanks forever). ``grammar`` text is xgrammar's EBNF (GBNF style,
``root ::= ...``) or, when it has no ``::=``, Lark with a ``start`` rule.

This module must not know the engine, the scheduler or HTTP: it imports neither (the engine only
sees the three methods above). xgrammar is imported when a compiler is built, so reading request
fields stays cheap for every caller.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from loraplex.server.errors import RequestInvalid

if TYPE_CHECKING:  # pragma: no cover
    import torch

Kind = Literal["json_object", "json_schema", "regex", "grammar", "choice"]

#: limits on what one request may ask to compile (compile time grows with them)
MAX_SCHEMA_CHARS = 64 * 1024
MAX_PATTERN_CHARS = 16 * 1024
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
DEFAULT_CACHE_SIZE = 128

#: JSON-schema keywords xgrammar enforces (checked by tests/unit/test_constraints.py) ...
_ENFORCED = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "anyOf", "minProperties", "maxProperties", "$ref", "$defs",
    "definitions",
})
#: ... and keywords that only annotate (nothing to enforce)
_ANNOTATIONS = frozenset({
    "title", "description", "$schema", "$id", "$comment", "$anchor", "default", "examples", "deprecated",
    "readOnly", "writeOnly",
})
#: string formats xgrammar enforces; any other "format" would be ignored, so it is refused
_FORMATS = frozenset({
    "date", "time", "date-time", "duration", "email", "uuid", "ipv4", "ipv6", "hostname", "uri", "uri-reference",
})
_RESPONSE_FORMAT_KEYS = frozenset({"type", "json_schema"})
_JSON_SCHEMA_KEYS = frozenset({"name", "schema", "strict", "description"})
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_XGR_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+?:\d+:\s*")  # "[12:00:00] /project/cpp/x.cc:94: " on errors


@dataclass(frozen=True, eq=False)
class ConstraintSpec:
    """What a request's output must match. ``value``: the schema dict (json_schema), None
    (json_object), the regex or grammar text, or the tuple of choices; ``field``: the request field
    it came from (errors name it)."""

    kind: Kind
    value: Any
    field: str
    key: str = dataclass_field(init=False, repr=False)  # the cache key: kind + the value's canonical text

    def __post_init__(self) -> None:
        # json.dumps keeps the schema's key order: xgrammar emits properties in declared order
        text = json.dumps(self.value, ensure_ascii=False, separators=(",", ":"))
        object.__setattr__(self, "key", f"{self.kind}:{text}")


def constraint_from_fields(
    *,
    response_format: Any = None,
    guided_json: Any = None,
    guided_regex: Any = None,
    guided_grammar: Any = None,
    guided_choice: Any = None,
) -> ConstraintSpec | None:
    """The one constraint a request asks for, or None. Raises RequestInvalid (param = the field)
    for a bad shape, an unsupported schema keyword, or two constraint fields at once. Does not
    compile anything (see :meth:`ConstraintCompiler.compile`)."""
    given = {"response_format": response_format, "guided_json": guided_json, "guided_regex": guided_regex,
             "guided_grammar": guided_grammar, "guided_choice": guided_choice}
    named = [k for k, v in given.items()
             if v is not None and not (k == "response_format" and isinstance(v, Mapping) and v.get("type") == "text")]
    if len(named) > 1:
        raise RequestInvalid(f"{' and '.join(named)} each constrain the output; give only one of them",
                             param=named[1])
    specs: list[ConstraintSpec] = []
    if response_format is not None:
        spec = _from_response_format(response_format)
        if spec is not None:
            specs.append(spec)
    if guided_json is not None:
        schema = guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise RequestInvalid(f"guided_json is not valid JSON: {exc}", param="guided_json") from None
        specs.append(ConstraintSpec("json_schema", _checked_schema(schema, "guided_json"), "guided_json"))
    if guided_regex is not None:
        specs.append(ConstraintSpec("regex", _checked_text(guided_regex, "guided_regex", "a regular expression"),
                                    "guided_regex"))
    if guided_grammar is not None:
        specs.append(ConstraintSpec("grammar", _checked_text(guided_grammar, "guided_grammar", "a grammar"),
                                    "guided_grammar"))
    if guided_choice is not None:
        specs.append(ConstraintSpec("choice", _checked_choices(guided_choice), "guided_choice"))
    return specs[0] if specs else None


def _from_response_format(value: Any) -> ConstraintSpec | None:
    param = "response_format"
    if not isinstance(value, Mapping):
        raise RequestInvalid(f"response_format must be an object like {{\"type\": \"json_object\"}}, "
                             f"got {type(value).__name__}", param=param)
    unknown = sorted(set(value) - _RESPONSE_FORMAT_KEYS)
    if unknown:
        raise RequestInvalid(f"response_format has unsupported keys {unknown}; supported: "
                             f"{sorted(_RESPONSE_FORMAT_KEYS)}", param=param)
    kind = value.get("type")
    if kind == "text":
        _no_schema_expected(value, kind)
        return None
    if kind == "json_object":
        _no_schema_expected(value, kind)
        return ConstraintSpec("json_object", None, param)
    if kind != "json_schema":
        raise RequestInvalid(f"response_format.type {kind!r} is not supported; use 'text', 'json_object' "
                             f"or 'json_schema'", param=param)
    body = value.get("json_schema")
    if not isinstance(body, Mapping):
        raise RequestInvalid("response_format.json_schema must be an object with 'name' and 'schema' when "
                             "type is 'json_schema'", param=param)
    unknown = sorted(set(body) - _JSON_SCHEMA_KEYS)
    if unknown:
        raise RequestInvalid(f"response_format.json_schema has unsupported keys {unknown}; supported: "
                             f"{sorted(_JSON_SCHEMA_KEYS)}", param=param)
    name = body.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise RequestInvalid(f"response_format.json_schema.name must be 1-64 letters, digits, '_' or '-', "
                             f"got {name!r}", param=param)
    strict = body.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestInvalid(f"response_format.json_schema.strict must be a boolean, got {strict!r}", param=param)
    if "schema" not in body:
        raise RequestInvalid("response_format.json_schema.schema is missing (the JSON schema the output "
                             "must follow)", param=param)
    # strict false or absent is served strictly too: the output always follows the schema
    return ConstraintSpec("json_schema", _checked_schema(body["schema"], param, "response_format.json_schema.schema"),
                          param)


def _no_schema_expected(value: Mapping, kind: str) -> None:
    if "json_schema" in value:
        raise RequestInvalid(f"response_format.json_schema is only allowed with type 'json_schema', not {kind!r}",
                             param="response_format")


def _checked_text(value: Any, param: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise RequestInvalid(f"{param} must be a non-empty string ({what}), got {value!r:.80}", param=param)
    if len(value) > MAX_PATTERN_CHARS:
        raise RequestInvalid(f"{param} has {len(value)} characters; the limit is {MAX_PATTERN_CHARS}", param=param)
    return value


def _checked_choices(value: Any) -> tuple[str, ...]:
    param = "guided_choice"
    if not isinstance(value, (list, tuple)) or not value:
        raise RequestInvalid(f"guided_choice must be a non-empty list of strings, got {value!r:.80}", param=param)
    if len(value) > MAX_CHOICES:
        raise RequestInvalid(f"guided_choice has {len(value)} choices; the limit is {MAX_CHOICES}", param=param)
    for i, choice in enumerate(value):
        if not isinstance(choice, str) or not choice:
            raise RequestInvalid(f"guided_choice[{i}] must be a non-empty string, got {choice!r:.80}", param=param)
        if len(choice) > MAX_CHOICE_CHARS:
            raise RequestInvalid(f"guided_choice[{i}] has {len(choice)} characters; the limit is "
                                 f"{MAX_CHOICE_CHARS}", param=param)
    return tuple(value)


def _checked_schema(schema: Any, param: str, where: str | None = None) -> dict:
    """A JSON schema that is valid (jsonschema's meta-schema) and uses only keywords xgrammar
    enforces; anything else is refused rather than silently not enforced."""
    where = where or param
    if not isinstance(schema, Mapping):
        raise RequestInvalid(f"{where} must be a JSON schema object, got {type(schema).__name__}", param=param)
    schema = dict(schema)
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        raise RequestInvalid(f"{where} is {size} characters of JSON; the limit is {MAX_SCHEMA_CHARS}", param=param)
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise RequestInvalid(f"{where} is not a valid JSON schema at {path}: {exc.message}", param=param) from None
    _check_keywords(schema, where, param)
    return schema


def _check_keywords(node: Any, path: str, param: str) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, Mapping):  # check_schema has refused these already
        raise RequestInvalid(f"{path} must be a schema object", param=param)
    for key, sub in node.items():
        if key in _ANNOTATIONS:
            continue
        if key not in _ENFORCED:
            raise RequestInvalid(
                f"{path} uses the JSON schema keyword {key!r}, which structured output cannot enforce; "
                f"supported keywords: {', '.join(sorted(_ENFORCED))}", param=param)
        if key == "format" and sub not in _FORMATS:
            raise RequestInvalid(f"{path}.format {sub!r} cannot be enforced; supported formats: "
                                 f"{', '.join(sorted(_FORMATS))}", param=param)
        if key == "$ref" and not (isinstance(sub, str) and sub.startswith("#")):
            raise RequestInvalid(f"{path}.$ref {sub!r} is not supported: only references inside the schema "
                                 f"('#/$defs/...')", param=param)
        if key == "items" and isinstance(sub, list):
            raise RequestInvalid(f"{path}.items as a list is not supported; use prefixItems", param=param)
        if key in ("properties", "$defs", "definitions"):
            for name, child in sub.items():
                _check_keywords(child, f"{path}.{key}.{name}", param)
        elif key in ("items", "additionalProperties"):
            _check_keywords(sub, f"{path}.{key}", param)
        elif key in ("prefixItems", "anyOf"):
            for i, child in enumerate(sub):
                _check_keywords(child, f"{path}.{key}[{i}]", param)


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int
    max_size: int


class GrammarConstraint:
    """One row's matcher (the engine's TokenConstraint): build a fresh one per row/choice."""

    __slots__ = ("_matcher", "_also")

    def __init__(self, compiled: Any, stop_token_ids: list[int] | None = None,
                 also: torch.Tensor | None = None) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)
        self._also = also  # int32 [ceil(vocab/32)]: a second mask ANDed into the grammar's (or None)

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Row ``index`` of ``bitmask`` (int32 [R, ceil(vocab/32)], CPU): bit set = allowed."""
        self._matcher.fill_next_token_bitmask(bitmask, index)
        if self._also is not None:
            bitmask[index].bitwise_and_(self._also)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False = the grammar refuses it (the row must end)."""
        return self._matcher.accept_token(int(token_id))

    def is_terminated(self) -> bool:
        """True once a stop token completed the output: nothing may follow."""
        return self._matcher.is_terminated()


class ConstraintCompiler:
    """Compiles specs against one tokenizer; ``vocab_size`` is the model's logits width (ids at or
    past the tokenizer's vocabulary are masked off). Thread-safe; at most ``cache_size`` compiled
    grammars are kept (least recently used dropped first)."""

    def __init__(self, tokenizer: Any, vocab_size: int, *, stop_token_ids: list[int] | None = None,
                 cache_size: int = DEFAULT_CACHE_SIZE, threads: int | None = None) -> None:
        import xgrammar

        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self._stop = list(stop_token_ids) if stop_token_ids else None
        self._info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                             stop_token_ids=self._stop)
        # our LRU bounds memory by count; xgrammar's own cache would be a second, unbounded copy
        self._compiler = xgrammar.GrammarCompiler(self._info, max_threads=threads or min(4, os.cpu_count() or 1),
                                                  cache_enabled=False)
        # xgrammar 0.2.9 lets raw control characters (U+0000-U+001F) into JSON strings that carry
        # maxLength/minLength/pattern, and JSON never holds them raw (our JSON has no free whitespace
        # either): JSON rows also get this mask, every token without such a byte
        self._json_mask = _mask_without_control_bytes(self._info.decoded_vocab, vocab_size)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._max = max(1, cache_size)
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def compile(self, spec: ConstraintSpec) -> Callable[[], GrammarConstraint]:
        """A factory of fresh matchers for ``spec``; RequestInvalid (param = spec.field) when the
        schema/regex/grammar cannot be compiled."""
        with self._lock:
            compiled = self._cache.get(spec.key)
            if compiled is not None:
                self._cache.move_to_end(spec.key)
                self._hits += 1
        if compiled is None:
            compiled = self._compile(spec)  # outside the lock: two different specs compile in parallel
            with self._lock:
                self._misses += 1
                self._cache[spec.key] = compiled
                self._cache.move_to_end(spec.key)
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        stop = self._stop
        also = self._json_mask if spec.kind in ("json_schema", "json_object") else None

        def factory() -> GrammarConstraint:
            return GrammarConstraint(compiled, stop, also)

        factory.compiled = compiled  # type: ignore[attr-defined]  # (tests: cache hits share it)
        return factory

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self._max)

    def _compile(self, spec: ConstraintSpec) -> Any:
        c = self._compiler
        try:
            if spec.kind == "json_object":
                # any JSON object (the builtin JSON grammar would also allow arrays)
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "json_schema":
                return c.compile_json_schema(json.dumps(spec.value), any_whitespace=False, strict_mode=True)
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            if spec.kind == "grammar":
                if "::=" in spec.value:
                    return c.compile_grammar(spec.value)
                return c.compile_lark(spec.value)
            if spec.kind == "choice":
                return c.compile_grammar("root ::= " + " | ".join(_ebnf_literal(s) for s in spec.value))
        except (RuntimeError, ValueError) as exc:
            what = {"json_schema": "JSON schema", "json_object": "JSON", "regex": "regular expression",
                    "grammar": "grammar", "choice": "choice list"}[spec.kind]
            message = _XGR_PREFIX.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RequestInvalid(f"{spec.field}: cannot compile the {what}: {message}", param=spec.field) from None
        raise ValueError(f"unknown constraint kind {spec.kind!r}")


def _mask_without_control_bytes(decoded_vocab: list[bytes], vocab_size: int) -> torch.Tensor:
    """int32 [ceil(vocab_size/32)]: bit i set when token i exists and none of its bytes is < 0x20
    (xgrammar's bitmask layout: token i is bit i % 32 of word i // 32)."""
    import numpy as np
    import torch

    words = (vocab_size + 31) // 32
    ok = np.zeros(words * 32, dtype=bool)  # [words * 32]
    for i, piece in enumerate(decoded_vocab[:vocab_size]):
        ok[i] = not any(b < 0x20 for b in piece)
    packed = np.packbits(ok, bitorder="little").view("<i4")  # [words]
    return torch.from_numpy(packed.copy())


def _ebnf_literal(text: str) -> str:
    """``text`` as an xgrammar EBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
