"""``loraplex bench --backends torch,onnx,onnx-per-request``: serving backends side by side, in ONE
run on the same machine (a benchmark, never a test). ``onnx`` is the onnx backend with
mixed-adapter batches, ``onnx-per-request`` the same with one onnxruntime-genai Generator per
request.

For each backend it starts ``loraplex serve`` on a loopback port over the same store of
synthetic rank-R adapters (all linear layers, peft format) and measures, in order:

1. adapter loads through ``/v1/load_lora_adapter`` (validation + conversion/installation), the
   server's own load time and the client's round trip, and the server's RSS with 0, 1 and all N
   adapters resident (growth per adapter vs the adapter's file size); then all are unloaded and
   loaded again ("warm": the onnx gate's cache hits; the torch backend validates again);
2. single stream: one client, requests one after another over mixed adapters: TTFT and decode
   tok/s (tokens after the first / the time between them);
3. aggregate output tok/s at each ``--backend-concurrency`` level (default 4 and 8), mixed adapters.

Before the servers start it measures this machine's ceilings (``bench_ceilings.py``) and reports
each backend's tok/s against the ceiling of the dtype it computes in (torch: its ``--dtype``
choice; onnx: int4 weights, fp32 compute), the single stream also against the weight bandwidth.

The onnx backend serves an int4 export of the same base made with ``loraplex export-onnx``
(``--onnx-model`` to reuse one). Backends run one after the other, in ``--backends`` order,
``--repeats`` times alternating, so slow drifts of a shared machine hit both alike.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _measure_backend(args, ref, store: Path, adapters: list[str], work: Path, backend: str, onnx_model: Path | None, round_: int) -> dict:
    import httpx

    from loraplex.server.bench import start_server, run_load

    server_args = args.server_args + {
        "torch": "",
        "onnx": f" --backend onnx --model {onnx_model} --onnx-batching mixed",
        "onnx-per-request": f" --backend onnx --model {onnx_model} --onnx-batching per-request",
    }[backend]
    # onnx servers get a fresh cache: their first loads really convert (the gate remembers
    # conversions across processes); the base they serve is the exported folder, not the cache
    env = {"LORAPLEX_CACHE": str(work / f"cache-{backend}-{round_}")} if backend != "torch" else None
    proc, url = start_server(ref, store, work, max_batch_size=max(args.backend_concurrency), server_args=server_args, env=env)
    try:
        time.sleep(1.0)
        rss = {"0": _rss_mib(proc.pid)}
        server_ms, client_ms = [], []
        for i, name in enumerate(adapters):
            t0 = time.perf_counter()
            reply = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name}, timeout=600)
            client_ms.append((time.perf_counter() - t0) * 1000)
            reply.raise_for_status()
            server_ms.append(reply.json()["adapter"]["load_ms"])
            if i == 0:
                rss["1"] = _rss_mib(proc.pid)
        time.sleep(0.5)
        rss[str(len(adapters))] = _rss_mib(proc.pid)
        # unload all, load all again: "warm" loads (the onnx gate's cache hits; torch validates again)
        for name in adapters:
            httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=600).raise_for_status()
        warm_ms = []
        for name in adapters:
            reply = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name}, timeout=600)
            reply.raise_for_status()
            warm_ms.append(reply.json()["adapter"]["load_ms"])
        common = dict(base="base", prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, seed=args.seed + round_, mix="uniform", adapters=adapters)
        asyncio.run(run_load(url, "warmup", concurrency=2, requests=4, **common))
        single = asyncio.run(run_load(url, "single", concurrency=1, requests=args.single_requests, **common))
        levels = {}
        for c in args.backend_concurrency:
            levels[str(c)] = asyncio.run(run_load(url, f"c{c}", concurrency=c, requests=max(args.requests, 2 * c), **common)).summary()
        rss["after_load"] = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    decode_seconds = sum(single.itl)  # every gap between two tokens of one stream: pure decode time
    file_bytes = statistics.mean((store / a / "adapter_model.safetensors").stat().st_size for a in adapters)
    growth = (rss[str(len(adapters))] - rss["1"]) / max(1, len(adapters) - 1)
    return {
        "single_stream": {**single.summary(), "decode_tok_per_s": round(len(single.itl) / decode_seconds, 2) if decode_seconds else None},
        "concurrency": levels,
        "adapter_load": {
            "server_ms_p50": round(statistics.median(server_ms), 2),
            "server_ms_p90": round(sorted(server_ms)[int(0.9 * (len(server_ms) - 1))], 2),
            "client_ms_p50": round(statistics.median(client_ms), 2),
            "first_server_ms": round(server_ms[0], 2),
            "warm_server_ms_p50": round(statistics.median(warm_ms), 2),
        },
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_per_adapter_mib": round(growth, 2),
        "adapter_file_mib": round(file_bytes / 2**20, 2),
        "rss_growth_over_file_size": round(growth / (file_bytes / 2**20), 2),
    }


def _merge(runs: list[dict]) -> dict:
    """Median over repeats of every number (same shape as one run)."""
    if len(runs) == 1:
        return runs[0]
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = _merge([r[key] for r in runs])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = round(statistics.median(values), 2) if values else None
        else:
            out[key] = value
    return out


def run_backends(args) -> int:
    from loraplex.server.basemodel import resolve_base
    from loraplex.server.bench import write_synthetic_adapters

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-backends-"))
    try:
        ref = resolve_base(args.base or "embedded")
        store = work / "adapters"
        adapters = write_synthetic_adapters(ref.path, store, args.synthetic_adapters, args.rank, args.seed)
        onnx_model = Path(args.onnx_model) if args.onnx_model else None
        export_seconds = None
        unknown = sorted(set(backends) - {"torch", "onnx", "onnx-per-request"})
        if unknown:
            raise SystemExit(f"loraplex bench: error: --backends {unknown}: choose from torch, onnx, onnx-per-request")
        if any(b.startswith("onnx") for b in backends) and onnx_model is None:
            from loraplex.server.onnx.export import ExportConfig, export_onnx

            onnx_model = work / "onnx-int4"
            t0 = time.perf_counter()
            export_onnx(ExportConfig(output_path=onnx_model, model_name_or_path=str(ref.path), precision="int4"), say=lambda line: print(f"export-onnx: {line}", flush=True))
            export_seconds = round(time.perf_counter() - t0, 1)
        from loraplex.server.bench_ceilings import fractions, measure_ceilings, model_cost

        print("bench: measuring this machine's GEMM and memory ceilings ...", flush=True)
        ceilings = measure_ceilings()
        cost = model_cost(ref.path / "config.json") if (ref.path / "config.json").is_file() else None
        runs: dict[str, list[dict]] = {b: [] for b in backends}
        for round_ in range(args.repeats):
            for backend in backends:
                print(f"bench: backend {backend}, round {round_ + 1}/{args.repeats} ...", flush=True)
                runs[backend].append(_measure_backend(args, ref, store, adapters, work, backend, onnx_model, round_))
        results = {b: _merge(r) for b, r in runs.items()}
        if cost is not None:  # each backend against the ceilings of the dtype it computes in
            from loraplex.server.basemodel.loading import cpu_has_fast_bf16

            for name, result in results.items():
                dtype = "int4" if name.startswith("onnx") else ("bfloat16" if cpu_has_fast_bf16() and "float32" not in args.server_args else "float32")
                result["served_dtype"] = dtype
                single = result["single_stream"]
                if single.get("decode_tok_per_s"):
                    single.update(fractions(single["decode_tok_per_s"], ceilings=ceilings, cost=cost, dtype=dtype, single_stream=True))
                for level in result["concurrency"].values():
                    level.update(fractions(level["output_tok_per_s"], ceilings=ceilings, cost=cost, dtype=dtype))
        report = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
            "base": {"id": ref.id, "fingerprint": ref.fingerprint},
            "adapters": {"count": len(adapters), "rank": args.rank, "targets": "all-linear"},
            "onnx_export_seconds": export_seconds,
            "ceilings": ceilings,
            "model_cost": cost,
            "backends": results,
        }
        if "torch" in results:
            t = results["torch"]
            report["ratios_over_torch"] = {
                name: {
                    "single_stream_decode_tok_per_s": _ratio(o["single_stream"]["decode_tok_per_s"], t["single_stream"]["decode_tok_per_s"]),
                    "single_stream_output_tok_per_s": _ratio(o["single_stream"]["output_tok_per_s"], t["single_stream"]["output_tok_per_s"]),
                    "ttft_p50": _ratio(o["single_stream"]["ttft_p50_ms"], t["single_stream"]["ttft_p50_ms"]),
                    **{f"aggregate_tok_per_s_c{c}": _ratio(o["concurrency"][c]["output_tok_per_s"], t["concurrency"][c]["output_tok_per_s"]) for c in o["concurrency"]},
                }
                for name, o in results.items()
                if name != "torch"
            }
        (out_dir / "backends.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: report[k] for k in ("ceilings", "backends", "ratios_over_torch") if k in report}, indent=2))
        print(f"wrote {out_dir / 'backends.json'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _ratio(a, b):
    return round(a / b, 3) if a and b else None
