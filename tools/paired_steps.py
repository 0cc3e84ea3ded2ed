"""Paired step timing for an engine switch: one process, 64 decoding rows kept running, the
switch flipped every few steps (order alternating per round), so both sides see the same host
windows and the same KV lengths. Whole-phase A/B runs (``engine_bench.py --ab``) lose 5-10%
changes in this host's noise; this does not.

    .venv/bin/python tools/paired_steps.py --switch fold_a            # 8 adapters mixed
    .venv/bin/python tools/paired_steps.py --switch fold_a --base     # base rows, adapters resident
    .venv/bin/python tools/paired_steps.py --switch small_fp32 --rows 16 --one   # 16 rows, one adapter
    .venv/bin/python tools/paired_steps.py --switch adapters          # mixed rows vs the same rows on the base

Prints one JSON line: per-round ms per step for A and B, their medians and the median of the
per-round ratios B/A (> 1: A is faster). Switches are engine_bench.py's ``--ab`` names.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_bench as eb  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switch", required=True)
    p.add_argument("--base", action="store_true", help="rows without an adapter (the adapters stay resident)")
    p.add_argument("--one", action="store_true", help="every row on the same adapter (the others stay resident)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side per round")
    args = p.parse_args()
    model, engine = eb.build_engine("bfloat16", args.rows, None)
    names = eb.install(engine, model, args.adapters, 8)
    label_a, label_b, switch = eb._ab_switches(engine)[args.switch]
    driver = eb.Driver(engine)
    for i in range(args.rows):
        adapter = None if args.base else names[0] if args.one else names[i % len(names)]
        request, _ = eb.request(f"r{i}", 32, adapter, 1 << 20, seed=i)
        driver.submit(request)
    while len(engine.running) < args.rows or any(r.prefilling for r in engine.running):
        driver.step()
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for on in (True, False) if r % 2 == 0 else (False, True):
            switch(on)
            driver.step()
            driver.step()
            start = time.perf_counter()
            for _ in range(args.steps):
                driver.step()
            times[on].append((time.perf_counter() - start) / args.steps * 1e3)
    a, b = times[True], times[False]
    print(json.dumps({
        "switch": args.switch, "rows": args.rows, "adapters": "base" if args.base else "one" if args.one else f"{args.adapters} mixed",
        f"{label_a}_ms": [round(x, 1) for x in a], f"{label_b}_ms": [round(x, 1) for x in b],
        f"median_{label_a}_ms": round(statistics.median(a), 1), f"median_{label_b}_ms": round(statistics.median(b), 1),
        "paired_ratio_b_over_a": round(statistics.median([y / x for x, y in zip(a, b)]), 3),
    }))


if __name__ == "__main__":
    main()
