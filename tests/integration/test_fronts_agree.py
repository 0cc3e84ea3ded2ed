"""HTTP and gRPC answer alike on a real server: the same credentials are accepted or refused on
both (one rule: ``Authorization: Bearer <key>``), and the same requests end with the same finish
reasons, spelled by the one map (OpenAI's values on HTTP, the proto enum on gRPC)."""

from __future__ import annotations

import grpc
import httpx
import pytest

from loraplex.server.auth import KeyFile
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.server_harness import LONG_ARGS, LONG_TOKENS, ServerProcess

PROMPT = [1, 520, 3000, 44, 17]
#: long enough for a few tokens on a loaded machine, far too short for LONG_TOKENS (the timeout case)
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fronts")
    (root / "adapters").mkdir()
    keys = KeyFile(root / "keys.yaml")
    secret = keys.add("both", "admin", ["*"])[0]
    with ServerProcess(tiny_base, root / "adapters", "--api-keys-file", str(root / "keys.yaml"), "--request-timeout", str(TIMEOUT_S), *LONG_ARGS) as srv:
        srv.secret = secret
        yield srv


def _http(srv, authorization: str | None, **body):
    headers = {"Authorization": authorization} if authorization is not None else {}
    payload = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True, **body}
    return httpx.post(srv.url + "/v1/completions", json=payload, headers=headers, timeout=120)


def _grpc(srv, authorization: str | None, **sampling):
    metadata = (("authorization", authorization),) if authorization is not None else None
    params = pb.SamplingParams(**{"max_tokens": 2, "temperature": 0.0, "ignore_eos": True, **sampling})
    with grpc.insecure_channel(srv.grpc_address) as channel:
        try:
            reply = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(adapter="", prompt_token_ids=PROMPT, sampling=params), metadata=metadata, timeout=120)
            return grpc.StatusCode.OK, reply
        except grpc.RpcError as exc:
            return exc.code(), None


@pytest.mark.parametrize(
    "authorization, accepted",
    [
        (None, False),
        ("{key}", False),  # a bare key: refused on both fronts
        ("Basic {key}", False),
        ("Bearer", False),
        ("Bearer wrong-key", False),
        ("Bearer {key}", True),
        ("bearer   {key}", True),
    ],
)
def test_the_same_credentials_pass_or_fail_on_both_fronts(server, authorization, accepted):
    value = authorization.format(key=server.secret) if authorization is not None else None
    http = _http(server, value)
    code, _ = _grpc(server, value)
    assert (http.status_code, code) == ((200, grpc.StatusCode.OK) if accepted else (401, grpc.StatusCode.UNAUTHENTICATED))


def test_the_same_requests_reach_the_same_finish_reasons(server):
    bearer = f"Bearer {server.secret}"
    _, first = _grpc(server, bearer, max_tokens=1)
    cases = {
        "length": ({"max_tokens": 3}, {"max_tokens": 3}),
        "stop": ({"max_tokens": 3, "stop_token_ids": [first.token_ids[0]]}, {"max_tokens": 3, "stop_token_ids": [first.token_ids[0]]}),
        # runs past --request-timeout: OpenAI has no value for that; HTTP says "timeout" (documented)
        "timeout": ({"max_tokens": LONG_TOKENS}, {"max_tokens": LONG_TOKENS}),
    }
    spelled = {"length": ("length", pb.FINISH_REASON_LENGTH), "stop": ("stop", pb.FINISH_REASON_STOP), "timeout": ("timeout", pb.FINISH_REASON_CANCELLED)}
    for reason, (http_body, grpc_sampling) in cases.items():
        http = _http(server, bearer, **http_body).json()
        code, reply = _grpc(server, bearer, **grpc_sampling)
        assert code == grpc.StatusCode.OK
        assert (http["choices"][0]["finish_reason"], reply.finish_reason) == spelled[reason], reason
        if reason == "timeout":  # really cut short, on both
            assert http["usage"]["completion_tokens"] < LONG_TOKENS and reply.usage.completion_tokens < LONG_TOKENS
        else:
            assert http["usage"]["completion_tokens"] == reply.usage.completion_tokens


def test_the_same_issue_11_fields_give_the_same_choices_and_logprobs_on_both_fronts(server):
    """n, seeds per choice, penalties, logit_bias and logprobs through both fronts: the same
    tokens, the same logprob values, the same usage; and the same out-of-range value refused on
    both, naming the field."""
    bearer = f"Bearer {server.secret}"
    fields = {"max_tokens": 3, "temperature": 1.0, "seed": 5, "n": 2, "logprobs": 1, "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.25}
    http = _http(server, bearer, **fields, logit_bias={"17": 2.0}).json()
    metadata = (("authorization", bearer),)
    params = pb.SamplingParams(ignore_eos=True, **fields)
    params.logit_bias[17] = 2.0
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(adapter="", prompt_token_ids=PROMPT, sampling=params), metadata=metadata, timeout=120)
    assert reply.usage.completion_tokens == http["usage"]["completion_tokens"] == 6
    for choice, h in zip(reply.choices, http["choices"]):
        assert [s.token for s in choice.logprobs] == h["logprobs"]["tokens"]
        assert [s.logprob for s in choice.logprobs] == h["logprobs"]["token_logprobs"]
    for bad in ({"top_p": 1.5}, {"presence_penalty": 3.0}, {"n": 99}, {"logprobs": 21}):
        name = next(iter(bad))
        assert _http(server, bearer, **bad).json()["error"]["param"] == name
        with grpc.insecure_channel(server.grpc_address) as channel, pytest.raises(grpc.RpcError) as failed:
            pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(adapter="", prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=2, **bad)), metadata=metadata, timeout=60)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"(field: {name})" in failed.value.details()
