"""Stress with adapter churn (issue 16, item 9), bounded: concurrent clients over more adapters
than slots (``--max-loras 2``, 6 adapters and the base), while another task loads, unloads and
republishes adapters (atomic publish over the old folder, picked up by ``--watch``).

Asserted after the run: no 5xx and no dropped connection; every 200 equals peft's solo answer
for that adapter (greedy, fp32; for a republished adapter: one of its two versions, never a
mix); registry and engine agree (GET /v1/admin/consistency); the per-adapter request counters in
/metrics equal what the clients counted; no adapter was recorded as failed.

Size: ``LORAPLEX_STRESS_REQUESTS`` (CI: 120) and ``LORAPLEX_STRESS_CLIENTS`` (6). A run prints
its counts (use ``-s``); docs/reliability.md has a larger run.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import shutil
import time

import httpx
import pytest

from loraplex.server.store import AdapterStore
from tests.integration.server_harness import ServerProcess, text_of
from tests.oracle import make_random_adapter

REQUESTS = int(os.environ.get("LORAPLEX_STRESS_REQUESTS", "120"))
CLIENTS = int(os.environ.get("LORAPLEX_STRESS_CLIENTS", "6"))
PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402]]
N = 6
ADAPTERS = [f"s{i}" for i in range(6)]
REPUBLISHED = ("s0", "s1")  # these two flip between two versions during the run


def _solo_answers(base_dir, folders: dict, tokenizer) -> dict:
    """(version, prompt) -> text: peft's PeftModel, one adapter active, greedy without a KV cache."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    names = list(folders)
    model = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.eval()

    def greedy(prompt):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(N):
                ids.append(int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1])))
        return text_of(tokenizer, ids[len(prompt) :])

    out = {}
    for name in names:
        model.set_adapter(name)
        for p in PROMPTS:
            out[(name, tuple(p))] = greedy(p)
    with model.disable_adapter():
        for p in PROMPTS:
            out[(None, tuple(p))] = greedy(p)
    return out


@pytest.fixture(scope="module")
def versions(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("stress-pool")
    folders = {name: make_random_adapter(tiny_base, root / name, seed=40 + i, r=4) for i, name in enumerate(ADAPTERS)}
    for i, name in enumerate(REPUBLISHED):
        folders[f"{name}-v2"] = make_random_adapter(tiny_base, root / f"{name}-v2", seed=60 + i, r=8, lora_alpha=8)
    return folders


@pytest.fixture(scope="module")
def solo(tiny_base, versions, tokenizer):
    answers = _solo_answers(tiny_base, versions, tokenizer)
    for p in PROMPTS:  # every version answers differently: a mix-up cannot pass unnoticed
        assert len({answers[(v, tuple(p))] for v in [None, *versions]}) == len(versions) + 1
    return answers


def _allowed(solo, adapter, prompt) -> set[str]:
    key = tuple(prompt)
    if adapter == "tiny":
        return {solo[(None, key)]}
    out = {solo[(adapter, key)]}
    if adapter in REPUBLISHED:
        out.add(solo[(f"{adapter}-v2", key)])
    return out


async def _clients(url, solo, rng, tally, bad, counts_by_adapter):
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(REQUESTS):
        adapter = rng.choice([*ADAPTERS, *ADAPTERS, "tiny"])
        queue.put_nowait((adapter, rng.choice(PROMPTS), rng.random() < 0.3))

    async def worker(client):
        while not queue.empty():
            adapter, prompt, stream = queue.get_nowait()
            body = {"model": adapter, "prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True, "stream": stream}
            try:
                if stream:
                    text, status = "", None
                    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
                        status = resp.status_code
                        if status != 200:
                            text = (await resp.aread()).decode(errors="replace")
                        else:
                            async for line in resp.aiter_lines():
                                if line.startswith("data: {"):
                                    text += json.loads(line[6:])["choices"][0]["text"]
                else:
                    resp = await client.post(url + "/v1/completions", json=body)
                    status = resp.status_code
                    text = resp.json()["choices"][0]["text"] if status == 200 else resp.text
            except httpx.HTTPError as exc:
                status, text = "connection", repr(exc)
            tally[status] += 1
            counts_by_adapter[(adapter, status)] += 1
            if status == 200 and text not in _allowed(solo, adapter, prompt):
                bad.append(("mismatch", adapter, prompt, text))
            elif status == 200 and adapter in REPUBLISHED:
                counts_by_adapter[("version", "v2" if text == solo[(f"{adapter}-v2", tuple(prompt))] else "v1")] += 1
            elif status != 200 and status != 429:
                bad.append((status, adapter, prompt, text[:300]))

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(CLIENTS)))


async def _churn(url, store: AdapterStore, versions, rng, stop: asyncio.Event, ops, bad):
    flipped = {name: False for name in REPUBLISHED}
    async with httpx.AsyncClient(timeout=120) as client:
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            op = rng.choice(["load", "unload", "republish", "republish"])
            name = rng.choice(ADAPTERS)
            try:
                if op == "load":
                    resp = await client.post(url + "/v1/load_lora_adapter", json={"lora_name": name})
                elif op == "unload":
                    resp = await client.post(url + "/v1/unload_lora_adapter", json={"lora_name": name})
                else:
                    name = rng.choice(REPUBLISHED)
                    flipped[name] = not flipped[name]
                    source = versions[f"{name}-v2"] if flipped[name] else versions[name]

                    def publish():
                        with store.staging(name) as staged:
                            for f in source.iterdir():
                                shutil.copy(f, staged / f.name)
                            store.publish(staged, name, overwrite=True)

                    await asyncio.to_thread(publish)
                    ops[op] += 1
                    continue
            except httpx.HTTPError as exc:
                bad.append(("churn connection", op, name, repr(exc)))
                continue
            ops[(op, resp.status_code)] += 1
            if resp.status_code >= 500 or resp.status_code not in (200, 404, 429):
                bad.append(("churn", op, name, resp.status_code, resp.text[:300]))


def _metric_requests(url) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    out = collections.Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "loraplex_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["adapter"], s.labels["status"])] += int(s.value)
    return out, text


def test_concurrent_requests_with_adapter_churn(tiny_base, versions, solo, tmp_path):
    store_root = tmp_path / "adapters"
    store_root.mkdir()
    for name in ADAPTERS:
        shutil.copytree(versions[name], store_root / name)
    store = AdapterStore(store_root)
    rng = random.Random(16)
    tally, ops, counts = collections.Counter(), collections.Counter(), collections.Counter()
    bad: list = []
    args = ["--max-loras", "2", "--max-lora-rank", "8", "--watch", "--watch-interval", "0.3", "--dtype", "float32", "--adapter-wait-timeout", "30"]
    with ServerProcess(tiny_base, store_root, *args) as srv:
        async def run():
            stop = asyncio.Event()
            churn = asyncio.create_task(_churn(srv.url, store, versions, random.Random(17), stop, ops, bad))
            try:
                await _clients(srv.url, solo, rng, tally, bad, counts)
            finally:
                stop.set()
                await churn

        started = time.monotonic()
        asyncio.run(run())
        elapsed = time.monotonic() - started
        consistency = httpx.get(srv.url + "/v1/admin/consistency", timeout=60).json()
        deadline = time.monotonic() + 10
        while True:  # a streaming reply's counter is written as its generator closes: allow a moment
            metric, metrics_text = _metric_requests(srv.url)
            wanted = collections.Counter({(a, "length" if s == 200 else "rejected"): n for (a, s), n in counts.items() if a != "version" and s in (200, 429)})
            if +metric == +wanted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        log = srv.log()

    print(f"\nstress: {REQUESTS} requests, {CLIENTS} clients, {elapsed:.1f}s: {dict(tally)}; churn {dict(ops)}; "
          f"evictions {consistency.get('evictions')}, republished versions served {counts[('version', 'v1')]} v1 / {counts[('version', 'v2')]} v2, "
          f"mismatches {sum(1 for b in bad if b[0] == 'mismatch')}")
    assert not bad, bad[:5]
    assert sum(tally.values()) == REQUESTS and tally[200] >= REQUESTS * 0.9, tally
    assert consistency["consistent"], consistency
    assert +metric == +wanted, (metric, wanted)
    assert "loraplex_adapter_load_failures_total{" not in metrics_text
    assert consistency["evictions"] > 0 and ops["republish"] > 0
    assert counts[("version", "v1")] and counts[("version", "v2")], counts  # both versions were served
    assert "Traceback" not in log, log[-3000:]
