"""Issue #11 against a real `loraplex serve` (tiny random Llama at fp32, loopback socket), with the
official ``openai`` client where it has the field: logprobs and echo equal peft's full forward;
n choices are indexed, seeded per choice and summed in usage; penalties, logit_bias and
min_tokens steer tokens as a reference sampler over peft's logits predicts; weighted mixes equal
peft's ``add_weighted_adapter``; /tokenize, /detokenize, /tokenizer_info answer in vLLM's shape
(what lm-eval's remote tokenizer reads); and gRPC gives the same values as HTTP."""

from __future__ import annotations

import json
import shutil

import grpc
import httpx
import pytest
import torch

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.server_harness import ServerProcess
from tests.oracle import greedy_with, make_random_adapter, reference_logits, reference_mix_model

PROMPT = [1, 520, 3000, 44, 17, 9]
#: fp32 engine vs fp32 peft forward: same math, different kernels and batch shapes
LOGPROB_TOL = 2e-3


@pytest.fixture(scope="module")
def pool(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-pool")
    return {name: make_random_adapter(tiny_base, root / name, seed=40 + i, r=4) for i, name in enumerate(["pa", "pb"])}


@pytest.fixture(scope="module")
def server(tiny_base, pool, tmp_path_factory):
    store = tmp_path_factory.mktemp("parity") / "adapters"
    store.mkdir()
    for name, folder in pool.items():
        shutil.copytree(folder, store / name)
    with ServerProcess(tiny_base, store, "--dtype", "float32", "--max-model-len", "256", "--max-lora-rank", "8") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def post(srv, path, body):
    return httpx.post(srv.url + path, json=body, timeout=120)


def log_softmax_rows(logits):
    return torch.log_softmax(logits.float(), dim=-1)


# ------------------------------------------------------------------------------ logprobs
def test_completion_logprobs_and_echo_equal_peft(server, client, tiny_base, pool, tokenizer):
    reply = client.completions.create(model="pa", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, echo=True, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(PROMPT) + 4 and reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens == len(PROMPT)
    ids = list(PROMPT)
    reference = None
    for _ in range(4):  # the reference's greedy continuation, teacher-forced
        reference = log_softmax_rows(reference_logits(tiny_base, pool["pa"], ids))
        ids.append(int(torch.argmax(reference[-1])))
    generated = ids[len(PROMPT):]
    reference = log_softmax_rows(reference_logits(tiny_base, pool["pa"], ids))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        expected = float(reference[i - 1, ids[i]])
        assert abs(lp.token_logprobs[i] - expected) < LOGPROB_TOL, (i, lp.token_logprobs[i], expected)
        best = torch.topk(reference[i - 1], 3)
        top = lp.top_logprobs[i]
        assert 3 <= len(top) <= 4  # the 3 best, plus the token itself when it is not among them
        assert abs(max(top.values()) - float(best.values[0])) < LOGPROB_TOL
        assert tokenizer.decode([int(best.indices[0])]) in top or len(lp.tokens[i].encode()) == 0
    assert lp.tokens[len(PROMPT):] == [tokenizer.decode([t]) for t in generated]
    assert choice.text == tokenizer.decode(PROMPT) + tokenizer.decode(generated)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_scoring_only_with_max_tokens_0_and_the_lm_eval_payload(server, tiny_base, tokenizer):
    other = [1, 77, 78, 79]
    # what lm-eval's loglikelihood sends: a list of token-id prompts, echo, logprobs 1, max_tokens 1
    reply = post(server, "/v1/completions", {"model": "tiny", "prompt": [PROMPT, other], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    for choice, ids in zip(reply["choices"], [PROMPT, other]):
        reference = log_softmax_rows(reference_logits(tiny_base, None, ids))
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - float(reference[i - 1, ids[i]])) < LOGPROB_TOL
            greedy = lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())
            assert greedy == (int(torch.argmax(reference[i - 1])) == ids[i])
    assert reply["usage"]["prompt_tokens"] == len(PROMPT) + len(other) and reply["usage"]["completion_tokens"] == 2
    scored = post(server, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 0, "logprobs": 0, "echo": True}).json()
    choice = scored["choices"][0]
    assert choice["finish_reason"] == "length" and scored["usage"]["completion_tokens"] == 0
    assert choice["text"] == tokenizer.decode(PROMPT) and len(choice["logprobs"]["tokens"]) == len(PROMPT)
    assert choice["logprobs"]["token_logprobs"][1:] == reply["choices"][0]["logprobs"]["token_logprobs"][1 : len(PROMPT)]


def test_chat_logprobs_with_top_logprobs_equal_peft(server, client, tiny_base, pool, tokenizer):
    messages = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="pb", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    prompt = post(server, "/tokenize", {"model": "pb", "messages": messages})
    ids = prompt.json()["tokens"]
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token  # greedy: the best is the token
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    tokens = _grpc_chat_ids(server, messages)
    reference = log_softmax_rows(reference_logits(tiny_base, pool["pb"], ids + tokens))
    for i, entry in enumerate(content):
        row = reference[len(ids) - 1 + i]
        assert abs(entry.logprob - float(row[tokens[i]])) < LOGPROB_TOL
        assert abs(entry.top_logprobs[1].logprob - float(torch.topk(row, 2).values[1])) < LOGPROB_TOL


def _grpc_chat_ids(server, messages):
    """The token ids of the same greedy chat reply, from gRPC (which returns ids)."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.InferenceStub(channel).Chat(pb.ChatRequest(adapter="pb", messages=[pb.ChatMessage(**m) for m in messages], sampling=pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)), timeout=120)
    return list(reply.token_ids)


# ------------------------------------------------------------------------------------- n
def test_n_choices_are_indexed_seeded_per_choice_and_summed(server, client):
    body = dict(model="pa", prompt=PROMPT, max_tokens=5, temperature=1.0, extra_body={"ignore_eos": True})
    reply = client.completions.create(n=3, seed=7, **body)
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens == 15
    singles = [client.completions.create(n=1, seed=7 + i, **body).choices[0].text for i in range(3)]
    assert [c.text for c in reply.choices] == singles  # choice i samples with seed + i
    stream = client.completions.create(n=3, seed=7, stream=True, stream_options={"include_usage": True}, **body)
    texts, finishes = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        if chunk.usage:
            assert chunk.usage.completion_tokens == 15
    assert [texts[i] for i in range(3)] == singles and set(finishes.values()) == {"length"}
    chat = client.chat.completions.create(model="pa", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content  # greedy: alike


def test_best_of_is_refused_naming_it(server):
    reply = post(server, "/v1/completions", {"model": "pa", "prompt": "x", "best_of": 2})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "best_of"


# ------------------------------------------------------------------- penalties and bias
def _reference_penalized(tiny_base, adapter, prompt, n, *, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy decoding over peft's logits with OpenAI's presence/frequency penalties and HF's
    repetition penalty applied as their definitions say."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(n):
        logits = reference_logits(tiny_base, adapter, ids)[-1].clone()
        for token in set(ids):  # repetition: prompt and output tokens
            logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token in set(out):
            logits[token] -= presence + frequency * out.count(token)
        out.append(int(torch.argmax(logits)))
        ids.append(out[-1])
    return out


def test_penalties_logit_bias_and_min_tokens_steer_tokens(server, tiny_base, pool, tokenizer):
    grpc_ids = lambda **s: _grpc_ids(server, "pa", PROMPT, **s)  # noqa: E731
    for penalties in ({"presence_penalty": 1.5, "frequency_penalty": 0.5}, {"repetition_penalty": 1.6}):
        expected = _reference_penalized(tiny_base, pool["pa"], PROMPT, 8, presence=penalties.get("presence_penalty", 0.0), frequency=penalties.get("frequency_penalty", 0.0), repetition=penalties.get("repetition_penalty", 1.0))
        http = post(server, "/v1/completions", {"model": "pa", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0, **penalties}).json()
        assert grpc_ids(max_tokens=8, **penalties) == expected
        assert http["choices"][0]["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in expected]
    forced = post(server, "/v1/completions", {"model": "pa", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logit_bias": {"555": 100}, "logprobs": 0}).json()
    assert forced["choices"][0]["logprobs"]["tokens"] == [httpx.post(server.url + "/detokenize", json={"tokens": [555]}).json()["prompt"]] * 3
    first = grpc_ids(max_tokens=1)[0]
    held = grpc_ids(max_tokens=4, stop_token_ids=[first], min_tokens=2)
    assert len(held) >= 2 and first not in held[:2]


def _grpc_ids(server, adapter, prompt, **sampling):
    bias = sampling.pop("logit_bias", None)
    params = pb.SamplingParams(temperature=0, ignore_eos=True, **sampling)
    if bias:
        params.logit_bias.update(bias)
    with grpc.insecure_channel(server.grpc_address) as channel:
        return list(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(adapter=adapter, prompt_token_ids=prompt, sampling=params), timeout=120).token_ids)


@pytest.mark.parametrize(
    "extra, param, fragment",
    [
        ({"n": 0}, "n", "n must be >= 1"),
        ({"n": 9}, "n", "n must be <= 8"),
        ({"logprobs": -1}, "logprobs", "logprobs must be >= 0"),
        ({"logprobs": 21}, "logprobs", "logprobs must be <= 20"),
        ({"presence_penalty": -2.01}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 10.5}, "repetition_penalty", "(0, 10]"),
        ({"repetition_penalty": -1}, "repetition_penalty", "(0, 10]"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "the limit is 300"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "not a token id"),
        ({"min_tokens": -1}, "min_tokens", "min_tokens must be >= 0"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "min_tokens (5) must be <= max_tokens (4)"),
        ({"max_tokens": -1}, "max_tokens", "max_tokens must be >= 1, got -1"),
        ({"max_tokens": 0}, "max_tokens", "only with echo"),
        ({"best_of": 2}, "best_of", "best_of"),
        ({"adapters": [{"name": "pa", "weight": 0.5}]}, "adapters", ""),
    ],
)
def test_out_of_range_values_get_400_naming_the_field_on_both_fronts(server, extra, param, fragment):
    reply = post(server, "/v1/completions", {"model": "pa", "prompt": PROMPT, "max_tokens": 4, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    sampling = {k: v for k, v in extra.items() if k in ("n", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "max_tokens") and not (isinstance(v, int) and v < 0)}
    if sampling and len(sampling) == len(extra):
        with grpc.insecure_channel(server.grpc_address) as channel, pytest.raises(grpc.RpcError) as failed:
            pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(adapter="pa", prompt_token_ids=PROMPT, sampling=pb.SamplingParams(**{"max_tokens": 4, **sampling})), timeout=60)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"(field: {param})" in failed.value.details()


# ---------------------------------------------------------------------------------- mixes
def test_a_weighted_mix_equals_peft_add_weighted_adapter(server, client, tiny_base, pool, tokenizer):
    weights = {"pa": 0.7, "pb": 0.3}
    expected = greedy_with(reference_mix_model(tiny_base, pool, weights), PROMPT, 6)
    body = dict(prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    by_field = client.completions.create(model="tiny", extra_body={"ignore_eos": True, "adapters": [{"name": n, "weight": w} for n, w in weights.items()]}, **body)
    compact = client.completions.create(model="pa:0.7+pb:0.3", extra_body={"ignore_eos": True}, **body)
    assert by_field.choices[0].logprobs.tokens == compact.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in expected]
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(prompt_token_ids=PROMPT, adapters=[pb.AdapterWeight(name=n, weight=w) for n, w in weights.items()], sampling=pb.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)), timeout=120
        )
    assert list(reply.token_ids) == expected


# ------------------------------------------------------------------------------ tokenizer
def test_tokenize_detokenize_tokenizer_info_and_models(server, tokenizer):
    text = "Hello world<|im_end|>"
    tok = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()  # lm-eval's exact body
    assert tok["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"] and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    assert tok["tokens"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    chat = post(server, "/tokenize", {"model": "pa", "messages": messages}).json()
    assert chat["tokens"] == tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    assert post(server, "/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": text}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and "chat_template" in info
    assert post(server, "/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404
    assert post(server, "/detokenize", {"tokens": [10**8]}).json()["error"]["param"] == "tokens"
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert {m["id"]: m["max_model_len"] for m in models} == {"tiny": 256, "pa": 256, "pb": 256}
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        grpc_tok = stub.Tokenize(pb.TokenizeRequest(prompt=text, add_special_tokens=False), timeout=60)
        assert list(grpc_tok.tokens) == tok["tokens"] and grpc_tok.max_model_len == 256
        assert stub.Detokenize(pb.DetokenizeRequest(tokens=tok["tokens"]), timeout=60).text == text


# ----------------------------------------------------------------------- both fronts agree
def test_grpc_gives_the_same_logprobs_echo_and_choices_as_http(server):
    http = post(server, "/v1/completions", {"model": "pa", "prompt": PROMPT, "max_tokens": 3, "temperature": 1.0, "seed": 11, "n": 2, "logprobs": 2, "echo": True, "ignore_eos": True}).json()
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(adapter="pa", prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=3, temperature=1.0, seed=11, n=2, logprobs=2, echo=True, ignore_eos=True)), timeout=120
        )
    assert len(reply.choices) == 2 and reply.usage.completion_tokens == http["usage"]["completion_tokens"] == 6
    for choice, h in zip(reply.choices, http["choices"]):
        lp = h["logprobs"]
        scored = list(choice.prompt_logprobs) + list(choice.logprobs)
        assert [s.token for s in scored] == lp["tokens"]
        assert [s.logprob if s.HasField("logprob") else None for s in scored] == lp["token_logprobs"]
        assert not scored[0].HasField("logprob") and all(len(s.top) == 2 for s in scored[1:])


# ---------------------------------------------------------------------- structured output
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}


def test_structured_output_parses_and_validates_on_both_fronts(server, client):
    import jsonschema

    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    reply = client.chat.completions.create(model="pa", messages=[{"role": "user", "content": "answer"}], max_tokens=60, temperature=1.0, seed=3, n=2, response_format=response_format)
    assert len(reply.choices) == 2
    for choice in reply.choices:  # one constraint per choice
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    free = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 60, "temperature": 1.0, "seed": 5, "response_format": {"type": "json_object"}}).json()
    text = free["choices"][0]["text"]  # a random model may run out of tokens inside a string: then only a prefix
    assert isinstance(json.loads(text), dict) if free["choices"][0]["finish_reason"] == "stop" else text.startswith("{")
    choice = post(server, "/v1/completions", {"model": "pb", "prompt": "x", "max_tokens": 10, "temperature": 1.0, "guided_choice": ["yes", "no"]}).json()
    assert choice["choices"][0]["text"] in ("yes", "no")
    regex = post(server, "/v1/completions", {"model": "pb", "prompt": "x", "max_tokens": 10, "temperature": 1.0, "guided_regex": "[0-9]{3}"}).json()
    assert len(regex["choices"][0]["text"]) == 3 and regex["choices"][0]["text"].isdigit()
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(adapter="pa", prompt="x", structured=pb.StructuredOutput(json_schema=json.dumps(SCHEMA)), sampling=pb.SamplingParams(max_tokens=60, temperature=1.0, seed=9)), timeout=120
        )
    jsonschema.validate(json.loads(reply.text), SCHEMA)
    assert reply.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "([0-9"}, "guided_regex"),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, None),
        ({"guided_json": SCHEMA, "ignore_eos": True}, "ignore_eos"),
        ({"guided_json": SCHEMA, "min_tokens": 2}, "min_tokens"),
    ],
)
def test_bad_structured_output_gets_400_naming_the_field(server, extra, param):
    reply = post(server, "/v1/completions", {"model": "pa", "prompt": "x", "max_tokens": 8, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] in ((param,) if param else ("guided_json", "guided_regex")), error
