"""How much of a single stream's decode step is host overhead: the embedded base's one-token
decode as one function (int4 projections, in-place KV, no LoRA), run eagerly and through
``torch.compile`` (inductor), with the engine's own single stream timed in the same rounds.

    .venv/bin/python tools/compiled_decode_probe.py                 # inductor, Python wrapper
    .venv/bin/python tools/compiled_decode_probe.py --cpp-wrapper   # inductor, C++ wrapper

A measuring probe for issue 15's single-stream target. It answers one question: with the
weight reads fixed (the int4 GEMMs and the bf16 lm_head), how fast is one token once the ~1,300
small ops per token stop being dispatched one by one from Python? It runs the engine's own
one-row step function (``compiled_decode.OneRowStep.run``, no adapter) on static one-row K/V
buffers of ``--capacity`` positions (static shapes: one compile), eagerly and compiled, with the
lm_head eager (its oneDNN-prepacked weight is not an inductor input). (The figures in
docs/benchmarks.md's sixth session came from an earlier copy of that function written out here;
``OneRowStep.run`` computes the same per-layer ops, with the K/V buffers' row as an index.)
Rounds interleave the probe's eager run, its compiled run and the engine's own base and
one-adapter streams, so each round shares one host window (this VM's speed varies up to 2x
between windows). Prints one JSON line per round and a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_bench as eb  # noqa: E402


def plain_decode(lean, capacity: int):
    """``step(ids [1], pos [1]) -> h [1, H]`` (final-normed hidden state): the engine's compiled
    step function (``OneRowStep.run``, no adapter) on fresh static K/V buffers of one row."""
    from loraplex.server.engine.compiled_decode import OneRowStep
    from loraplex.server.engine.lora import LoraBatchContext

    one_row = OneRowStep(hidden=lean.hidden, heads=lean.heads, kv_heads=lean.kv_heads, head_dim=lean.head_dim, eps=lean.eps, scale=lean.scale,
                         gate_up_spans=lean.layers[0].gate_up.spans)
    layers = lean.one_row_layer_inputs(LoraBatchContext())  # no adapter in use
    keys = [torch.zeros(1, lean.kv_heads, capacity, lean.head_dim, dtype=torch.bfloat16) for _ in lean.layers]
    values = [torch.zeros(1, lean.kv_heads, capacity, lean.head_dim, dtype=torch.bfloat16) for _ in lean.layers]
    slot = torch.tensor([0])

    def step(ids, pos):
        h = one_row.run(lean.embed(ids), lean.cos.index_select(0, pos)[:, None], lean.sin.index_select(0, pos)[:, None], slot, pos, keys, values, layers)
        return one_row._rms(h, lean.norm)

    return step, keys + values


def time_probe(step, lm_head, buffers, tokens: int) -> tuple[float, torch.Tensor]:
    for buffer in buffers:
        buffer.zero_()
    ids = torch.tensor([5])
    for p in range(3):
        lm_head(step(ids, torch.tensor([p])))
    start = time.perf_counter()
    for p in range(3, 3 + tokens):
        logits = lm_head(step(ids, torch.tensor([p])))
    return (time.perf_counter() - start) / tokens * 1e3, logits


def time_engine(engine, adapter, tokens: int) -> float:
    driver = eb.Driver(engine)
    request, _ = eb.request("probe", 32, adapter, tokens + 8, seed=7)
    driver.submit(request)
    driver.step()
    driver.step()
    start = time.perf_counter()
    for _ in range(tokens):
        driver.step()
    elapsed = (time.perf_counter() - start) / tokens * 1e3
    while driver.busy():
        driver.step()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper (less host work per call, longer compile)")
    p.add_argument("--capacity", type=int, default=256, help="static K/V positions per layer")
    p.add_argument("--tokens", type=int, default=60, help="timed tokens per measurement")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, engine = eb.build_engine("bfloat16", 8, None)
    lean = engine.lean
    if lean is None or not lean.int4_rows:
        raise SystemExit(f"the probe needs the lean forward with int4 decode GEMMs ({getattr(lean, 'int4_reason', 'no lean forward')})")
    names = eb.install(engine, model, 1, 8)
    step, buffers = plain_decode(lean, args.capacity)
    import torch._inductor.config as inductor_config

    inductor_config.cpp_wrapper = args.cpp_wrapper
    compiled = torch.compile(step, dynamic=False)
    with torch.inference_mode():
        started = time.perf_counter()
        compiled(torch.tensor([5]), torch.tensor([0]))
        compile_s = time.perf_counter() - started
        rows = []
        for r in range(args.rounds):
            eager_ms, eager_logits = time_probe(step, lean.lm_head, buffers, args.tokens)
            compiled_ms, compiled_logits = time_probe(compiled, lean.lm_head, buffers, args.tokens)
            row = {
                "round": r,
                "probe_eager_ms": round(eager_ms, 2),
                "probe_compiled_ms": round(compiled_ms, 2),
                "engine_base_ms": round(time_engine(engine, None, args.tokens), 2),
                "engine_adapter_ms": round(time_engine(engine, names[0], args.tokens), 2),
                "max_logit_diff": round(float((compiled_logits.float() - eager_logits.float()).abs().max()), 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"cpp_wrapper": args.cpp_wrapper, "compile_s": round(compile_s, 1)}
    for key in ("probe_eager_ms", "probe_compiled_ms", "engine_base_ms", "engine_adapter_ms"):
        summary[f"median_{key}"] = statistics.median(row[key] for row in rows)
    summary["median_eager_over_compiled"] = round(statistics.median(row["probe_eager_ms"] / row["probe_compiled_ms"] for row in rows), 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
