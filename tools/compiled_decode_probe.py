"""How much of a single stream's decode step is host overhead: the embedded base's one-token
decode written out plainly (int4 projections, in-place KV, no LoRA), run eagerly and through
``torch.compile`` (inductor), with the engine's own single stream timed in the same rounds.

    .venv/bin/python tools/compiled_decode_probe.py                 # inductor, Python wrapper
    .venv/bin/python tools/compiled_decode_probe.py --cpp-wrapper   # inductor, C++ wrapper

A measuring probe for issue 15's single-stream target, not a serving path. It answers one
question: with the weight reads fixed (the int4 GEMMs and the bf16 lm_head), how fast is one
token once the ~1,300 small ops per token stop being dispatched one by one from Python? The
plain function mirrors ``LlamaStepForward`` for one row of one sequence: the same fused weights
and their int4 forms, RMSNorm as the engine computes it, the rotary tables, K/V written in place
into a static [kv_heads, capacity, d] buffer per layer and attention over the whole capacity
under a position mask (static shapes: one compile), the lm_head eager (its oneDNN-prepacked
weight is not an inductor input). Rounds interleave the probe's eager run, its compiled run and
the engine's own base and one-adapter streams, so each round shares one host window (this VM's
speed varies up to 2x between windows). Prints one JSON line per round and a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_bench as eb  # noqa: E402


def plain_decode(lean, capacity: int):
    """``step(ids [1], pos [1]) -> h [1, H]`` (final-normed hidden state) over fresh K/V buffers."""
    heads, kv_heads, d, hidden = lean.heads, lean.kv_heads, lean.head_dim, lean.hidden
    keys = [torch.zeros(kv_heads, capacity, d, dtype=torch.bfloat16) for _ in lean.layers]
    values = [torch.zeros(kv_heads, capacity, d, dtype=torch.bfloat16) for _ in lean.layers]
    weights = [(layer.qkv.int4, layer.o_proj.int4, layer.gate_up.int4, layer.down_proj.int4) for layer in lean.layers]
    q_out, kv_out, half = heads * d, kv_heads * d, d // 2

    def rms(x, w):
        return w * F.rms_norm(x.float(), (hidden,), None, lean.eps).to(x.dtype)

    def rotate(x, cos, sin):  # x [1, h, d]
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def step(ids, pos):
        h = lean.embed(ids)  # [1, H]
        cos, sin = lean.cos.index_select(0, pos)[:, None], lean.sin.index_select(0, pos)[:, None]  # [1, 1, d]
        mask = (torch.arange(capacity) <= pos)[None, None, :]  # [1, 1, capacity]
        for i, layer in enumerate(lean.layers):
            qkv_w, o_w, gate_up_w, down_w = weights[i]
            qkv = qkv_w(rms(h, layer.in_norm))  # [1, q_out + 2 kv_out]
            qk = rotate(qkv[:, : q_out + kv_out].view(1, heads + kv_heads, d), cos, sin)
            keys[i].index_copy_(1, pos, qk[:, heads:].transpose(0, 1))  # [kv_heads, 1, d] at pos
            values[i].index_copy_(1, pos, qkv[:, q_out + kv_out :].view(1, kv_heads, d).transpose(0, 1))
            q = qk[:, :heads].view(kv_heads, heads // kv_heads, d)  # GQA folded, as the engine does
            attn = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask, scale=lean.scale)
            h = h + o_w(attn.reshape(1, q_out))
            gate_up = gate_up_w(rms(h, layer.post_norm))
            inter = gate_up.shape[1] // 2
            h = h + down_w(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        return rms(h, lean.norm)

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
