"""xgrammar vs llguidance on the embedded base's tokenizer, side by side in one run: what a
constrained row costs the engine per token (fill its bitmask row + accept the sampled token) and
what compiling a grammar costs, for a JSON schema and for "any JSON object". Quoted in
docs/structured-output.md, which says why loraplex uses the one it does.

    nice -n 10 .venv/bin/python tools/grammar_engines.py                # ~1 min on 2 cores
    .venv/bin/python tools/grammar_engines.py --walks 20 --json out.json

Two token streams per grammar, the same for both libraries:
  * "document": valid JSON documents tokenized by the real tokenizer (what a model that follows
    the schema emits), then EOS;
  * "random walk": seeded random choices among the tokens the mask allows, until EOS is allowed
    and drawn or 256 tokens; the walk's tokens come from xgrammar's masks and are replayed on
    llguidance (skipped from the first token llguidance refuses, counted as "disagree").
A tool, not a package module: it imports both libraries, and the server depends on only one.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}

DOCUMENTS = [
    {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines"],
     "address": {"city": "London", "zip": "12345"}, "active": True},
    {"name": "Grace Hopper, rear admiral", "age": 85, "role": "user", "tags": ["cobol", "navy", "compilers"],
     "address": {"city": "New York City", "zip": "10001"}, "active": False},
    {"name": "x", "age": 0, "role": "guest", "tags": ["a"], "address": {"city": "Zürich", "zip": "80000"},
     "active": True},
]


def load_tokenizer():
    from loraplex.server.basemodel import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base("embedded"))


class Xgr:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.setup_s = time.perf_counter() - t0

    def compile(self, kind: str):
        # a fresh compiler each time: its own cache would make the second compile free
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        # loraplex's settings (server/constraints.py): one line, ", " and ": " separators
        if kind == "json_schema":
            return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, strict_mode=True)
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    @staticmethod
    def fill(m, bitmask, index) -> None:
        m.fill_next_token_bitmask(bitmask, index)

    @staticmethod
    def accept(m, token) -> bool:
        return m.accept_token(token)

    @staticmethod
    def done(m) -> bool:
        return m.is_terminated()


class Llg:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.setup_s = time.perf_counter() - t0

    def compile(self, kind: str):
        schema = SCHEMA if kind == "json_schema" else {"type": "object"}
        # the same output format as xgrammar's above
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        # llguidance compiles lazily: building the first matcher is its compile step
        m = self.llg.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return grammar

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tok, grammar)

    @staticmethod
    def fill(m, bitmask, index) -> None:
        row = bitmask[index]
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    @staticmethod
    def accept(m, token) -> bool:
        return m.consume_token(token)

    @staticmethod
    def done(m) -> bool:
        return m.is_stopped()


def allowed(bitmask_row, vocab: int) -> list[int]:
    import torch

    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # [W, 32]
    return torch.nonzero(bits.flatten()[:vocab]).flatten().tolist()


def run_stream(engine, compiled, tokens: list[int], bitmask) -> tuple[list[float], int, bool]:
    """Per-token seconds for fill + accept over ``tokens``, the number accepted, and whether the
    matcher ended terminated."""
    m = engine.matcher(compiled)
    times: list[float] = []
    accepted = 0
    for tok in tokens:
        t0 = time.perf_counter()
        engine.fill(m, bitmask, 0)
        ok = engine.accept(m, tok)
        times.append(time.perf_counter() - t0)
        if not ok:
            break
        accepted += 1
    return times, accepted, engine.done(m)


def random_walk(engine, compiled, bitmask, vocab: int, eos: int, seed: int, limit: int = 256) -> list[int]:
    rng = random.Random(seed)
    m = engine.matcher(compiled)
    out: list[int] = []
    while len(out) < limit and not engine.done(m):
        engine.fill(m, bitmask, 0)
        choices = allowed(bitmask[0], vocab)
        tok = eos if eos in choices and (len(out) > 40 or rng.random() < 0.2) else rng.choice(choices)
        assert engine.accept(m, tok)
        out.append(tok)
    return out


def summary(times: list[float]) -> dict:
    us = sorted(t * 1e6 for t in times)
    return {
        "tokens": len(us),
        "mean_us": round(statistics.fmean(us), 1),
        "median_us": round(statistics.median(us), 1),
        "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1),
        "max_us": round(us[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--walks", type=int, default=10, help="random walks per grammar")
    parser.add_argument("--compiles", type=int, default=3, help="compiles per grammar (median reported)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import torch

    tokenizer = load_tokenizer()
    vocab = 49152  # the embedded base's logits width (config vocab_size)
    eos = tokenizer.eos_token_id
    engines = [Xgr(tokenizer, vocab), Llg(tokenizer, vocab)]
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)  # [R=1, ceil(vocab/32)]
    docs = [tokenizer.encode(json.dumps(d, ensure_ascii=False), add_special_tokens=False)
            for d in DOCUMENTS]
    results: dict = {"vocab": vocab, "tokenizer_setup_s": {e.name: round(e.setup_s, 3) for e in engines}}
    for kind in ("json_schema", "json_object"):
        compiled = {}
        for e in engines:
            secs = []
            for _ in range(args.compiles):
                t0 = time.perf_counter()
                compiled[e.name] = e.compile(kind)
                secs.append(time.perf_counter() - t0)
            results.setdefault(kind, {}).setdefault("compile_ms", {})[e.name] = round(statistics.median(secs) * 1e3, 1)
        walks = [random_walk(engines[0], compiled["xgrammar"], bitmask, vocab, eos, seed) for seed in range(args.walks)]
        for e in engines:
            doc_times: list[float] = []
            ended = 0
            for toks in docs:
                t, n, done = run_stream(e, compiled[e.name], toks + [eos], bitmask)
                assert n == len(toks) + 1 and done, f"{e.name} refused a valid {kind} document at token {n}"
                doc_times += t
                ended += done
            walk_times: list[float] = []
            disagree = 0
            for toks in walks:
                t, n, _ = run_stream(e, compiled[e.name], toks, bitmask)
                walk_times += t[:n]
                disagree += n < len(toks)
            results[kind][e.name] = {"document": summary(doc_times), "random_walk": summary(walk_times),
                                     "walks_refused": disagree}
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
