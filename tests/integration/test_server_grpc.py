"""The gRPC front over a real grpc.aio channel to `loraplex serve` on a loopback port: same
outputs as HTTP and as the peft oracle, streaming, cancellation, deadlines, every error mapping,
health through start-up, reflection."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.server_harness import LONG_ARGS, LONG_TOKENS, ServerProcess
from tests.oracle import make_random_adapter, reference_greedy

PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404], [1, 77]]
N = 12


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-pool")
    return {name: make_random_adapter(tiny_base, root / name, seed=i + 21) for i, name in enumerate(["ga", "gb"])}


@pytest.fixture(scope="module")
def server(tiny_base, adapters, tmp_path_factory):
    store = tmp_path_factory.mktemp("grpc-store") / "adapters"
    store.mkdir()
    for name, path in adapters.items():
        shutil.copytree(path, store / name)
    # the names the README's grpcurl examples use
    shutil.copytree(adapters["ga"], store / "datefmt")
    shutil.copytree(adapters["gb"], store / "sentiment")
    dora = store / "gdora"
    shutil.copytree(adapters["ga"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with ServerProcess(tiny_base, store, *LONG_ARGS) as srv:
        yield srv


def _sampling(**kw):
    return pb.SamplingParams(max_tokens=kw.get("max_tokens", N), temperature=0.0, ignore_eos=True)


def _metric(srv, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_unary_and_stream_match_http_and_the_oracle(server, tiny_base, adapters, smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            results = []
            for adapter, prompt in (("ga", PROMPTS[0]), ("gb", PROMPTS[1]), ("", PROMPTS[2])):
                unary = await stub.Generate(pb.GenerateRequest(adapter=adapter, prompt_token_ids=prompt, sampling=_sampling(), request_id=f"r-{adapter}"))
                streamed = [m async for m in stub.GenerateStream(pb.GenerateRequest(adapter=adapter, prompt_token_ids=prompt, sampling=_sampling()))]
                results.append((adapter, prompt, unary, streamed))
            return results

    for adapter, prompt, unary, streamed in asyncio.run(run()):
        expected = reference_greedy(tiny_base, adapters.get(adapter), prompt, n=N)
        assert list(unary.token_ids) == expected
        assert unary.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert unary.finish_reason == pb.FINISH_REASON_LENGTH and unary.usage.completion_tokens == N
        assert unary.request_id == f"r-{adapter}"
        assert [t for m in streamed for t in m.token_ids] == expected and "".join(m.text for m in streamed) == unary.text
        assert streamed[-1].finish_reason == pb.FINISH_REASON_LENGTH and streamed[-1].usage.prompt_tokens == len(prompt)
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in streamed[:-1])
        http = httpx.post(server.url + "/v1/completions", json={"model": adapter or "tiny", "prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True}, timeout=60).json()
        assert http["choices"][0]["text"] == unary.text


def test_chat_matches_http_chat(server):
    messages = [{"role": "user", "content": "Say something"}]

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.ChatRequest(adapter="gb", messages=[pb.ChatMessage(**m) for m in messages], sampling=pb.SamplingParams(max_tokens=8, temperature=0.0))
            return await stub.Chat(request), [m async for m in stub.ChatStream(request)]

    unary, streamed = asyncio.run(run())
    http = httpx.post(server.url + "/v1/chat/completions", json={"model": "gb", "messages": messages, "max_tokens": 8, "temperature": 0}, timeout=60).json()
    assert unary.text == http["choices"][0]["message"]["content"] == "".join(m.text for m in streamed)
    assert unary.usage.prompt_tokens == http["usage"]["prompt_tokens"]


def test_concurrent_mixed_streams_stay_isolated(server, tiny_base, adapters):
    plan = [("ga", PROMPTS[0]), ("gb", PROMPTS[1]), ("", PROMPTS[2]), ("gb", PROMPTS[3]), ("ga", PROMPTS[2]), ("", PROMPTS[0])]

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.InferenceStub(channel)

            async def one(adapter, prompt):
                return [t async for m in stub.GenerateStream(pb.GenerateRequest(adapter=adapter, prompt_token_ids=prompt, sampling=_sampling())) for t in m.token_ids]

            return await asyncio.gather(*(one(a, p) for a, p in plan))

    for (adapter, prompt), tokens in zip(plan, asyncio.run(run())):
        assert tokens == reference_greedy(tiny_base, adapters.get(adapter), prompt, n=N), adapter


def test_cancellation_and_deadline_free_the_slot(server):
    before = _metric(server, "loraplex_requests_total", adapter="ga", status="cancelled")

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            call = stub.GenerateStream(pb.GenerateRequest(adapter="ga", prompt_token_ids=PROMPTS[0], sampling=_sampling(max_tokens=LONG_TOKENS)))
            seen = 0
            async for _ in call:
                seen += 1
                if seen == 3:
                    call.cancel()
                    break
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(pb.GenerateRequest(adapter="ga", prompt_token_ids=PROMPTS[1], sampling=_sampling(max_tokens=LONG_TOKENS)), timeout=0.5)
            return info.value.code()

    assert asyncio.run(run()) == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 15
    while _metric(server, "loraplex_requests_total", adapter="ga", status="cancelled") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "loraplex_requests_total", adapter="ga", status="cancelled") == before + 2
    assert _metric(server, "loraplex_num_requests_running") == 0


@pytest.mark.parametrize(
    "request_, code, fragment",
    [
        (pb.GenerateRequest(adapter="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (pb.GenerateRequest(adapter="ga", prompt="x", sampling=pb.SamplingParams(temperature=5)), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be in [0, 2], got 5.0 (field: temperature)"),
        (pb.GenerateRequest(adapter="ga", prompt="x", sampling=pb.SamplingParams(max_tokens=40000)), grpc.StatusCode.INVALID_ARGUMENT, "> --max-model-len 32768 (field: max_tokens)"),
        (pb.GenerateRequest(adapter="ga", prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (pb.GenerateRequest(adapter="ga", prompt="x", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (pb.GenerateRequest(adapter="gdora", prompt="x"), grpc.StatusCode.FAILED_PRECONDITION, "use_dora=true"),
    ],
)
def test_error_mapping(server, request_, code, fragment):
    async def run():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.InferenceStub(channel).Generate(request_)
            return info.value

    error = asyncio.run(run())
    assert error.code() == code and fragment in error.details(), error.details()


def test_admin_rpcs_and_oversized_message(server):
    async def run():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            listing = await stub.ListAdapters(pb.ListAdaptersRequest())
            loaded = await stub.LoadAdapter(pb.LoadAdapterRequest(name="gb"))
            got = await stub.GetAdapter(pb.GetAdapterRequest(name="gb"))
            unloaded = await stub.UnloadAdapter(pb.UnloadAdapterRequest(name="gb"))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetAdapter(pb.GetAdapterRequest(name="zzz"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.LoadAdapter(pb.LoadAdapterRequest(name="bad/name"))
            with pytest.raises(grpc.aio.AioRpcError) as big:
                await stub.Generate(pb.GenerateRequest(adapter="ga", prompt="x" * (5 * 1024 * 1024)))
            return listing, loaded, got, unloaded, missing.value, refused.value, big.value

    listing, loaded, got, unloaded, missing, refused, big = asyncio.run(run())
    assert {"ga", "gb", "gdora"} <= {a.name for a in listing.adapters}
    assert loaded.state == "resident" and loaded.rank == 4 and len(loaded.sha256) == 64
    assert got.name == "gb" and "q_proj" in got.target_modules
    assert unloaded.status == "unloaded" and unloaded.adapter.state == "available"
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "is invalid" in refused.details()
    assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.grpc_address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"loraplex.v1.Inference", "grpc.health.v1.Health"} <= services


def test_queue_full_is_resource_exhausted(tiny_base, adapters, tmp_path):
    store = tmp_path / "adapters"
    store.mkdir()
    shutil.copytree(adapters["ga"], store / "ga")
    with ServerProcess(tiny_base, store, "--max-batch-size", "1", "--max-queue", "0", *LONG_ARGS) as srv:
        async def run():
            async with grpc.aio.insecure_channel(srv.grpc_address) as channel:
                stub = pb_grpc.InferenceStub(channel)
                long_call = stub.GenerateStream(pb.GenerateRequest(adapter="ga", prompt_token_ids=PROMPTS[0], sampling=_sampling(max_tokens=LONG_TOKENS)))
                await long_call.read()  # first token: the only batch row is now taken
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Generate(pb.GenerateRequest(adapter="ga", prompt_token_ids=PROMPTS[1], sampling=_sampling()))
                long_call.cancel()
                return info.value

        error = asyncio.run(run())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in error.details()


def test_health_not_serving_while_loading_then_serving(tiny_base, tmp_path):
    store = tmp_path / "adapters"
    store.mkdir()
    srv = ServerProcess(tiny_base, store, env={"LORAPLEX_TEST_STARTUP_DELAY": "3"})
    srv.proc = None
    import subprocess

    log = open(srv.log_path, "w")
    srv.proc = subprocess.Popen(srv.args, stdout=log, stderr=subprocess.STDOUT, env=srv.env)
    seen, unavailable, http_while_loading = [], None, None
    try:
        with grpc.insecure_channel(srv.grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.InferenceStub(channel)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service="loraplex.v1.Inference"), timeout=1).status
                except grpc.RpcError:
                    time.sleep(0.1)
                    continue
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                if not seen or seen[-1] != name:
                    seen.append(name)
                if name == "NOT_SERVING" and unavailable is None:
                    try:
                        stub.Generate(pb.GenerateRequest(adapter="", prompt="x"), timeout=5)
                    except grpc.RpcError as exc:
                        unavailable = exc.code()
                    # the HTTP front agrees while loading: alive, not ready, requests refused with 503
                    http_while_loading = (
                        httpx.get(srv.url + "/health").status_code,
                        httpx.get(srv.url + "/ready").status_code,
                        httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code,
                    )
                if name == "SERVING":
                    break
                time.sleep(0.05)
    finally:
        srv.stop()
        log.close()
    assert seen == ["NOT_SERVING", "SERVING"], seen
    assert unavailable == grpc.StatusCode.UNAVAILABLE
    assert http_while_loading == (200, 503, 503)


def test_readme_grpcurl_examples_work_as_typed(server):
    """Each `grpcurl -plaintext -d '<json>' 127.0.0.1:50051 Service/Method` in the README, run the
    way grpcurl runs it: schema from server reflection, JSON parsed into the request type."""
    import re
    from pathlib import Path

    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    calls = re.findall(r"grpcurl -plaintext -d '(\{.*?\})' (?:\\\n\s*)?127\.0\.0\.1:50051 ([\w.]+)/(\w+)", readme)
    assert len(calls) >= 3, calls
    assert "grpcurl -plaintext 127.0.0.1:50051 list" in readme
    with grpc.insecure_channel(server.grpc_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "loraplex.v1.Inference" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        for body, service_name, method_name in calls:
            method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            request = json_format.Parse(body, request_cls())
            path = f"/{service_name}/{method_name}"
            kind = channel.unary_stream if method.server_streaming else channel.unary_unary
            call = kind(path, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString)
            replies = list(call(request, timeout=60)) if method.server_streaming else [call(request, timeout=60)]
            assert replies, path
            as_json = [json_format.MessageToDict(r) for r in replies]
            if method_name.startswith(("Generate", "Chat")):
                assert as_json[-1]["finishReason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH"), as_json[-1]
            if method_name == "Check":
                assert as_json[0]["status"] == "SERVING"


def test_sigterm_flips_health_at_once_and_lets_a_running_stream_finish(tiny_base, adapters, tmp_path):
    import signal

    store = tmp_path / "adapters"
    store.mkdir()
    shutil.copytree(adapters["ga"], store / "ga")
    srv = ServerProcess(tiny_base, store, *LONG_ARGS).start()
    try:
        with grpc.insecure_channel(srv.grpc_address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            # long enough to outlast the health checks below (a few seconds at most), well inside --shutdown-timeout
            stream = stub.GenerateStream(pb.GenerateRequest(adapter="ga", prompt_token_ids=PROMPTS[0], sampling=_sampling(max_tokens=3000)))
            first = next(stream)
            srv.proc.send_signal(signal.SIGTERM)
            status = None
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(service="loraplex.v1.Inference"), timeout=2).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.02)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            rest = list(stream)  # the running stream is not cut
        assert sum(len(m.token_ids) for m in [first, *rest]) == 3000
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
