"""`loraplex serve` as a real subprocess on a loopback socket, tiny random Llama base, random
adapters. Correctness is checked against peft's PeftModel with the single adapter (tests/oracle.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest

from loraplex.server.store import AdapterManifest, sha256_file, write_manifest
from tests.integration.server_harness import LONG_ARGS, LONG_TOKENS, ServerProcess, concurrent_completions, text_of
from tests.integration.server_harness import complete as harness_complete
from tests.oracle import cached_oracle, make_random_adapter

N = 16
PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404], [1, 77], [1, 5000, 6000, 7000], [1, 12, 13], [1, 2000, 2001], [1, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def pool(tiny_base, tmp_path_factory):
    """Random adapters kept outside the store; tests copy what they need into a store."""
    root = tmp_path_factory.mktemp("adapter-pool")
    return {name: make_random_adapter(tiny_base, root / name, seed=i + 1, r=[4, 8, 2, 4, 4][i]) for i, name in enumerate(["a", "b", "c", "d", "e"])}


@pytest.fixture(scope="module")
def oracle(tiny_base, pool):
    return cached_oracle(tiny_base, pool, N)


def _store(tmp_path_factory, pool, names, label="store"):
    root = tmp_path_factory.mktemp(label) / "adapters"
    root.mkdir()
    for name in names:
        shutil.copytree(pool[name], root / name)
    return root


@pytest.fixture(scope="module")
def server(tiny_base, pool, tmp_path_factory):
    store = _store(tmp_path_factory, pool, ["a", "b", "c"])
    with ServerProcess(tiny_base, store, "--max-lora-rank", "8", "--max-model-len", "256", "--preload", "a") as srv:
        srv.store = store
        yield srv


def complete(srv, model, prompt, n=N, **extra):
    return harness_complete(srv, model, prompt, n, **extra)


# --------------------------------------------------------------------------- correctness
def test_isolation_oracle_concurrent_mixed_adapters(server, oracle, tokenizer):
    plan = [(["a", "b", "c", None][i % 4], PROMPTS[i]) for i in range(8)]

    results = concurrent_completions(server, plan, N)
    for (adapter, prompt), reply in zip(plan, results):
        expected = text_of(tokenizer, oracle(adapter, prompt))
        assert reply["choices"][0]["text"] == expected, (adapter, prompt)
        alone = complete(server, adapter or "tiny", prompt).json()["choices"][0]["text"]
        assert alone == expected
        assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": N, "total_tokens": len(prompt) + N}
    assert len({r["choices"][0]["text"] for r in results[:4]}) == 4  # adapters really differ


def test_continuous_batching_short_request_finishes_first(server):
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            long_body = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
            order = []
            started = asyncio.Event()

            async def long_request():
                async with client.stream("POST", server.url + "/v1/completions", json=long_body) as resp:
                    async for line in resp.aiter_lines():
                        started.set()
                        if line == "data: [DONE]":
                            order.append("long")

            task = asyncio.create_task(long_request())
            await asyncio.wait_for(started.wait(), 60)  # the long request is decoding
            short = await client.post(server.url + "/v1/completions", json={"model": "c", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0})
            order.append("short")
            await task
            return order, short

    order, short = asyncio.run(run())
    assert short.status_code == 200 and order == ["short", "long"]
    metrics = httpx.get(server.url + "/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    buckets = {s.labels["le"]: s.value for f in text_string_to_metric_families(metrics) if f.name == "loraplex_batch_size" for s in f.samples if s.name.endswith("_bucket")}
    assert buckets["+Inf"] > buckets["1.0"], buckets  # some decode steps ran 2+ sequences at once


def test_openai_client_chat_completions_and_streaming(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    models = {m.id for m in client.models.list()}
    assert {"tiny", "a", "b", "c"} <= models
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    completion = client.completions.create(model="b", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert completion.usage.prompt_tokens > 0 and completion.choices[0].finish_reason in ("stop", "length")


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={"model": "c", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "temperature": 0, "stream": True}, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_seed_is_reproducible_and_stop_strings_cut(server, tokenizer, oracle):
    body = dict(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    one = complete(server, "a", PROMPTS[2], **body).json()["choices"][0]["text"]
    two = complete(server, "a", PROMPTS[2], **body).json()["choices"][0]["text"]
    assert one == two
    full = text_of(tokenizer, oracle("b", PROMPTS[3]))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip()
    reply = complete(server, "b", PROMPTS[3], stop=[stop]).json()
    assert reply["choices"][0]["text"] == full[: full.index(stop)] and reply["choices"][0]["finish_reason"] == "stop"


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "body, status, param, fragment",
    [
        ({"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
        ({"model": "a", "prompt": ""}, 400, "prompt", "prompt is empty"),
        ({"model": "a", "prompt": "x", "max_tokens": 300}, 400, "max_tokens", "prompt has 1 tokens and max_tokens is 300: 301 > --max-model-len 256"),
        ({"model": "a", "prompt": "x", "temperature": 5}, 400, "temperature", "temperature must be in [0, 2], got 5.0"),
        ({"model": "a", "prompt": "x", "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
        ({"model": "a", "prompt": "x", "n": 99}, 400, "n", "n must be <= 8, got 99"),
        ({"model": "a", "prompt": [1, 10**9]}, 400, "prompt", "outside the vocabulary"),
        ({"model": "a"}, 400, "prompt", "Field required"),
        ({"model": "a", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "valid integer"),
    ],
)
def test_invalid_requests_get_openai_errors(server, body, status, param, fragment):
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_is_400_not_500(server):
    reply = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def _refusal_cases(tmp_path, pool, fingerprint):
    """name -> (folder builder, expected message fragment)."""
    def copy(name, src="a"):
        shutil.copytree(pool[src], tmp_path / name)
        return tmp_path / name

    def wrong_base(folder):
        write_manifest(folder, AdapterManifest(name=folder.name, base_model_id="other", base_fingerprint="0" * 24, rank=4, alpha=16, target_modules=("q_proj",), weights_sha256=sha256_file(folder / "adapter_model.safetensors")))

    def edit_config(folder, **changes):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))

    def pickled(folder):
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(b"not even a pickle")

    def missing_module(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file({k.replace("layers.0.", "layers.9."): v for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))

    return {
        "wrongbase": (lambda: (lambda f: (wrong_base(f), f)[1])(copy("wrongbase")), "trained on base fingerprint 000000000000000000000000"),
        "toobig": (lambda: copy("toobig", "b") and None or tmp_path / "toobig", None),  # rank 8 == limit: accepted
        "dora": (lambda: (lambda f: (edit_config(f, use_dora=True), f)[1])(copy("dora")), "use_dora=true"),
        "mts": (lambda: (lambda f: (edit_config(f, modules_to_save=["lm_head"]), f)[1])(copy("mts")), "modules_to_save"),
        "pickled": (lambda: (lambda f: (pickled(f), f)[1])(copy("pickled")), "pickled weights are refused"),
        "nomodule": (lambda: (lambda f: (missing_module(f), f)[1])(copy("nomodule")), "does not exist in the base"),
    }


def test_refused_adapters_leave_others_serving(server, pool, oracle, tokenizer):
    cases = _refusal_cases(server.store, pool, None)
    for name, (build, fragment) in cases.items():
        build()
        reply = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name}, timeout=60)
        if fragment is None:
            assert reply.status_code == 200, reply.text
            continue
        assert reply.status_code == 400, (name, reply.text)
        assert fragment in reply.json()["error"]["message"], (name, reply.text)
        # a request naming the refused adapter gets the same clear refusal, not base output
        refused = complete(server, name, PROMPTS[0])
        assert refused.status_code == 400 and fragment in refused.json()["error"]["message"]
        state = httpx.get(server.url + f"/v1/adapters/{name}").json()
        assert state["state"] == "failed" and fragment in state["last_error"]
    assert complete(server, "a", PROMPTS[0]).json()["choices"][0]["text"] == text_of(tokenizer, oracle("a", PROMPTS[0]))


def test_rank_above_limit_and_bad_names_and_paths(server, pool, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(pool["b"], big)
    config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    shutil.copytree(big, server.store / "bigrank")
    reply = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "bigrank"})
    assert reply.status_code == 400 and "rank 16, above --max-lora-rank 8" in reply.json()["error"]["message"]
    cases = [
        ({"lora_name": "bad/name"}, "is invalid"),
        ({"lora_name": "x" * 65}, "the limit is 64"),
        ({"lora_name": "ext", "lora_path": str(pool["a"])}, "outside the adapters dir"),
        ({"lora_name": "up", "lora_path": "../a"}, "contains '..'"),
    ]
    for body, fragment in cases:
        reply = httpx.post(server.url + "/v1/load_lora_adapter", json=body)
        assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], (body, reply.text)
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "never"}).status_code == 404


# --------------------------------------------------------------------- adapters at runtime
def test_hot_load_and_unload_while_serving(server, pool, oracle, tokenizer):
    shutil.copytree(pool["d"], server.store / "d")
    n = 200

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "a", "prompt": PROMPTS[4], "max_tokens": n, "temperature": 0, "ignore_eos": True}
            running = asyncio.create_task(client.post(server.url + "/v1/completions", json=body))
            deadline = time.monotonic() + 30
            while (await client.get(server.url + "/v1/adapters/a")).json()["running_requests"] == 0:
                assert time.monotonic() < deadline, "the long request never started"
                await asyncio.sleep(0.02)
            load = await client.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "d"})
            unload = await client.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a"})
            return await running, load, unload

    reply, load, unload = asyncio.run(run())
    assert load.status_code == 200 and load.json()["adapter"]["state"] == "resident"
    assert unload.status_code == 200 and unload.json()["status"] == "unloading"  # a is busy: it leaves when done
    assert reply.json()["choices"][0]["text"] == text_of(tokenizer, oracle("a", PROMPTS[4], n=n))
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/v1/adapters/a").json()["state"] != "available" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/v1/adapters/a").json()["state"] == "available"
    assert complete(server, "d", PROMPTS[1]).json()["choices"][0]["text"] == text_of(tokenizer, oracle("d", PROMPTS[1]))
    # on-demand load brings "a" back
    assert complete(server, "a", PROMPTS[1]).json()["choices"][0]["text"] == text_of(tokenizer, oracle("a", PROMPTS[1]))


def test_disconnect_cancels_the_request(server):
    def cancelled_count():
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            if family.name == "loraplex_requests":
                return sum(s.value for s in family.samples if s.name == "loraplex_requests_total" and s.labels.get("status") == "cancelled" and s.labels.get("adapter") == "c")
        return 0

    before = cancelled_count()
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "c", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}, timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 2:
                break
    deadline = time.monotonic() + 15
    while cancelled_count() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_count() == before + 1
    assert httpx.get(server.url + "/v1/adapters/c").json()["running_requests"] == 0


def test_metrics_parse_and_count_per_adapter(server):
    from prometheus_client.parser import text_string_to_metric_families

    def counts():
        out = {}
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            if family.name == "loraplex_requests":
                for s in family.samples:
                    if s.name == "loraplex_requests_total":
                        out[s.labels["adapter"]] = out.get(s.labels["adapter"], 0) + s.value
        return out

    before = counts()
    for adapter, times in (("b", 3), ("c", 2), ("tiny", 1)):
        for _ in range(times):
            assert complete(server, adapter, PROMPTS[1], n=2).status_code == 200
    after = counts()
    assert {k: after.get(k, 0) - before.get(k, 0) for k in ("b", "c", "tiny")} == {"b": 3, "c": 2, "tiny": 1}
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info",
                 "loraplex_time_to_first_token_seconds", "loraplex_inter_token_latency_seconds", "loraplex_e2e_request_latency_seconds",
                 "loraplex_adapters_resident", "loraplex_adapter_load_seconds", "loraplex_prompt_tokens", "loraplex_generation_tokens"):
        assert name in families, name
    info = families["vllm:lora_requests_info"].samples[0]
    assert info.labels["max_lora"] == "64" and set(info.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


def test_health_ready_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and len(ready["fingerprint"]) == 24
    models = httpx.get(server.url + "/v1/models").json()["data"]
    base = models[0]
    assert base["id"] == "tiny" and base["parent"] is None
    assert all(m["parent"] == "tiny" for m in models[1:])


# ------------------------------------------------------------------ dedicated servers
def test_lru_eviction_with_max_loras_2(tiny_base, pool, tmp_path_factory, oracle, tokenizer):
    store = _store(tmp_path_factory, pool, ["a", "b", "c", "d"], "evict")
    with ServerProcess(tiny_base, store, "--max-loras", "2") as srv:
        for rotation in range(2):
            for name in ["a", "b", "c", "d"]:
                text = complete(srv, name, PROMPTS[5], n=6).json()["choices"][0]["text"]
                assert text == text_of(tokenizer, oracle(name, PROMPTS[5], n=6)), (rotation, name)
                resident = [a["name"] for a in httpx.get(srv.url + "/v1/adapters").json()["data"] if a["state"] == "resident"]
                assert len(resident) <= 2 and name in resident
        metrics = httpx.get(srv.url + "/metrics").text
        evictions = [line for line in metrics.splitlines() if line.startswith("loraplex_adapter_evictions_total")]
        assert evictions and float(evictions[0].split()[-1]) >= 6


def test_queue_full_gets_429(tiny_base, pool, tmp_path_factory):
    store = _store(tmp_path_factory, pool, ["a"], "queue")
    with ServerProcess(tiny_base, store, "--max-batch-size", "1", "--max-queue", "1", *LONG_ARGS) as srv:
        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": LONG_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
                short = {"model": "a", "prompt": PROMPTS[1], "max_tokens": 5}
                async with client.stream("POST", srv.url + "/v1/completions", json=body) as running:
                    lines = running.aiter_lines()  # keep a reference: a collected iterator closes the stream
                    await lines.__anext__()  # streaming: the only batch row is taken
                    waiting = asyncio.create_task(client.post(srv.url + "/v1/completions", json=short))
                    deadline = time.monotonic() + 30
                    while "loraplex_num_requests_waiting 1.0" not in (await client.get(srv.url + "/metrics")).text:
                        assert time.monotonic() < deadline, "the second request never queued"
                        await asyncio.sleep(0.05)
                    third = await client.post(srv.url + "/v1/completions", json=short)
                # leaving the block disconnects the long stream: its row frees and the waiting one runs
                return third, (await waiting).status_code

        third, waiting_status = asyncio.run(run())
        assert third.status_code == 429 and third.headers["retry-after"]
        assert "queue full" in third.json()["error"]["message"] and "--max-queue 1" in third.json()["error"]["message"]
        assert waiting_status == 200


def test_a_streaming_client_that_leaves_while_queued_frees_its_place(tiny_base, pool, tmp_path_factory):
    """Disconnect before the first token (still waiting for a batch row): the request leaves the
    queue at once, while the request holding the only row goes on (before the fix it stayed
    queued until that row freed)."""
    store = _store(tmp_path_factory, pool, ["a", "b"], "queued-disconnect")
    with ServerProcess(tiny_base, store, "--max-batch-size", "1", "--max-model-len", "8192") as srv:
        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                async def metrics():
                    return (await client.get(srv.url + "/metrics")).text

                body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 8000, "temperature": 0, "ignore_eos": True, "stream": True}
                async with client.stream("POST", srv.url + "/v1/completions", json=body) as running:
                    lines = running.aiter_lines()
                    await lines.__anext__()  # "a" holds the only batch row for thousands of tokens

                    async def queued():
                        async with httpx.AsyncClient(timeout=120) as other:
                            async with other.stream("POST", srv.url + "/v1/completions", json={**body, "model": "b"}) as reply:
                                async for _ in reply.aiter_lines():
                                    pass

                    waiter = asyncio.create_task(queued())
                    deadline = time.monotonic() + 30
                    while "loraplex_num_requests_waiting 1.0" not in await metrics():
                        assert time.monotonic() < deadline, "the second request never queued"
                        await asyncio.sleep(0.05)
                    waiter.cancel()  # the queued client goes away before its first token
                    await asyncio.gather(waiter, return_exceptions=True)
                    deadline = time.monotonic() + 5
                    while "loraplex_num_requests_waiting 0.0" not in await metrics():
                        assert time.monotonic() < deadline, "the disconnected request stayed queued"
                        await asyncio.sleep(0.1)
                    a_info = (await client.get(srv.url + "/v1/adapters/a")).json()
                    return a_info, await metrics()

        a_info, text = asyncio.run(run())
        assert a_info["running_requests"] == 1  # the long request still holds its row: it did not free the queue
        assert 'loraplex_requests_total{adapter="b",status="cancelled"} 1.0' in text


def test_watch_picks_up_an_adapter_published_by_train_adapter(tiny_base, tmp_path_factory, label_data):
    store = tmp_path_factory.mktemp("watch") / "adapters"
    store.mkdir()
    with ServerProcess(tiny_base, store, "--watch", "--watch-interval", "0.3") as srv:
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == ["tiny"]
        from loraplex.training.cli import main

        assert main(["--model_name_or_path", str(tiny_base), "--data_files", str(label_data), "--output_path", str(store / "fresh"), "--max_steps", "2", "--lora_r", "4"]) == 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = {a["name"]: a["state"] for a in httpx.get(srv.url + "/v1/adapters").json()["data"]}
            if "fresh" in states:
                break
            time.sleep(0.2)
        assert "fresh" in states
        reply = complete(srv, "fresh", [1, 2000], n=4)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(srv.url + "/v1/adapters/fresh").json()["base_fingerprint"] == httpx.get(srv.url + "/ready").json()["fingerprint"]
