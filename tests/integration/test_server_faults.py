"""Faults and limits on a real server: one request failing inside the engine (test hook) fails
alone; per-request timeout; SIGTERM with a shutdown deadline; the store folder removed under a
resident adapter."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time

import grpc
import httpx
import pytest

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.server_harness import LONG_ARGS, LONG_TOKENS, ServerProcess
from tests.oracle import make_random_adapter, reference_greedy

PROMPT = [1, 520, 3000, 44, 17]


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    return make_random_adapter(tiny_base, tmp_path_factory.mktemp("fault-pool") / "fa", seed=51)


def _store(tmp_path, adapter_dir):
    store = tmp_path / "adapters"
    store.mkdir()
    shutil.copytree(adapter_dir, store / "fa")
    return store


def test_a_request_failing_inside_the_engine_fails_alone(tiny_base, adapter_dir, tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))
    with ServerProcess(tiny_base, _store(tmp_path, adapter_dir), env={"LORAPLEX_TEST_FAIL_REQUEST_ID": "boom"}) as srv:
        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": "fa", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
                good = asyncio.create_task(client.post(srv.url + "/v1/completions", json=body))
                await asyncio.sleep(0.1)
                bad = await client.post(srv.url + "/v1/completions", json=body, headers={"X-Request-Id": "boom-1"})
                return bad, await good

        bad, good = asyncio.run(run())
        assert bad.status_code == 500 and "boom-1" in bad.json()["error"]["message"]
        assert good.status_code == 200
        assert good.json()["choices"][0]["text"] == tokenizer.decode(reference_greedy(tiny_base, adapter_dir, PROMPT, n=40), skip_special_tokens=True)
        again = httpx.post(srv.url + "/v1/completions", json={"model": "fa", "prompt": PROMPT, "max_tokens": 3}, timeout=60)
        assert again.status_code == 200  # the engine kept running
        with grpc.insecure_channel(srv.grpc_address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(request_id="boom-2", adapter="fa", prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=10)), timeout=60)
        assert info.value.code() == grpc.StatusCode.INTERNAL and "boom-2" in info.value.details()
    log = srv.log()
    assert "request boom-1 failed" in log and "injected fault" in log


def test_request_timeout_ends_with_a_clear_finish_reason(tiny_base, adapter_dir, tmp_path):
    with ServerProcess(tiny_base, _store(tmp_path, adapter_dir), "--request-timeout", "0.5", *LONG_ARGS) as srv:
        started = time.monotonic()
        reply = httpx.post(srv.url + "/v1/completions", json={"model": "fa", "prompt": PROMPT, "max_tokens": LONG_TOKENS, "ignore_eos": True}, timeout=60).json()
        assert time.monotonic() - started < 10
        assert reply["choices"][0]["finish_reason"] == "timeout"
        assert 0 < reply["usage"]["completion_tokens"] < LONG_TOKENS


def test_sigterm_drains_then_aborts_at_the_shutdown_deadline(tiny_base, adapter_dir, tmp_path):
    srv = ServerProcess(tiny_base, _store(tmp_path, adapter_dir), "--shutdown-timeout", "1", *LONG_ARGS).start()
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json={"model": "fa", "prompt": PROMPT, "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}, timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            srv.proc.send_signal(signal.SIGTERM)
            with grpc.insecure_channel(srv.grpc_address) as channel:  # new work is refused at once
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(adapter="fa", prompt="x"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "abort"
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_resident_adapter_keeps_serving_when_its_folder_is_removed(tiny_base, adapter_dir, tmp_path):
    store = _store(tmp_path, adapter_dir)
    with ServerProcess(tiny_base, store, "--preload", "fa") as srv:
        first = httpx.post(srv.url + "/v1/completions", json={"model": "fa", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}, timeout=60).json()
        shutil.rmtree(store / "fa")
        httpx.get(srv.url + "/v1/models")  # a store scan happens here
        again = httpx.post(srv.url + "/v1/completions", json={"model": "fa", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}, timeout=60).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        assert httpx.get(srv.url + "/v1/adapters/fa").json()["state"] == "resident"
