"""`loraplex serve --backend onnx` end to end: a real server process on loopback serving a fp32
ONNX export of a tiny random Llama, over HTTP and a real gRPC channel. Outputs are checked
against peft's PeftModel with the single adapter (tests/oracle.py), for adapters exported with
the model, an adapter published into the store later (converted from peft format on load) and
the bare base; plus hot load/unload while serving, refusals that leave others serving, and
per-adapter metrics. Every test runs against both batching modes: mixed-adapter batches in one
onnxruntime forward (model.stacked.onnx) and one onnxruntime-genai Generator per request."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import httpx
import pytest

from loraplex.server.cli import main as loraplex_main
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.server_harness import ServerProcess, concurrent_completions, text_of
from tests.integration.server_harness import complete as harness_complete
from tests.oracle import cached_oracle, make_random_adapter

N = 12
PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404], [1, 77], [1, 5000, 6000, 7000], [1, 12, 13]]


@pytest.fixture(scope="module")
def pool(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-serve-pool")
    return {
        "x1": make_random_adapter(tiny_base, root / "x1", seed=41, r=4),
        "x2": make_random_adapter(tiny_base, root / "x2", seed=42, r=2, targets=("q_proj", "v_proj", "down_proj")),
        "late": make_random_adapter(tiny_base, root / "late", seed=43, r=8),
        "big": make_random_adapter(tiny_base, root / "big", seed=44, r=16),
    }


@pytest.fixture(scope="module")
def oracle(tiny_base, pool):
    return cached_oracle(tiny_base, pool, N)


@pytest.fixture(scope="module", params=["mixed", "per-request"])
def server(request, tiny_base, pool, tmp_path_factory):
    work = tmp_path_factory.mktemp("onnx-serve")
    model = work / "models" / "multi-adapter"
    code = loraplex_main(["export-onnx", "--base", str(tiny_base), "--adapter_paths", f"{pool['x1']},{pool['x2']}",
                          "--output_path", str(model), "--precision", "fp32"])
    assert code == 0
    store = work / "adapters"  # the exported adapters are NOT in the store: they come with the model
    store.mkdir()
    shutil.copytree(pool["big"], store / "big")
    with ServerProcess(tiny_base, store, "--backend", "onnx", "--model", str(model), "--onnx-batching", request.param,
                       "--max-lora-rank", "8", "--max-model-len", "256") as srv:
        srv.store, srv.model = store, model
        yield srv


def complete(srv, model, prompt, n=N, **extra):
    return harness_complete(srv, model, prompt, n, **extra)


def test_models_list_the_exported_adapters(server):
    ids = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {"tiny", "x1", "x2", "big"} <= set(ids)
    assert ids["x1"]["root"].endswith("x1.onnx_adapter")


def test_concurrent_mixed_requests_match_peft(server, oracle, tokenizer):
    plan = [(["x1", "x2", None][i % 3], PROMPTS[i]) for i in range(6)]

    results = concurrent_completions(server, plan, N)
    for (adapter, prompt), reply in zip(plan, results):
        assert reply["choices"][0]["text"] == text_of(tokenizer, oracle(adapter, prompt)), (adapter, prompt)
        assert reply["usage"]["completion_tokens"] == N
    assert len({r["choices"][0]["text"] for r in results[:3]}) == 3


def test_grpc_matches_http_and_peft(server, oracle):
    async def run():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            sampling = pb.SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
            unary = await stub.Generate(pb.GenerateRequest(adapter="x2", prompt_token_ids=PROMPTS[2], sampling=sampling))
            streamed = [t async for m in stub.GenerateStream(pb.GenerateRequest(adapter="x1", prompt_token_ids=PROMPTS[3], sampling=sampling)) for t in m.token_ids]
            return list(unary.token_ids), streamed

    unary, streamed = asyncio.run(run())
    assert unary == oracle("x2", PROMPTS[2])
    assert streamed == oracle("x1", PROMPTS[3])


def test_adapter_published_later_is_converted_on_load(server, pool, oracle, tokenizer):
    shutil.copytree(pool["late"], server.store / "late")
    reply = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "late"}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert complete(server, "late", PROMPTS[0]).json()["choices"][0]["text"] == text_of(tokenizer, oracle("late", PROMPTS[0]))
    info = httpx.get(server.url + "/v1/adapters/late").json()
    assert info["state"] == "resident" and info["rank"] == 8


def test_refused_adapter_leaves_others_serving(server, oracle, tokenizer):
    reply = complete(server, "big", PROMPTS[1])
    assert reply.status_code == 400
    assert "rank 16, above --max-lora-rank 8" in reply.json()["error"]["message"]
    assert complete(server, "x1", PROMPTS[1]).json()["choices"][0]["text"] == text_of(tokenizer, oracle("x1", PROMPTS[1]))


def test_unload_while_in_use_waits_for_the_request(server, oracle, tokenizer):
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "x2", "prompt": PROMPTS[4], "max_tokens": 60, "temperature": 0, "ignore_eos": True}
            running = asyncio.create_task(client.post(server.url + "/v1/completions", json=body))
            await asyncio.sleep(0.3)
            unload = await client.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "x2"})
            return await running, unload

    reply, unload = asyncio.run(run())
    assert unload.status_code == 200 and unload.json()["status"] in ("unloading", "unloaded")
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["text"] == text_of(tokenizer, oracle("x2", PROMPTS[4], n=60))
    assert httpx.get(server.url + "/v1/adapters/x2").json()["state"] == "available"
    # and it comes back from its exported file on the next request
    assert complete(server, "x2", PROMPTS[5]).json()["choices"][0]["text"] == text_of(tokenizer, oracle("x2", PROMPTS[5]))


def test_metrics_count_per_adapter(server):
    from prometheus_client.parser import text_string_to_metric_families

    complete(server, "x1", PROMPTS[0], n=3)
    text = httpx.get(server.url + "/metrics").text
    def total(name, **labels):
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert total("loraplex_requests_total", adapter="x1", status="length") >= 1  # status = finish reason
    assert total("loraplex_generation_tokens_total", adapter="x1") >= 3
    assert total("loraplex_adapter_load_failures_total", adapter="big") >= 1


def test_onnx_backend_needs_a_model_folder(tmp_path, capsys):
    assert loraplex_main(["serve", "--backend", "onnx"]) == 2
    assert "--backend onnx needs --model" in capsys.readouterr().err


def test_int4_export_shows_each_adapters_replayed_agreement_in_v1_adapters(tiny_base, pool, tmp_path):
    """On an int4 export, an adapter taken from the store has its training report's stored answers
    replayed on the export when it is converted: ``/v1/adapters`` shows the number and a low one
    is logged as a warning; an adapter without stored answers shows null. The stored answers here
    are words the random tiny model never answers, so none may be reproduced."""
    import json

    model = tmp_path / "models" / "int4"
    assert loraplex_main(["export-onnx", "--base", str(tiny_base), "--output_path", str(model), "--precision", "int4"]) == 0
    store = tmp_path / "adapters"
    store.mkdir()
    shutil.copytree(pool["x1"], store / "told")
    shutil.copytree(pool["x2"], store / "silent")
    samples = [{"prompt": f"question {i}", "reference": "yes", "prediction": f"answer number {i} is a long sentence"} for i in range(3)]
    (store / "told" / "training_report.json").write_text(json.dumps({"eval_samples": samples}))
    with ServerProcess(tiny_base, store, "--backend", "onnx", "--model", str(model), "--max-lora-rank", "8", "--max-model-len", "256") as srv:
        for name in ("told", "silent"):
            reply = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": name}, timeout=120)
            assert reply.status_code == 200, reply.text
        listed = {a["name"]: a for a in httpx.get(srv.url + "/v1/adapters").json()["data"]}
        assert listed["told"]["export_agreement"] == {"agreement": 0.0, "samples": 3, "reproduced": 0, "threshold": 0.9, "precision": "int4"}
        assert listed["silent"]["export_agreement"] is None
        assert httpx.get(srv.url + "/v1/adapters/told").json()["export_agreement"]["samples"] == 3
        assert "adapter told reproduces 0 of 3 held-out answers from its training report on this int4 export" in srv.log()
