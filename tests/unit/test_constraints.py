"""server/constraints.py with the real grammar engine (xgrammar) and real tokenizers: the
embedded base's SmolLM2 tokenizer (vocab 49152) and a tiny byte-level BPE trained here (other
token boundaries, other ids).

Outputs are produced by seeded random walks: at each step the matcher fills its bitmask row,
a token is drawn at random among the allowed ones, and accepted, until the matcher terminates.
The decoded text is then checked by independent judges: ``jsonschema`` for schemas, ``re`` for
regexes, list membership for choices. EOS must be allowed only where the output is complete.
"""

from __future__ import annotations

import json
import random
import re
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from loraplex.server.constraints import (  # noqa: E402
    ConstraintCompiler,
    ConstraintSpec,
    constraint_from_fields,
)
from loraplex.server.errors import RequestInvalid  # noqa: E402

PAD = 64  # the model head is wider than the tokenizer: these ids must never be allowed


def _tiny_bpe():
    """A 400-token byte-level BPE with an EOS token, trained on a few JSON-ish lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ['{"name": "Ada", "age": 36, "tags": ["a", "b"]}', "hello world yes no maybe", "2024-01-31 12345"] * 20
    trainer = BpeTrainer(vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module", params=["smollm2", "tiny-bpe"])
def setup(request):
    """(compiler, tokenizer, logits width, closers) for each tokenizer; closers: bool [width],
    the tokens made only of closing characters (drawn half the time, so that walks end)."""
    if request.param == "smollm2":
        tok = request.getfixturevalue("tokenizer")  # tests/conftest.py: from the embedded GGUF (make test installs it)
    else:
        tok = _tiny_bpe()
    width = len(tok) + PAD
    closers = np.zeros(width, dtype=bool)
    for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        closers[i] = bool(t) and set(t) <= set('"}]')
    return ConstraintCompiler(tok, width), tok, width, closers


def _bits(row):
    """bool [32 * W]: the allowed tokens of one int32 bitmask row [W] (token i = bit i % 32 of
    word i // 32; numpy: torch's small ops are slow on a busy 2-core machine)."""
    return np.unpackbits(row.numpy().view(np.uint8), bitorder="little").astype(bool)


def _allowed(row) -> list[int]:
    return np.flatnonzero(_bits(row)).tolist()


def walk(setup, spec: ConstraintSpec, seed: int, *, complete=None, limit: int = 600) -> str:
    """Random walk to termination; returns the decoded output (EOS excluded). ``complete(text)``,
    when given, must be true exactly where EOS is allowed."""
    compiler, tok, width, closers = setup
    matcher = compiler.compile(spec)()
    rng = random.Random(seed)
    eos = tok.eos_token_id
    bitmask = torch.zeros((3, (width + 31) // 32), dtype=torch.int32)  # [R=3, ceil(V/32)]; row 1 is ours
    ids: list[int] = []
    while not matcher.is_terminated():
        assert len(ids) < limit, f"no termination after {limit} tokens: {tok.decode(ids)!r}"
        bitmask.zero_()
        matcher.fill_bitmask(bitmask, 1)
        assert not bitmask[0].any() and not bitmask[2].any(), "other rows of the bitmask were written"
        allowed = _bits(bitmask[1])[:width]  # bool [V]
        assert allowed.any(), f"empty mask after {tok.decode(ids)!r}"
        assert not allowed[len(tok):].any(), "a padding id is allowed"
        eos_ok = bool(allowed[eos])
        if complete is not None:
            text = tok.decode(ids)
            assert eos_ok == complete(text), f"EOS allowed={eos_ok} after {text!r}"
        allowed[eos] = False
        others = np.flatnonzero(allowed)
        close = np.flatnonzero(allowed & closers)
        if eos_ok and (len(others) == 0 or rng.random() < 0.5):
            token = eos
        elif len(close) and rng.random() < 0.5:
            token = int(close[rng.randrange(len(close))])
        else:
            token = int(others[rng.randrange(len(others))])
        assert matcher.accept(token), f"an allowed token {token} was refused after {tok.decode(ids)!r}"
        ids.append(token)
    assert ids[-1] == eos, "terminated without EOS"
    assert not matcher.accept(eos), "accepted a token after termination"
    return tok.decode(ids[:-1])


#: "date" is enforced by shape (xgrammar: YYYY-MM-DD, month 01-12, day 01-31), not by calendar,
#: so February 31 can come out (docs/structured-output.md); the judge checks the shape
_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("date")(lambda v: not isinstance(v, str) or bool(
    re.fullmatch(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", v)))


def _is_valid(schema):
    validator = jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)

    def check(text: str) -> bool:
        try:
            return validator.is_valid(json.loads(text))
        except ValueError:
            return False

    return check


SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "role": {"enum": ["admin", "user", "guest"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["name", "role", "age", "tags", "address", "active"],
        "additionalProperties": False,
    },
    "numbers_and_unions": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
            "count": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 9},
            "maybe": {"type": ["integer", "null"], "maximum": 99},
            "either": {"anyOf": [{"type": "boolean"}, {"type": "string", "maxLength": 3}]},
            "kind": {"const": "fixed"},
        },
        "required": ["score", "count", "maybe", "either", "kind"],
    },
    "refs_and_tuples": {
        "$defs": {"point": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                              {"type": "integer", "minimum": 0, "maximum": 9}],
                            "items": False}},
        "type": "object",
        "properties": {
            "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 2, "maxItems": 3},
            "when": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["path", "when", "id"],
    },
    "top_level_array": {"type": "array", "items": {"enum": [1, 2, "three"]}, "minItems": 2, "maxItems": 4},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_walks_validate(setup, name):
    schema = SCHEMAS[name]
    spec = constraint_from_fields(response_format={"type": "json_schema",
                                                   "json_schema": {"name": name, "schema": schema, "strict": True}})
    valid = _is_valid(schema)
    for seed in range(4):
        text = walk(setup, spec, seed)
        assert valid(text), f"seed {seed}: {text!r} does not validate against {name}"
        assert "\n" not in text


def test_eos_only_where_json_is_complete(setup):
    schema = SCHEMAS["person"]
    spec = constraint_from_fields(guided_json=json.dumps(schema))  # guided_json may be JSON text
    assert spec.kind == "json_schema" and spec.field == "guided_json"
    text = walk(setup, spec, 7, complete=_is_valid(schema))
    assert _is_valid(schema)(text)


def test_json_object_walks_are_objects(setup):
    spec = constraint_from_fields(response_format={"type": "json_object"})
    for seed in range(5):
        text = walk(setup, spec, seed)
        assert isinstance(json.loads(text), dict), text


REGEXES = [r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)", r"\d{3}-\d{4}", r"(yes|no)( maybe)?", r"[A-F0-9]{2}(:[A-F0-9]{2}){0,3}"]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_walks_fullmatch(setup, pattern):
    spec = constraint_from_fields(guided_regex=pattern)
    for seed in range(4):
        text = walk(setup, spec, seed, complete=lambda t: re.fullmatch(pattern, t) is not None)
        assert re.fullmatch(pattern, text), (pattern, text)


def test_choice_walks_pick_a_choice(setup):
    choices = ["red", "blue", "blue sky", 'naïve "quoted"', "a\\b"]
    spec = constraint_from_fields(guided_choice=choices)
    seen = set()
    for seed in range(12):
        text = walk(setup, spec, seed, complete=lambda t: t in choices)
        assert text in choices
        seen.add(text)
    assert len(seen) >= 3, seen  # the walks are random, not one fixed answer


def test_grammar_ebnf_and_lark(setup):
    ebnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    for seed in range(4):
        text = walk(setup, constraint_from_fields(guided_grammar=ebnf), seed)
        assert re.fullmatch(r"\((?:[0-9]|[1-9][0-9])(?:\+(?:[0-9]|[1-9][0-9]))*\)", text), text
    lark = 'start: "go " DIR\nDIR: "north" | "south"'
    for seed in range(3):
        assert walk(setup, constraint_from_fields(guided_grammar=lark), seed) in ("go north", "go south")


def test_json_strings_never_hold_raw_control_characters(setup):
    # xgrammar 0.2.9 lets them into strings with maxLength; json.loads refuses them
    compiler, tok, width, _ = setup
    matcher = compiler.compile(constraint_from_fields(guided_json={"type": "string", "maxLength": 5}))()
    (quote,) = tok.encode('"', add_special_tokens=False)
    assert matcher.accept(quote)
    bitmask = torch.zeros((1, (width + 31) // 32), dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    allowed = _allowed(bitmask[0])
    assert len(allowed) > 50
    bad = [t for t in allowed if any(ord(c) < 0x20 for c in tok.decode([t]))]
    assert not bad, [tok.decode([t]) for t in bad[:5]]


def test_disallowed_and_padding_tokens_are_refused(setup):
    compiler, tok, width, _ = setup
    make = compiler.compile(constraint_from_fields(guided_choice=["yes", "no"]))
    assert not make().accept(width - 1)  # a padding column of the model's head
    assert not make().accept(tok.eos_token_id)  # nothing generated yet: EOS is not allowed
    bad = tok.encode("maybe", add_special_tokens=False)[0]
    if tok.decode([bad]) not in ("y", "n", "ye"):
        assert not make().accept(bad)


def test_cache_reuses_compilation_and_is_bounded(setup):
    _, tok, width, _ = setup
    compiler = ConstraintCompiler(tok, width, cache_size=2)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    first = compiler.compile(constraint_from_fields(guided_json=schema))
    again = compiler.compile(constraint_from_fields(
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}))
    assert again.compiled is first.compiled  # same schema from another field: one compilation
    assert compiler.cache_info()[:3] == (1, 1, 1)
    assert first() is not first()  # a fresh matcher per row
    compiler.compile(constraint_from_fields(guided_regex="a+"))
    compiler.compile(constraint_from_fields(guided_regex="b+"))  # evicts the schema (least recent)
    assert compiler.cache_info().size == 2
    third = compiler.compile(constraint_from_fields(guided_json=schema))
    assert third.compiled is not first.compiled and compiler.cache_info().misses == 4


def test_compile_is_thread_safe(setup):
    _, tok, width, _ = setup
    compiler = ConstraintCompiler(tok, width, cache_size=4)
    specs = [constraint_from_fields(guided_regex=f"x{i}[0-9]{{2}}") for i in range(6)] * 3
    errors: list[BaseException] = []

    def work(spec):
        try:
            m = compiler.compile(spec)()
            for ch in tok.encode(spec.value[:2], add_special_tokens=False):
                assert m.accept(ch)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    info = compiler.cache_info()
    assert info.size <= 4 and info.hits + info.misses == len(specs)


# -- request fields -> spec: refusals name the field --------------------------------------------

def test_no_constraint():
    assert constraint_from_fields() is None
    assert constraint_from_fields(response_format={"type": "text"}) is None
    assert constraint_from_fields(response_format={"type": "text"}, guided_regex="a").kind == "regex"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"response_format": "json"}, "response_format", "must be an object"),
        ({"response_format": {"type": "xml"}}, "response_format", "'xml'"),
        ({"response_format": {"type": "json_object", "schema": {}}}, "response_format", "unsupported keys ['schema']"),
        ({"response_format": {"type": "json_object", "json_schema": {}}}, "response_format", "only allowed"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema must be an object"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema is missing"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "response_format", "name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}},
         "response_format", "strict"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
         "response_format", "['extra']"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format", "not a valid JSON schema"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": [1]}, "guided_json", "schema object"),
        ({"guided_json": {"type": "integer", "minimum": "3"}}, "guided_json", "not a valid JSON schema"),
        ({"guided_json": {"not": {"type": "string"}}}, "guided_json", "'not'"),
        ({"guided_json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "guided_json", "'oneOf'"),
        ({"guided_json": {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}}},
         "guided_json", "guided_json.properties.t uses the JSON schema keyword 'uniqueItems'"),
        ({"guided_json": {"type": "integer", "multipleOf": 3}}, "guided_json", "'multipleOf'"),
        ({"guided_json": {"type": "string", "format": "zip-code"}}, "guided_json", "'zip-code'"),
        ({"guided_json": {"$ref": "https://example.com/s.json"}}, "guided_json", "$ref"),
        ({"guided_regex": ""}, "guided_regex", "non-empty string"),
        ({"guided_regex": 5}, "guided_regex", "non-empty string"),
        ({"guided_grammar": ["root ::= x"]}, "guided_grammar", "non-empty string"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_choice": "yes"}, "guided_choice", "non-empty list"),
        ({"guided_choice": ["a", 2]}, "guided_choice", "guided_choice[1]"),
        ({"guided_choice": ["a", ""]}, "guided_choice", "guided_choice[1]"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", "guided_json and guided_regex"),
        ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice", "give only one"),
    ],
)
def test_bad_fields_refused_naming_the_field(fields, param, words):
    with pytest.raises(RequestInvalid) as err:
        constraint_from_fields(**fields)
    assert err.value.param == param
    assert words in err.value.message, err.value.message


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"guided_regex": "(ab"}, "guided_regex", "parenthesis"),
        ({"guided_regex": r"\bword"}, "guided_regex", "guided_regex: cannot compile"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "undefined_rule"),
        ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "guided_json", "missing"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}}},
         "response_format", "nope"),
    ],
)
def test_uncompilable_refused_naming_the_field(setup, fields, param, words):
    compiler = setup[0]
    before = compiler.cache_info().size
    with pytest.raises(RequestInvalid) as err:
        compiler.compile(constraint_from_fields(**fields))
    assert err.value.param == param
    assert words in err.value.message and "/project/" not in err.value.message, err.value.message
    assert compiler.cache_info().size == before  # failures are not cached


@pytest.mark.slow
def test_real_base_greedy_output_follows_the_schema():
    """The real embedded base (fp32, plain transformers forward, no loraplex engine) decoding
    greedily through a matcher's masks: it ends by itself with EOS, and the text validates."""
    from loraplex.server.basemodel import load_base_model, load_tokenizer, resolve_base

    ref = resolve_base("embedded")
    tok = load_tokenizer(ref)
    model = load_base_model(ref, device="cpu", dtype="float32").eval()
    width = model.config.vocab_size
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]}}, "required": ["name", "age", "role"], "additionalProperties": False}
    matcher = ConstraintCompiler(tok, width).compile(constraint_from_fields(guided_json=schema))()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe Ada, a 36 year old admin, as JSON."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    bitmask = torch.zeros((1, (width + 31) // 32), dtype=torch.int32)
    ids, past, step_input = [], None, prompt
    with torch.inference_mode():
        while not matcher.is_terminated():
            assert len(ids) < 80, tok.decode(ids)
            out = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()  # [V]
            matcher.fill_bitmask(bitmask, 0)
            allowed = torch.from_numpy(_bits(bitmask[0])[:width].copy())
            token = int(torch.argmax(logits.masked_fill(~allowed, float("-inf"))))
            assert matcher.accept(token)
            ids.append(token)
            step_input = torch.tensor([[token]])
    assert ids[-1] == tok.eos_token_id
    text = tok.decode(ids[:-1])
    assert _is_valid(schema)(text), text
