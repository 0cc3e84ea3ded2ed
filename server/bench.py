"""``loraplex bench``: a benchmark (never a test) of a server over HTTP.

Either against a running server (``--url``) or a server it starts itself as a subprocess on a
loopback port (the default; with ``--synthetic-adapters N`` it first writes N random rank-R
adapters into a temp store so any machine can run it). Everything is measured in ONE run, so
ratios compare like with like on a noisy machine, with a progress bar per phase (rich, stderr):

0. ``ceilings`` (``bench_ceilings.py``): this machine's bf16 and fp32 GEMM GFLOP/s and memory read
   GB/s, measured before the phases and again after them, once a server it started has stopped
   (``ceilings_start``, ``ceilings_end``); every phase's tok/s is reported as a fraction of the higher of the two
   (``ceilings``: the host's speed drifts within a run) of the compute ceiling (tok/s x
   GFLOP/token) and, for the single stream, also of the weight-bandwidth ceiling (bytes of matmul
   weights at the served dtype read once per token);
1. ``mixed``: C concurrent streaming clients (default 64), requests spread over the adapters
   (uniform or skewed); 2. ``base``: the same load on the bare base (mixed and base alternate
   ``--repeats`` times and are summed); 3. ``single``: one stream (decode tok/s from the
   inter-token gaps); 4. ``burst``: ``--burst`` simultaneous new requests (TTFT p50/p99);
   5. ``hotload``: the mixed load again while adapters are loaded one by one through the API;
   RSS of a server it started with 0, 1 and all adapters resident (growth per adapter vs the
   adapter file's size); 6. ``--peer-llama-server PATH`` (``bench_peer.py``): llama.cpp's
   llama-server with the same base (GGUF) and adapters, mixed / base / single;
   7. ``naive``: peft's ``PeftModel`` one request at a time, only when bench started the server
   itself or ``--naive`` is given (never silently against ``--url``);
   8. ``constrained`` (``--phases ...,constrained``): the mixed load again with ``response_format``
   json_schema on every request vs free (``unconstrained``), alternating; the tok/s ratio and the
   grammar's cost per token (server/constraints.py fills each row's mask every step);
   9. ``mixcomp`` (``--phases ...,mixcomp``): the same load where every third request is a
   2-adapter weighted mix (body field ``adapters``) vs all single adapters (``singles``),
   alternating; target: mixes keep >= 0.85 of the single-adapter tok/s.
``--phases`` picks the server phases (default: mixed, base, single, burst, hotload).

Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PhaseResult:
    name: str
    requests: int
    output_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)  # the first few distinct failures, in words

    def failed(self, what: str) -> None:
        self.errors += 1
        if what not in self.error_samples and len(self.error_samples) < 3:
            self.error_samples.append(what)

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 3),
            "output_tok_per_s": round(self.tok_per_s, 2),
            "ttft_p50_ms": _pct(self.ttft, 50),
            "ttft_p99_ms": _pct(self.ttft, 99),
            "itl_p50_ms": _pct(self.itl, 50),
            "itl_p99_ms": _pct(self.itl, 99),
            **({"error_samples": self.error_samples} if self.error_samples else {}),
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return round(ordered[index] * 1000, 2)


def _combine(a: PhaseResult, b: PhaseResult) -> PhaseResult:
    return PhaseResult(a.name, a.requests + b.requests, a.output_tokens + b.output_tokens, a.seconds + b.seconds,
                       a.ttft + b.ttft, a.itl + b.itl, a.errors + b.errors, (a.error_samples + [e for e in b.error_samples if e not in a.error_samples])[:3])


def _pick(adapters: list[str], mix: str, rng: random.Random, base: str) -> str:
    if mix == "base" or not adapters:
        return base
    if mix == "skewed":  # Zipf-like: the first adapter gets most traffic
        weights = [1.0 / (i + 1) ** 1.2 for i in range(len(adapters))]
        return rng.choices(adapters, weights)[0]
    return rng.choice(adapters)


async def _one_request(client, url: str, model: str, prompt: list[int], max_tokens: int, result: PhaseResult, on_token=None, body_for=None,
                       extra: dict | None = None) -> None:
    body = {**(body_for(model) if body_for else {"model": model}), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    for key, value in (extra or {}).items():  # None removes a key (ignore_eos with a grammar)
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                body_text = (await resp.aread()).decode("utf-8", "replace")
                result.failed(f"HTTP {resp.status_code}: {body_text[:200]}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if not payload.get("choices") or payload["choices"][0].get("finish_reason"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft.append(now - start)
                else:
                    result.itl.append(now - last)
                    if on_token:
                        on_token(now, now - last)
                last = now
                result.output_tokens += 1
    except Exception as exc:
        result.failed(f"{type(exc).__name__}: {str(exc)[:200]}")
        return
    result.requests += 1


async def run_load(url: str, name: str, *, adapters: list[str], base: str, mix: str, concurrency: int, requests: int,
                   prompt_tokens: int, output_tokens: int, seed: int, during=None, on_token=None, body_for=None, on_done=None,
                   models: list[str] | None = None, extra: dict | None = None) -> PhaseResult:
    """``models``: the model of request i is ``models[i % len(models)]`` (else drawn by ``mix``);
    ``extra``: body fields added to every request (None removes one)."""
    import httpx

    rng = random.Random(seed)
    result = PhaseResult(name, 0, 0, 0.0)
    plan = []
    for i in range(requests):
        model = models[i % len(models)] if models else _pick(adapters, mix, rng, base)
        plan.append((model, [1] + [rng.randrange(100, 30000) for _ in range(prompt_tokens - 1)]))
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while not queue.empty():
                model, prompt = queue.get_nowait()
                await _one_request(client, url, model, prompt, output_tokens, result, on_token, body_for, extra)
                if on_done:
                    on_done()

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        side = asyncio.create_task(during(client)) if during else None
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - start
        if side:
            await side
    return result


def write_synthetic_adapters(base_path: Path, store: Path, count: int, rank: int, seed: int) -> list[str]:
    """N random peft LoRA adapters (all linear layers, rank r) with manifests, like trained ones."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraplex.server.basemodel import compute_fingerprint
    from loraplex.server.store import AdapterManifest, sha256_file, write_manifest

    store.mkdir(parents=True, exist_ok=True)
    fingerprint = compute_fingerprint(base_path)
    model = AutoModelForCausalLM.from_pretrained(str(base_path))
    names = []
    peft_model = None
    for i in range(count):
        torch.manual_seed(seed + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.02)
        name = f"bench-{i:02d}"
        peft_model.save_pretrained(str(store / name))
        targets = tuple(sorted(peft_model.peft_config["default"].target_modules))
        write_manifest(store / name, AdapterManifest(name=name, task="synthetic", base_model_id=base_path.name, base_fingerprint=fingerprint, rank=rank, alpha=2 * rank, target_modules=targets, weights_sha256=sha256_file(store / name / "adapter_model.safetensors")))
        model = peft_model.unload()
        names.append(name)
    return names


def naive_baseline(base_path: Path, store: Path, adapters: list[str], *, requests: int, prompt_tokens: int, output_tokens: int, seed: int) -> PhaseResult:
    """peft PeftModel, one request at a time: set_adapter then generate (the common naive server)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_path)).eval()
    model = PeftModel.from_pretrained(model, str(store / adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(str(store / name), adapter_name=name)
    rng = random.Random(seed)
    result = PhaseResult("naive", 0, 0, 0.0)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(requests):
            name = rng.choice(adapters)
            prompt = torch.tensor([[1] + [rng.randrange(100, 30000) for _ in range(prompt_tokens - 1)]])
            model.set_adapter(name)
            t0 = time.perf_counter()
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False, pad_token_id=0)
            produced = out.shape[1] - prompt.shape[1]
            elapsed = time.perf_counter() - t0
            result.ttft.append(elapsed / max(1, produced))  # generate() does not stream: per-token average
            result.output_tokens += produced
            result.requests += 1
    result.seconds = time.perf_counter() - start
    return result


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = report["phases"]
    names = list(phases)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    axes[0].bar(names, [phases[n]["output_tok_per_s"] for n in names], color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(names)])
    axes[0].set_title("output tokens / s")
    itl = [n for n in names if phases[n].get("itl_p50_ms") is not None]
    axes[1].bar([f"{n} p50" for n in itl] + [f"{n} p99" for n in itl], [phases[n]["itl_p50_ms"] for n in itl] + [phases[n]["itl_p99_ms"] for n in itl])
    axes[1].set_title("inter-token latency (ms)")
    axes[1].tick_params(axis="x", rotation=45)
    ratios = report["ratios"]
    fig.suptitle("loraplex bench: " + ", ".join(f"{k} {v}" for k, v in ratios.items() if v is not None))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="benchmark this running server (no local peft baseline unless --naive)")
    parser.add_argument("--base", default=None, help="base model for the server it starts and for the naive baseline (default: embedded)")
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=None,
                        help="run the one-at-a-time peft baseline after the server phases (default: yes when bench starts the server, no with --url)")
    parser.add_argument("--adapters-dir", help="use the adapters in this store (default: --synthetic-adapters into a temp store)")
    parser.add_argument("--synthetic-adapters", type=int, default=8, help="write N random adapters into a temp store (default 8)")
    parser.add_argument("--rank", type=int, default=8, help="rank of synthetic adapters (default 8)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=64, help="requests per phase")
    parser.add_argument("--burst", type=int, default=32, help="simultaneous new requests of the burst phase (TTFT p50/p99; 0 = skip)")
    parser.add_argument("--single-stream-requests", type=int, default=3, help="requests of the single-stream phase (0 = skip)")
    parser.add_argument("--served-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32", "int8", "int4"],
                        help="the dtype the server computes in, for the ceilings (auto: loraplex's own choice on this CPU)")
    parser.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=True, help="measure GEMM/memory ceilings before and after the phases (default yes)")
    parser.add_argument("--peer-llama-server", help="also run llama.cpp's llama-server binary (same base as GGUF, adapters converted) side by side")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--mix", choices=["uniform", "skewed"], default="uniform", help="adapter traffic mix of the mixed phase")
    parser.add_argument("--naive-requests", type=int, default=4, help="requests for the one-at-a-time peft baseline")
    parser.add_argument("--hotload", type=int, default=4, help="adapters to hot-load during the hotload phase")
    parser.add_argument("--server-args", default="", help="extra flags for the server it starts, e.g. '--quantize int8'")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the mixed and base phases this many times (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", type=_phase_list, default=DEFAULT_PHASES,
                        help=f"server phases to run, comma-separated, from {','.join(ALL_PHASES)} (default {','.join(DEFAULT_PHASES)}); "
                             "constrained: response_format json_schema vs free; mixcomp: a third of the rows 2-adapter mixes vs single adapters")
    parser.add_argument("--output", default="bench-results", help="folder for results.json and results.png")
    group = parser.add_argument_group("backends", "--backends torch,onnx: the two serving backends side by side (server/bench_backends.py)")
    group.add_argument("--backends", help="compare these backends (torch, onnx, onnx-per-request; comma-separated) instead of the mixed/base/naive phases")
    group.add_argument("--onnx-model", help="serve this export-onnx folder for the onnx backend (default: export the base to int4 first)")
    group.add_argument("--backend-concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[4, 8], help="aggregate throughput levels (default 4,8)")
    group.add_argument("--single-requests", type=int, default=6, help="requests of the single-stream phase (default 6)")


#: phases of ``--phases`` (the ceilings and the naive baseline have their own flags)
ALL_PHASES = ("mixed", "base", "single", "burst", "hotload", "constrained", "mixcomp")
DEFAULT_PHASES = ("mixed", "base", "single", "burst", "hotload")

#: the constrained phase's schema: an array of 32 small records, longer than any --output-tokens
#: budget up to ~250 tokens, so constrained and free requests produce the same number of tokens
BENCH_SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 32, "maxItems": 32, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "name": {"type": "string", "maxLength": 8},
                       "kind": {"enum": ["alpha", "beta", "gamma"]},
                       "ok": {"type": "boolean"}},
        "required": ["id", "name", "kind", "ok"], "additionalProperties": False}}},
    "required": ["records"],
    "additionalProperties": False,
}


def _phase_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_PHASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {unknown or [text]}; choose from {','.join(ALL_PHASES)}")
    return names


def mix_models(adapters: list[str], requests: int) -> tuple[list[str], list[str]]:
    """The mixcomp phase's two request plans, request by request: ``singles`` cycles through the
    adapters; ``with_mixes`` is the same but every third request is the 2-adapter mix
    ``a:0.7+b:0.3`` of that adapter and the next one."""
    singles = [adapters[i % len(adapters)] for i in range(requests)]
    with_mixes = [f"{a}:0.7+{adapters[(i + 1) % len(adapters)]}:0.3" if i % 3 == 2 else a for i, a in enumerate(singles)]
    return singles, with_mixes


def _mix_body(base_name: str):
    """body_for: a compact mix name becomes the body field ``adapters`` on the base's model."""

    def body(model: str) -> dict:
        if ":" not in model:
            return {"model": model}
        members = [part.split(":") for part in model.split("+")]
        return {"model": base_name, "adapters": [{"name": n, "weight": float(w)} for n, w in members]}

    return body


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    def stop(signum, frame):  # SIGTERM (a timeout, CI) unwinds: the server bench started is stopped too
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    if getattr(args, "backends", None):
        from loraplex.server.bench_backends import run_backends

        return run_backends(args)
    from loraplex.server.basemodel import resolve_base
    from loraplex.server.store import AdapterStore

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    ref = resolve_base(args.base or "embedded")
    if args.adapters_dir:
        store = Path(args.adapters_dir)
        adapters = AdapterStore(store).names()
    else:
        store = work / "adapters"
        adapters = write_synthetic_adapters(ref.path, store, args.synthetic_adapters + args.hotload, args.rank, args.seed)
    return _run_phases(args, ref, store, adapters, work, out_dir)


def start_server(ref, store: Path, work: Path, *, max_batch_size: int, server_args: str, env: dict | None = None):
    import os
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loraplex.server.cli", "serve", "--base", str(ref.path), "--adapters-dir", str(store), "--port", str(port), "--grpc-port", "0",
           "--log-level", "warning", "--max-batch-size", str(max(max_batch_size, 1)), "--served-model-name", "base", *server_args.split()]
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(work / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _served_dtype(args) -> str:
    if args.served_dtype != "auto":
        return args.served_dtype
    words = args.server_args.split()
    if "--dtype" in words and words.index("--dtype") + 1 < len(words) and words[words.index("--dtype") + 1] != "auto":
        return words[words.index("--dtype") + 1]
    if "--backend" in words and "onnx" in words:
        return "int4"  # the default export precision; pass --served-dtype for others
    from loraplex.server.basemodel.loading import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


class _Progress:
    """A rich progress bar per phase (requests done), on stderr; silent when not a terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("bench: {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def phase(self, name: str, total: int):
        task = self.progress.add_task(name, total=total)
        return lambda: self.progress.advance(task)

    def note(self, text: str) -> None:
        self.progress.console.print(f"bench: {text}")


def _run_phases(args, ref, store: Path, adapters: list[str], work: Path, out_dir: Path) -> int:
    import httpx

    from loraplex.server.bench_ceilings import fractions, higher_ceilings, measure_ceilings, model_cost

    selected = set(getattr(args, "phases", DEFAULT_PHASES))
    hot = adapters[len(adapters) - args.hotload :] if args.hotload and not args.adapters_dir and "hotload" in selected else []
    serving = [a for a in adapters if a not in hot]
    proc = None
    url = args.url
    base_name = "base"
    naive = args.naive if args.naive is not None else url is None
    dtype = _served_dtype(args)
    phases: dict[str, PhaseResult] = {}
    hotload_ms: list[float] = []
    rss: dict[str, float] = {}
    during = outside = []
    peer: dict | None = None
    with _Progress() as progress:
        ceilings = ceilings_start = ceilings_end = None
        if args.ceilings:  # before any server runs: the machine as idle as it gets
            progress.note("measuring this machine's GEMM and memory ceilings ...")
            ceilings = ceilings_start = measure_ceilings()
            progress.note(f"ceilings: {ceilings}")
        if url is None:
            progress.note("starting the server ...")
            proc, url = start_server(ref, store, work, max_batch_size=max(args.concurrency, args.burst), server_args=args.server_args)
        else:
            base_name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        common = dict(base=base_name, concurrency=args.concurrency, requests=args.requests, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, seed=args.seed)

        def load(name: str) -> float:
            t0 = time.perf_counter()
            httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name}, timeout=600).raise_for_status()
            return (time.perf_counter() - t0) * 1000

        try:
            if proc is not None:
                time.sleep(0.5)
                rss["0"] = _rss_mib(proc.pid)
            tick = progress.phase("load adapters", len(serving))
            for i, name in enumerate(serving):  # load before measuring: the mixed phase measures serving, not first loads
                load(name)
                tick()
                if proc is not None and i == 0:
                    rss["1"] = _rss_mib(proc.pid)
            if proc is not None:
                time.sleep(0.5)
                rss[str(len(serving))] = _rss_mib(proc.pid)
            warm = min(8, args.requests)
            asyncio.run(run_load(url, "warmup", adapters=serving, mix="uniform", **{**common, "requests": warm}, on_done=progress.phase("warm-up", warm)))
            # mixed and base alternate (A B A B ...) so slow drifts of a shared machine hit both alike
            pairs = []
            if "mixed" in selected or "base" in selected:
                pairs.append([(n, kw) for n, kw in (("mixed", dict(adapters=serving, mix=args.mix)), ("base", dict(adapters=[], mix="base")))
                              if n in selected])
            if "constrained" in selected:
                schema = {"type": "json_schema", "json_schema": {"name": "bench", "schema": BENCH_SCHEMA}}
                pairs.append([("unconstrained", dict(adapters=serving, mix=args.mix)),
                              ("constrained", dict(adapters=serving, mix=args.mix, extra={"response_format": schema, "ignore_eos": None}))])
            if "mixcomp" in selected:
                if len(serving) < 2:
                    raise SystemExit("loraplex bench: error: the mixcomp phase needs at least 2 adapters")
                singles, with_mixes = mix_models(serving, args.requests)
                pairs.append([("singles", dict(adapters=serving, mix="uniform", models=singles)),
                              ("with_mixes", dict(adapters=serving, mix="uniform", models=with_mixes, body_for=_mix_body(base_name)))])
            for pair in pairs:
                for round_ in range(args.repeats):
                    seeded = {**common, "seed": args.seed + round_}
                    for name, kwargs in pair:
                        done = progress.phase(f"{name} (c={args.concurrency}, round {round_ + 1})", args.requests)
                        result = asyncio.run(run_load(url, name, **kwargs, **seeded, on_done=done))
                        phases[name] = result if name not in phases else _combine(phases[name], result)
            if args.single_stream_requests and "single" in selected:
                n = args.single_stream_requests
                phases["single"] = asyncio.run(run_load(url, "single", adapters=serving, mix="uniform", **{**common, "concurrency": 1, "requests": n, "output_tokens": 2 * args.output_tokens}, on_done=progress.phase("single stream", n)))
            if args.burst and "burst" in selected:
                n = args.burst
                phases["burst"] = asyncio.run(run_load(url, "burst", adapters=serving, mix="uniform", **{**common, "concurrency": n, "requests": n}, on_done=progress.phase(f"burst of {n} new requests", n)))
            if hot:
                load_windows: list[tuple[float, float]] = []
                token_gaps: list[tuple[float, float]] = []

                async def hot_loads(client):
                    await asyncio.sleep(1.0)
                    for name in hot:
                        t0 = time.perf_counter()
                        reply = await client.post(url + "/v1/load_lora_adapter", json={"lora_name": name})
                        t1 = time.perf_counter()
                        reply.raise_for_status()
                        hotload_ms.append((t1 - t0) * 1000)
                        load_windows.append((t0, t1))
                        await asyncio.sleep(0.5)

                phases["hotload"] = asyncio.run(run_load(url, "hotload", adapters=serving, mix=args.mix, during=hot_loads, on_token=lambda at, gap: token_gaps.append((at, gap)),
                                                         on_done=progress.phase("hot-load", args.requests), **common))
                during = [gap for at, gap in token_gaps if any(a <= at <= b + gap for a, b in load_windows)]
                outside = [gap for at, gap in token_gaps if not any(a <= at <= b + gap for a, b in load_windows)]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        if ceilings_start is not None:  # again after the phases (a server it started has stopped): fractions use the higher
            ceilings_end = measure_ceilings()
            ceilings = higher_ceilings(ceilings_start, ceilings_end)
            progress.note(f"ceilings at the end: {ceilings_end}")
        if args.peer_llama_server:
            peer = _run_peer(args, ref, store, serving, work, common, progress)
        if naive and args.naive_requests:
            progress.note(f"naive peft baseline: {args.naive_requests} requests one at a time ...")
            phases["naive"] = naive_baseline(ref.path, store, serving, requests=args.naive_requests, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, seed=args.seed)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "base": {"id": ref.id, "fingerprint": ref.fingerprint},
        "adapters": {"serving": len(serving), "hotloaded": len(hot), "rank": args.rank if not args.adapters_dir else None},
        "served_dtype": dtype,
        "ceilings": ceilings,  # the higher of start and end, per figure: what the fractions divide by
        "ceilings_start": ceilings_start,
        "ceilings_end": ceilings_end,
        "phases": {name: p.summary() for name, p in phases.items()},
        "ratios": {
            "mixed_over_base": _ratio(phases, "mixed", "base", 3),
            "server_over_naive": _ratio(phases, "mixed", "naive", 2),
        },
    }
    if "constrained" in phases:
        c, f = phases["constrained"], phases["unconstrained"]
        report["ratios"]["constrained_over_free"] = _ratio(phases, "constrained", "unconstrained", 3)
        report["constrained"] = {
            "schema": "records: 32 x {id, name, kind, ok} (server/bench.py BENCH_SCHEMA)",
            # aggregate seconds per output token, constrained minus free: what the grammar adds per token
            "overhead_ms_per_token": round(1000 * (1 / c.tok_per_s - 1 / f.tok_per_s), 3) if c.tok_per_s and f.tok_per_s else None,
            "itl_p50_delta_ms": round(_pct(c.itl, 50) - _pct(f.itl, 50), 2) if c.itl and f.itl else None,
            "tokens_per_request": {"constrained": round(c.output_tokens / max(1, c.requests), 1),
                                   "free": round(f.output_tokens / max(1, f.requests), 1)},
        }
    if "with_mixes" in phases:
        report["ratios"]["mixes_over_singles"] = _ratio(phases, "with_mixes", "singles", 3)
        report["mixcomp"] = {"mix_fraction": round(sum(":" in m for m in mix_models(serving, args.requests)[1]) / args.requests, 3),
                             "members_per_mix": 2, "target": 0.85}
    if "burst" in phases and phases["burst"].ttft:
        b = report["phases"]["burst"]
        report["ratios"]["burst_ttft_p99_over_p50"] = round(b["ttft_p99_ms"] / b["ttft_p50_ms"], 2) if b["ttft_p50_ms"] else None
    config = ref.path / "config.json"
    if ceilings and config.is_file():
        cost = model_cost(config)
        report["model_cost"] = cost
        for name, phase in report["phases"].items():
            if name == "naive":
                continue
            tok_s = phase["output_tok_per_s"]
            if name == "single" and phase.get("itl_p50_ms"):
                tok_s = round(1000.0 / phase["itl_p50_ms"], 2)  # decode rate of the stream (TTFT excluded)
                phase["decode_tok_per_s"] = tok_s
            phase.update(fractions(tok_s, ceilings=ceilings, cost=cost, dtype=dtype, single_stream=name == "single"))
    if len(rss) >= 3:
        file_bytes = statistics.mean((store / a / "adapter_model.safetensors").stat().st_size for a in serving)
        growth = (rss[str(len(serving))] - rss["1"]) / max(1, len(serving) - 1)
        report["memory"] = {"rss_mib": {k: round(v, 1) for k, v in rss.items()}, "rss_growth_per_adapter_mib": round(growth, 2),
                            "adapter_file_mib": round(file_bytes / 2**20, 2), "rss_growth_over_file_size": round(growth / (file_bytes / 2**20), 2)}
    if peer is not None:
        report["peer_llama_server"] = peer
        if "mixed" in phases and peer.get("mixed", {}).get("output_tok_per_s"):
            report["ratios"]["mixed_over_llama_server_mixed"] = round(phases["mixed"].tok_per_s / peer["mixed"]["output_tok_per_s"], 2)
    if hot:
        report["hotload"] = {
            "load_ms": [round(v, 1) for v in hotload_ms],
            "load_p50_ms": round(statistics.median(hotload_ms), 1),
            "itl_p99_ms_during_loads": _pct(during, 99),
            "itl_p99_ms_without_loads": _pct(outside, 99),
            "tokens_during_loads": len(during),
        }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out_dir / "results.png")
    print(json.dumps({k: report.get(k) for k in ("ceilings", "phases", "ratios", "memory", "hotload", "peer_llama_server")}, indent=2))
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.png'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _ratio(phases: dict[str, PhaseResult], a: str, b: str, digits: int) -> float | None:
    if a not in phases or b not in phases or not phases[b].tok_per_s:
        return None
    return round(phases[a].tok_per_s / phases[b].tok_per_s, digits)


def _run_peer(args, ref, store: Path, serving: list[str], work: Path, common: dict, progress) -> dict:
    """llama.cpp's llama-server with the same base (GGUF) and adapters: mixed, base, single."""
    from loraplex.server.basemodel import embedded_gguf_path
    from loraplex.server.bench_peer import convert_adapters, find_converter, lora_body, start_llama_server

    binary = Path(args.peer_llama_server)
    if not binary.is_file():
        raise SystemExit(f"loraplex bench: error: --peer-llama-server {binary}: no such file")
    progress.note("llama-server: converting adapters with convert_lora_to_gguf.py ...")
    loras = convert_adapters(find_converter(binary), ref.path, store, serving, work / "gguf-loras")
    proc, url = start_llama_server(binary, embedded_gguf_path(), loras, parallel=args.concurrency, ctx_per_slot=args.prompt_tokens + 2 * args.output_tokens + 8,
                                   threads=2, log=work / "llama-server.log")
    body = lora_body(serving)
    results = {}
    try:
        for name, kwargs in (("mixed", dict(adapters=serving, mix=args.mix)), ("base", dict(adapters=[], mix="base")),
                             ("single", dict(adapters=serving, mix="uniform", concurrency=1, requests=max(1, args.single_stream_requests)))):
            if name not in set(getattr(args, "phases", DEFAULT_PHASES)):
                continue  # the peer runs the phases our server runs, no more
            run = {**common, **kwargs}
            done = progress.phase(f"llama-server {name}", run["requests"])
            results[name] = asyncio.run(run_load(url, name, body_for=body, on_done=done, **run)).summary()
    finally:
        proc.terminate()
        proc.wait(30)
    return results
