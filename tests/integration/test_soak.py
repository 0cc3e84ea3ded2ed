"""A bounded soak (loopback only, fixed count, stops by itself): concurrent clients hammer a mix
of adapters and the base, streaming and not, with random disconnects. Afterwards: no leaked slots,
memory back within a bound, every completed response equal to the peft oracle, and /metrics
counters equal to what the clients saw."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.server_harness import ServerProcess
from tests.oracle import make_random_adapter, reference_greedy

# CI runs the short soak; a longer run: LORAPLEX_SOAK_REQUESTS=400 pytest tests/integration/test_soak.py
REQUESTS = int(os.environ.get("LORAPLEX_SOAK_REQUESTS", "64"))
CLIENTS, MAX_N = 8, 14
PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404], [1, 77, 78]]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _samples(url):
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_soak_mixed_traffic_with_disconnects(tiny_base, tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))
    store = tmp_path / "adapters"
    store.mkdir()
    adapters = {name: make_random_adapter(tiny_base, store / name, seed=60 + i) for i, name in enumerate(["sa", "sb", "sc"])}
    oracle = {(m, tuple(p)): reference_greedy(tiny_base, adapters.get(m), p, n=MAX_N) for m in ["sa", "sb", "sc", "tiny"] for p in PROMPTS}
    rng = random.Random(7)
    plan = []
    for i in range(REQUESTS):
        model = rng.choice(["sa", "sb", "sc", "tiny"])
        plan.append(dict(id=i, model=model, prompt=rng.choice(PROMPTS), n=rng.randint(4, MAX_N), stream=rng.random() < 0.6,
                         disconnect_after=rng.choice([None, None, None, 1, 2])))

    with ServerProcess(tiny_base, store, "--max-batch-size", "6", "--max-queue", "64") as srv:
        warm = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 2}, timeout=60)
        assert warm.status_code == 200
        for name in adapters:  # make them resident before measuring memory
            httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": name}, timeout=60).raise_for_status()
        before_rss = _rss_kib(srv.proc.pid)
        before = _samples(srv.url)
        results: dict[int, dict] = {}

        async def client_loop(queue, client):
            while not queue.empty():
                item = queue.get_nowait()
                body = {"model": item["model"], "prompt": item["prompt"], "max_tokens": item["n"], "temperature": 0, "ignore_eos": True}
                if not item["stream"]:
                    reply = await client.post(srv.url + "/v1/completions", json=body)
                    results[item["id"]] = {"status": reply.status_code, "text": reply.json()["choices"][0]["text"], "complete": True}
                    continue
                text, chunks, complete = [], 0, False
                async with client.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as resp:
                    async for line in resp.aiter_lines():
                        if line == "data: [DONE]":
                            complete = True
                            break
                        if not line.startswith("data: "):
                            continue
                        chunks += 1
                        text.append(json.loads(line[6:])["choices"][0]["text"])
                        if item["disconnect_after"] and chunks >= item["disconnect_after"]:
                            break  # leaving the block closes the connection mid-stream
                results[item["id"]] = {"status": resp.status_code, "text": "".join(text), "complete": complete}

        async def run():
            queue: asyncio.Queue = asyncio.Queue()
            for item in plan:
                queue.put_nowait(item)
            async with httpx.AsyncClient(timeout=120) as client:
                await asyncio.wait_for(asyncio.gather(*(client_loop(queue, client) for _ in range(CLIENTS))), timeout=60 + 2 * REQUESTS)

        asyncio.run(run())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = _samples(srv.url)
            if now[("loraplex_num_requests_running", ())] == 0 and now[("loraplex_num_requests_waiting", ())] == 0:
                break
            time.sleep(0.1)
        after = _samples(srv.url)
        after_rss = _rss_kib(srv.proc.pid)
        consistency = httpx.get(srv.url + "/v1/admin/consistency", timeout=60).json()  # registry vs engine

    assert after[("loraplex_num_requests_running", ())] == 0 and after[("loraplex_num_requests_waiting", ())] == 0
    assert after_rss - before_rss < 300 * 1024, (before_rss, after_rss)
    assert consistency["consistent"] and consistency["pinned"] == {}, consistency
    assert len(results) == REQUESTS and all(r["status"] == 200 for r in results.values())
    completed = 0
    for item in plan:
        result = results[item["id"]]
        if result["complete"]:
            completed += 1
            expected = tokenizer.decode(oracle[(item["model"], tuple(item["prompt"]))][: item["n"]], skip_special_tokens=True)
            assert result["text"] == expected, item
    assert completed >= REQUESTS // 2
    print(f"soak: {REQUESTS} requests from {CLIENTS} clients, {completed} completed and checked against the oracle, "
          f"{REQUESTS - completed} disconnected mid-stream, RSS {before_rss} -> {after_rss} KiB")

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    sent = Counter(item["model"] for item in plan)
    prompt_tokens = Counter()
    for item in plan:
        prompt_tokens[item["model"]] += len(item["prompt"])
    disconnected = Counter(item["model"] for item in plan if not results[item["id"]]["complete"])
    for model in sent:
        finished = {status: delta("loraplex_requests_total", adapter=model, status=status) for status in ("length", "cancelled", "stop", "error")}
        assert sum(finished.values()) == sent[model], (model, finished)
        assert finished["error"] == 0 and finished["cancelled"] <= disconnected[model]
        assert delta("loraplex_prompt_tokens_total", adapter=model) == prompt_tokens[model]
        full = sum(item["n"] for item in plan if item["model"] == model and results[item["id"]]["complete"])
        assert delta("loraplex_generation_tokens_total", adapter=model) >= full
