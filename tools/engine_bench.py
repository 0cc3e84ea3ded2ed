"""Drive the torch engine directly (no HTTP, no scheduler thread) on the real embedded base and
print throughput figures: mixed-adapter aggregate tok/s, single-stream tok/s, and TTFT of a burst
of new requests arriving while others decode.

    .venv/bin/python tools/engine_bench.py --dtype bfloat16            # all phases
    .venv/bin/python tools/engine_bench.py --dtype float32 --phases mixed --repeat 3

Adapters are random rank-r LoRA weights on every projection of every layer (what a served
adapter costs); prompts are random token ids; generation is greedy with EOS ignored, so every
request produces exactly its ``max_tokens``. Prints one JSON line per phase, with the fraction of
this machine's ceilings measured at the start of the run (server/bench_ceilings.py: GEMM GFLOP/s
at the dtype, memory read GB/s), then, the ceilings measured again at the end, each phase's
fractions against the higher of the two (``"against": "higher ceilings"``: the conservative
figures, as ``loraplex bench`` reports them), and a ``memory`` line: RSS growth per resident adapter against
the adapter's peft file size (fp32 safetensors).

    .venv/bin/python tools/engine_bench.py --dtype bfloat16 --profile single     # torch.profiler table
    .venv/bin/python tools/engine_bench.py --dtype bfloat16 --ab packed --repeat 3  # A/B in one process
    PYTHONPATH=/tmp/old .venv/bin/python tools/engine_bench.py --dtype bfloat16 --phases mixed \
        --versus loraplex_old_engine.engine:float32 --repeat 3     # this engine vs an old copy, alternated
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loraplex.server.store.validation import LoraModuleWeights

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(model, rank: int, seed: int) -> dict[str, LoraModuleWeights]:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in model.named_modules():
        name = name.removesuffix(".base_layer")  # the engine wraps each Linear
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            modules[name] = LoraModuleWeights(
                torch.randn(rank, module.in_features, generator=g) * 0.02,
                torch.randn(module.out_features, rank, generator=g) * 0.02,
                2.0,
            )
    return modules


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def adapter_file_mib(modules: dict) -> float:
    """What the adapter's peft file holds: its A/B tensors in fp32 (safetensors header aside)."""
    return sum((w.a.numel() + w.b.numel()) * 4 for w in modules.values()) / 2**20


def build_engine(dtype: str, max_batch_size: int, budget: int | None, engine_module: str = "loraplex.server.engine.engine", int4_rows: int | None = None, compile_decode: bool = False):
    import importlib

    from loraplex.server.basemodel import load_base_model, resolve_base

    engine_mod = importlib.import_module(engine_module)

    ref = resolve_base("embedded")
    build_engine.config_path = ref.path / "config.json"
    try:
        model = load_base_model(ref, device="cpu", dtype=dtype)
    except TypeError:  # the engine before --dtype: fp32 only
        model = load_base_model(ref, device="cpu")
    kwargs = {"max_batch_size": max_batch_size, "max_model_len": 2048}
    if budget and hasattr(engine_mod.Engine, "admit"):
        kwargs["max_num_batched_tokens"] = budget
    if int4_rows is not None:
        kwargs["int4_decode_rows"] = int4_rows
    if compile_decode:
        kwargs["compile_decode"] = True
    engine = engine_mod.Engine(model, eos_token_ids=[2], **kwargs)
    return model, engine


def _settle(engine) -> None:
    """Wait for the engine's background LoRA refold (engines without one: nothing to wait for)."""
    lean = getattr(engine, "lean", None)
    if lean is not None and hasattr(lean, "settle"):
        lean.settle()


def install(engine, model, n: int, rank: int, memory: dict | None = None) -> list[str]:
    """Install ``n`` random adapters; ``memory`` gets the RSS after the first and after all
    (the growth per adapter excludes first-use allocations) and the adapter file size."""
    import gc

    names = []
    if memory is not None:
        gc.collect()
        memory["rss_before_mib"] = round(_rss_mib(), 1)
    for i in range(n):
        name = f"ad{i}"
        modules = random_adapter(model, rank, seed=100 + i)
        if memory is not None:
            memory["adapter_file_mib"] = round(adapter_file_mib(modules), 2)
        if hasattr(engine, "try_add_adapter_in_place") and hasattr(engine, "admit"):
            from loraplex.server.engine.engine import TorchAdapterPayload

            engine.add_adapter(TorchAdapterPayload(name=name, modules=modules))
        else:
            engine.add_adapter(name, modules)
        names.append(name)
        del modules
        if memory is not None and i in (0, n - 1):
            _settle(engine)  # steady state: the background refold done, its transient copies freed
            gc.collect()
            memory[f"rss_after_{i + 1}_mib"] = round(_rss_mib(), 1)
    _settle(engine)  # the LoRA A rows folded into the base GEMMs (a background refold)
    if memory is not None and n > 1:
        # loraplex bench's figure: from 1 to n adapters (LoRA rows come in blocks of several
        # adapters, so this can read ~0 while the first block covers all n) ...
        growth = (memory[f"rss_after_{n}_mib"] - memory["rss_after_1_mib"]) / (n - 1)
        memory["rss_growth_per_adapter_mib"] = round(growth, 2)
        memory["rss_growth_over_file_size"] = round(growth / memory["adapter_file_mib"], 3)
        # ... and from none to n, which counts the first block too
        growth0 = (memory[f"rss_after_{n}_mib"] - memory["rss_before_mib"]) / n
        memory["rss_growth_from_0_per_adapter_mib"] = round(growth0, 2)
        memory["rss_growth_from_0_over_file_size"] = round(growth0 / memory["adapter_file_mib"], 3)
        memory["lora_bytes_per_adapter_mib"] = round(getattr(engine, "lora_bytes", 0) / n / 2**20, 2)
    return names


class Driver:
    """Admits requests and steps the engine like the scheduler does (new API or the old one)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.new_api = hasattr(engine, "admit")
        self.pending: list = []

    def submit(self, request) -> None:
        if self.new_api:
            self.engine.admit(request)
        else:
            self.pending.append(request)

    def step(self) -> None:
        if self.new_api:
            self.engine.step()
            return
        admitted = 0  # the old scheduler: at most 2 prefills per step while rows decode
        while self.pending and (admitted < 2 or not self.engine.num_running):
            self.engine.prefill(self.pending.pop(0))
            admitted += 1
        if self.engine.num_running:
            self.engine.decode()

    def busy(self) -> bool:
        return bool(self.pending) or self.engine.num_running > 0


class Sink:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.done = False

    def __call__(self, token, finish) -> None:
        if token is not None:
            self.times.append(time.perf_counter())
        if finish is not None:
            self.done = True


def request(rid: str, prompt_len: int, adapter, max_tokens: int, seed: int):
    from loraplex.server.engine.rows import EngineRequest
    from loraplex.server.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    prompt = [1] + torch.randint(100, 40000, (prompt_len - 1,), generator=g).tolist()
    sink = Sink()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest(rid, prompt, adapter, params, sink), sink


def phase_mixed(engine, names, concurrency, prompt_len, out_tokens, base_only=False) -> dict:
    driver = Driver(engine)
    sinks = []
    cpu = time.process_time()
    start = time.perf_counter()
    for i in range(concurrency):
        req, sink = request(f"m{i}", prompt_len, None if base_only else names[i % len(names)], out_tokens, seed=i)
        sink.t0 = start
        driver.submit(req)
        sinks.append(sink)
    while driver.busy():
        driver.step()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    tokens = sum(len(s.times) for s in sinks)
    # tokens per CPU-second of this process: steadier than tok/s on a shared machine (A/B with --threads 1)
    return {"tok_s": round(tokens / elapsed, 1), "tokens": tokens, "seconds": round(elapsed, 2), "tok_per_cpu_s": round(tokens / max(cpu, 1e-9), 1)}


def phase_single(engine, names, prompt_len, out_tokens) -> dict:
    driver = Driver(engine)
    req, sink = request("s", prompt_len, names[0], out_tokens, seed=7)
    driver.submit(req)
    driver.step()  # the prefill
    while not sink.times:
        driver.step()
    cpu = time.process_time()
    while driver.busy():
        driver.step()
    cpu = time.process_time() - cpu
    decode = (sink.times[-1] - sink.times[0]) / max(1, len(sink.times) - 1)
    return {"tok_s": round(1.0 / decode, 1), "ttft_ms": round((sink.times[0] - sink.t0) * 1000, 1), "tok_per_cpu_s": round((len(sink.times) - 1) / max(cpu, 1e-9), 1)}


def phase_burst(engine, names, running, burst, prompt_len, out_tokens) -> dict:
    driver = Driver(engine)
    old = []
    for i in range(running):
        req, sink = request(f"r{i}", prompt_len, names[i % len(names)], 4 * out_tokens, seed=i)
        driver.submit(req)
        old.append(sink)
    while any(len(s.times) < 2 for s in old):  # everyone decoding
        driver.step()
    mark = time.perf_counter()
    new = []
    for i in range(burst):
        req, sink = request(f"b{i}", prompt_len, names[(i + 3) % len(names)], out_tokens, seed=1000 + i)
        sink.t0 = time.perf_counter()
        driver.submit(req)
        new.append(sink)
    while any(not s.times for s in new):
        driver.step()
    ttft = sorted((s.times[0] - s.t0) * 1000 for s in new)
    gaps = [b - a for s in old for a, b in zip(s.times, s.times[1:]) if b > mark]  # running streams' token gaps during the burst
    for r in list(getattr(engine, "running", [])):
        r.request.cancelled = True
    while driver.busy():
        driver.step()
    return {
        "ttft_p50_ms": round(statistics.median(ttft), 1),
        "ttft_p99_ms": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1),
        "max_stream_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
    }


def run_phase(phase: str, engine, names, args) -> dict:
    if phase == "mixed":
        return phase_mixed(engine, names, args.concurrency, args.prompt_len, args.out_tokens)
    if phase == "base":
        return phase_mixed(engine, names, args.concurrency, args.prompt_len, args.out_tokens, base_only=True)
    if phase == "single":
        return phase_single(engine, names, args.prompt_len, 2 * args.out_tokens)
    if phase == "burst":
        return phase_burst(engine, names, 32, 32, args.prompt_len, args.out_tokens)
    raise SystemExit(f"unknown phase {phase!r}")


def with_fractions(phase: str, result: dict, args, ceilings: dict | None) -> dict:
    if not ceilings or "tok_s" not in result:
        return result
    from loraplex.server.bench_ceilings import fractions, model_cost

    cost = model_cost(build_engine.config_path)
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    return {**result, **fractions(result["tok_s"], ceilings=ceilings, cost=cost, dtype=dtype, single_stream=phase == "single")}


def profile_phase(phase: str, engine, names, args) -> None:
    """A torch.profiler table of a few steps in the middle of ``phase`` (single or mixed)."""
    from torch.profiler import ProfilerActivity, profile

    driver = Driver(engine)
    n = 1 if phase == "single" else args.concurrency
    for i in range(n):
        adapter = None if phase == "base" else names[i % len(names)]
        req, _ = request(f"p{i}", args.prompt_len, adapter, args.out_tokens, seed=i)
        driver.submit(req)
    for _ in range(4):  # prompts prefilled, every row decoding
        driver.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.profile_steps):
            driver.step()
    for r in list(getattr(engine, "running", [])):
        r.request.cancelled = True
    while driver.busy():
        driver.step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=70))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=50))


def compile_one_row(engine, names, args) -> None:
    """Queue the compiled one-row step for a stream with an adapter and one on the base, and
    wait for the background compile (from the on-disk cache when it holds them)."""
    step = getattr(engine.lean, "one_row", None)
    if step is None:
        raise SystemExit(f"--compile-decode: the engine has no compiled one-row step ({getattr(engine.lean, 'compile_reason', 'no lean forward')})")
    started = time.perf_counter()
    for adapter in (names[0], None):
        req, _ = request(f"c-{adapter}", args.prompt_len, adapter, 3, seed=3)
        driver = Driver(engine)
        driver.submit(req)
        while driver.busy():
            driver.step()
    step.settle()
    print(json.dumps({"compiled_one_row_signatures": step.ready, "compile_s": round(time.perf_counter() - started, 1)}), flush=True)


#: --ab switches: name -> (label of A, label of B, a function that sets the switch)
def _ab_switches(engine) -> dict:
    from loraplex.server.engine import attention_kernel, expand_kernel, kvcache, lora, pointwise_kernel, row_kernel, sampling

    small = lora.SMALL_M_FP32
    lean = engine.lean

    def use_lean(on: bool) -> None:
        if lean is not None and not on:  # transformers' forward at its best: per-module prepacked weights again
            for module in engine.layers.values():
                module.restore_packed()
        engine.lean = lean if on else None

    def use_int4(on: bool) -> None:
        rows = lean.int4_rows if lean is not None else 0
        for layer in lean.layers if lean is not None else ():
            for fused in layer.fused:
                fused.int4_rows = rows if on else 0

    one_row = getattr(lean, "one_row", None)

    def use_compiled_decode(on: bool) -> None:  # the compiled one-row decode step (needs --compile-decode)
        lean.one_row = one_row if on else None

    def use_fold(on: bool) -> None:
        lora.FOLD_A["enabled"] = on
        if lean is not None:
            with engine.slot_table.lock:
                lean.refresh_lora()

    fold_diag = lora.FOLD_DIAG_MAX_BYTES

    def use_fold_diag(on: bool) -> None:  # gate/up's block-diagonal B copy in the fold too (768 KiB per layer at 8 rank-8 adapters)
        lora.FOLD_DIAG_MAX_BYTES = (2 << 20) if on else fold_diag
        if lean is not None:
            with engine.slot_table.lock:
                for layer in lean.layers:
                    for fused in layer.fused:
                        if fused.shrink is not None:
                            fused.shrink.fold = None  # rebuilt below with the new cap
                lean.refresh_lora()

    set_slots = lora.LoraBatchContext.set_token_slots

    def use_adapters(on: bool) -> None:  # off: every token of a step runs on the bare base (same KV state): mixed vs base, paired
        if on:
            lora.LoraBatchContext.set_token_slots = set_slots
        else:
            lora.LoraBatchContext.set_token_slots = lambda ctx, slots, device: set_slots(ctx, [0] * len(slots), device)

    return {
        "lean": ("lean", "transformers", use_lean),
        "int4": ("int4", "bf16_gemm", use_int4),
        "row_kernel": ("c_row_step", "per_op_row_step", lambda on: row_kernel.ROW_KERNEL.__setitem__("enabled", on)),
        "grouped": ("grouped_lora", "per_module_lora", lambda on: lora.GROUPED_LORA.__setitem__("enabled", on)),
        "packed": ("packed", "plain", lambda on: lora.PACKED_LINEARS.__setitem__("enabled", on)),
        "small_fp32": ("small_fp32", "bf16_lora", lambda on: setattr(lora, "SMALL_M_FP32", small if on else 0)),
        "diag": ("diag_b", "per_member_b", lambda on: lora.DIAG_B.__setitem__("enabled", on)),
        "argmax": ("chunked_argmax", "torch_argmax", lambda on: sampling.CHUNKED_ARGMAX.__setitem__("enabled", on)),
        "gqa_fold": ("gqa_folded", "enable_gqa", lambda on: kvcache.FOLD_GQA.__setitem__("enabled", on)),
        "fold_a": ("folded_shrink", "separate_shrink", use_fold),
        "compile_decode": ("compiled_one_row", "eager_one_row", use_compiled_decode),
        "fold_diag": ("gate_up_diag", "gate_up_per_member", use_fold_diag),
        "expand_kernel": ("expand_kernel", "masked_gemm", lambda on: expand_kernel.EXPAND_KERNEL.__setitem__("enabled", on)),
        "adapters": ("adapter_rows", "base_rows", use_adapters),
        "decode_kernel": ("attention_kernel", "sdpa", lambda on: attention_kernel.DECODE_KERNEL.__setitem__("enabled", on)),
        "pointwise": ("pointwise_kernels", "torch_ops", lambda on: pointwise_kernel.POINTWISE_KERNEL.__setitem__("enabled", on)),
        "expand_threads": ("expand_parallel", "expand_one_thread", lambda on: expand_kernel.EXPAND_KERNEL.__setitem__("parallel", on)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--phases", default="mixed,base,single,burst")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--out-tokens", type=int, default=64)
    p.add_argument("--budget", type=int, default=0, help="max_num_batched_tokens (0 = engine default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--int4-rows", type=int, default=None, help="the engine's int4_decode_rows (default: the engine's default)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the machine's ceilings (about 2 s)")
    p.add_argument("--profile", default="", help="print a torch.profiler table of PHASE (single, mixed or base) instead of timing")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--ab", default="", help="alternate a switch each repeat, A then B, in this process (choices: lean, int4, row_kernel, grouped, packed, small_fp32, diag, argmax, gqa_fold, fold_a, fold_diag, compile_decode, expand_kernel, adapters, decode_kernel, pointwise, expand_threads)")
    p.add_argument("--compile-decode", action="store_true", help="the engine's compiled one-row decode step (compiled before the phases: minutes on 2 cores, cached on disk)")
    p.add_argument("--engine-module", default="loraplex.server.engine.engine", help="module with the Engine class (to compare with an older copy on PYTHONPATH)")
    p.add_argument("--versus", default="", metavar="MODULE:DTYPE", help="also build the Engine of MODULE at DTYPE (e.g. an older copy on PYTHONPATH, float32) "
                   "with the same adapters, and alternate the two engines phase by phase in this process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ceilings = None
    if not args.no_ceilings and not args.profile:
        from loraplex.server.bench_ceilings import measure_ceilings

        ceilings = measure_ceilings()
        print(json.dumps({"ceilings": ceilings}), flush=True)
    model, engine = build_engine(args.dtype, max(args.concurrency, 64), args.budget, args.engine_module, args.int4_rows, args.compile_decode)
    memory: dict = {}
    names = install(engine, model, args.adapters, args.rank, memory)
    print(json.dumps({"memory": memory, "dtype": args.dtype}), flush=True)
    if args.compile_decode:
        compile_one_row(engine, names, args)
    phase_mixed(engine, names, 4, args.prompt_len, 4)  # warm-up
    if args.profile:
        profile_phase(args.profile, engine, names, args)
        return
    phases = args.phases.split(",")
    variants: list[tuple[str, object, object, list[str], str]] = [("", None, engine, names, args.dtype)]
    if args.ab:
        label_a, label_b, switch = _ab_switches(engine)[args.ab]
        variants = [(label_a, lambda: switch(True), engine, names, args.dtype), (label_b, lambda: switch(False), engine, names, args.dtype)]
    if args.versus:
        module, _, other_dtype = args.versus.partition(":")
        other_dtype = other_dtype or "float32"
        other_model, other = build_engine(other_dtype, max(args.concurrency, 64), args.budget, module)
        other_names = install(other, other_model, args.adapters, args.rank)
        phase_mixed(other, other_names, 4, args.prompt_len, 4)  # warm-up
        variants = [(label or "this", apply, e, n, d) for label, apply, e, n, d in variants] + [(module, None, other, other_names, other_dtype)]
    results: list[tuple[str, str, dict]] = []
    for _ in range(args.repeat):
        for phase in phases:
            for label, apply, which, which_names, dtype in variants:
                if apply is not None:
                    apply()
                raw = run_phase(phase, which, which_names, args)
                result = with_fractions(phase, raw, args, ceilings if dtype == args.dtype else None)
                if dtype == args.dtype:
                    results.append((phase, label, raw))
                extra = {"variant": label} if label else {}
                print(json.dumps({"phase": phase, "dtype": dtype, "threads": torch.get_num_threads(), **extra, **result}), flush=True)
    if ceilings:  # measured again at the end: the fractions against the higher of the two (the host drifts within a run)
        from loraplex.server.bench_ceilings import higher_ceilings, measure_ceilings

        end = measure_ceilings()
        higher = higher_ceilings(ceilings, end)
        print(json.dumps({"ceilings_end": end, "ceilings_higher": higher}), flush=True)
        for phase, label, raw in results:
            fractions = {k: v for k, v in with_fractions(phase, raw, args, higher).items() if k.startswith("of_")}
            print(json.dumps({"phase": phase, **({"variant": label} if label else {}), "tok_s": raw.get("tok_s"), "against": "higher ceilings", **fractions}), flush=True)


def run_on_a_worker_thread() -> None:
    """Run ``main`` on a worker thread, as the server's scheduler runs the engine: on a busy
    machine the main thread measured up to 9x slower (OpenMP barriers in libgomp; docs/benchmarks.md)."""
    import threading

    failure: list[BaseException] = []

    def target() -> None:
        try:
            main()
        except BaseException as exc:  # re-raised on the main thread
            failure.append(exc)

    worker = threading.Thread(target=target, name="engine-bench")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


if __name__ == "__main__":
    run_on_a_worker_thread()
