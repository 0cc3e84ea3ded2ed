"""This machine's ceilings, measured in the bench run itself: GEMM GFLOP/s in bf16 and fp32
(torch matmul on the cores the server uses) and memory read GB/s; and the model's cost per
token (GFLOP and bytes of weights at the served dtype), so each phase's tok/s is reported as a
fraction of what the hardware allows. Knows torch and a model config; nothing of servers.
"""

from __future__ import annotations

import time


def _timed(fn, seconds: float) -> tuple[int, float]:
    fn()  # warm-up (allocations, kernel selection)
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return runs, elapsed


def measure_ceilings(seconds: float = 0.6, size: int = 1024, read_mib: int = 256) -> dict:
    """{'bf16_gflops', 'fp32_gflops', 'mem_read_gbs'} measured now (noisy on a shared machine)."""
    import torch

    out: dict = {"threads": torch.get_num_threads()}
    for label, dtype in (("fp32_gflops", torch.float32), ("bf16_gflops", torch.bfloat16)):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        runs, elapsed = _timed(lambda: torch.mm(a, b), seconds)
        out[label] = round(2 * size**3 * runs / elapsed / 1e9, 1)
    buffer = torch.ones(read_mib * 2**20 // 4, dtype=torch.float32)  # larger than any cache
    runs, elapsed = _timed(lambda: buffer.sum(), seconds)
    out["mem_read_gbs"] = round(buffer.numel() * 4 * runs / elapsed / 1e9, 2)
    return out


def higher_ceilings(start: dict, end: dict | None) -> dict:
    """Per figure, the higher of the ceilings measured at the start and at the end of a run.

    This shared VM's speed drifts within one run (bf16 GEMM ceilings from 466 to 871 GFLOP/s
    between runs, and single streams 1.5x apart within one process, docs/benchmarks.md), so a
    fraction against a ceiling measured in a slow window would flatter a phase that ran in a fast
    one. The higher of the two is the conservative denominator."""
    if not end:
        return dict(start)
    return {key: max(value, end.get(key, value)) if isinstance(value, (int, float)) and key != "threads" else value for key, value in start.items()}


def model_cost(config_path) -> dict:
    """GFLOP per token (2 x the matmul weights: attention, MLP, lm_head) and those weights'
    parameter count, from a Hugging Face config.json (Llama-style)."""
    import json
    from pathlib import Path

    c = json.loads(Path(config_path).read_text())
    hidden, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads)
    head_dim = c.get("head_dim") or hidden // heads
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter  # q,o + k,v + gate,up,down
    params = layers * per_layer + hidden * vocab  # + lm_head (tied or not, it is read every token)
    return {"matmul_params": params, "gflop_per_token": round(2 * params / 1e9, 4)}


def bytes_per_param(dtype: str) -> float:
    return {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}.get(dtype, 4.0)


def fractions(tok_per_s: float, *, ceilings: dict, cost: dict, dtype: str, single_stream: bool = False) -> dict:
    """tok/s as a fraction of the compute ceiling at ``dtype`` (and, for one stream, of the
    weight-bandwidth ceiling: every weight read once per token)."""
    gflops = ceilings["bf16_gflops"] if dtype in ("bfloat16", "float16") else ceilings["fp32_gflops"]
    compute_ceiling = gflops / cost["gflop_per_token"]
    out = {"compute_ceiling_tok_per_s": round(compute_ceiling, 1), "of_compute_ceiling": round(tok_per_s / compute_ceiling, 4)}
    if single_stream:
        weight_gb = cost["matmul_params"] * bytes_per_param(dtype) / 1e9
        bandwidth_ceiling = ceilings["mem_read_gbs"] / weight_gb
        out.update({"bandwidth_ceiling_tok_per_s": round(bandwidth_ceiling, 1), "of_bandwidth_ceiling": round(tok_per_s / bandwidth_ceiling, 3)})
    return out
