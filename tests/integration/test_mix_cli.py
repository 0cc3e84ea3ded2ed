"""``loraplex adapters mix``: the real command line writes a named mix into the store (both recipe
spellings, its errors as one line and exit 2, nothing published on failure), and a real server
serves the result like any adapter: its greedy tokens equal peft's own rank concatenation
(``add_weighted_adapter(combination_type="cat")``) of the same members."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.integration.server_harness import ServerProcess, complete, text_of
from tests.oracle import make_random_adapter

PROMPT = [1, 520, 3000, 44, 17]
N = 10


def cli(*args):
    return subprocess.run([sys.executable, "-m", "loraplex.server.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def store(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-cli") / "adapters"
    make_random_adapter(tiny_base, root / "a", seed=21, r=4)
    make_random_adapter(tiny_base, root / "b", seed=22, r=2, targets=("q_proj", "v_proj", "down_proj"), lora_alpha=4)
    return root


def peft_cat_greedy(tiny_base, store, members, n=N):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(store / members[0][0]), adapter_name=members[0][0])
    for name, _ in members[1:]:
        peft_model.load_adapter(str(store / name), adapter_name=name)
    peft_model.add_weighted_adapter([m for m, _ in members], [w for _, w in members], "cat_mix", combination_type="cat")
    peft_model.set_adapter("cat_mix")
    peft_model.eval()
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(torch.argmax(peft_model(input_ids=torch.tensor([ids])).logits[0, -1])))
    return ids[len(PROMPT):]


@pytest.fixture(scope="module")
def saved_mix(tiny_base, store):
    """``ab`` = a x 0.7 + b x -0.5, written by the real command; its JSON summary."""
    made = cli("adapters", "mix", "ab", "a:0.7+b:-0.5", "--adapters-dir", str(store), "--base", str(tiny_base))
    assert made.returncode == 0, made.stderr
    return json.loads(made.stdout)


def test_adapters_mix_writes_a_store_entry_that_serves_like_any_adapter(tiny_base, store, tokenizer, saved_mix):
    summary = saved_mix
    assert summary["mix"] == "a:0.7+b:-0.5" and summary["method"] == "mix" and summary["status"] == "ok"
    assert summary["rank"] == 6  # q_proj, v_proj, down_proj: 4 + 2
    # the comma spelling writes the same weights
    again = cli("adapters", "mix", "ab2", "a:0.7,b:-0.5", "--adapters-dir", str(store), "--base", str(tiny_base))
    assert again.returncode == 0, again.stderr
    assert (store / "ab" / "adapter_model.safetensors").read_bytes() == (store / "ab2" / "adapter_model.safetensors").read_bytes()
    shown = json.loads(cli("adapters", "show", "ab", "--adapters-dir", str(store)).stdout)
    assert shown["weights_sha256"] == summary["weights_sha256"]
    recipe = json.loads((store / "ab" / "loraplex.json").read_text())["mix"]
    assert [(m["name"], m["weight"]) for m in recipe["members"]] == [("a", 0.7), ("b", -0.5)]

    expected = peft_cat_greedy(tiny_base, store, [("a", 0.7), ("b", -0.5)])
    alone = peft_cat_greedy(tiny_base, store, [("a", 1.0), ("b", 1.0)])
    assert expected != alone  # the weights matter
    with ServerProcess(tiny_base, store, "--dtype", "float32") as srv:
        reply = complete(srv, "ab", PROMPT, N)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == text_of(tokenizer, expected)
        listed = {m["id"] for m in srv_models(srv)}
        assert {"ab", "ab2", "a", "b"} <= listed
        # the same mix named per request, in both forms, batched by the engine: the same tokens
        compact = complete(srv, "a:0.7+b:-0.5", PROMPT, N)
        assert compact.status_code == 200, compact.text
        assert compact.json()["choices"][0]["text"] == text_of(tokenizer, expected)
        body = complete(srv, "tiny", PROMPT, N, adapters=[{"name": "a", "weight": 0.7}, {"name": "b", "weight": -0.5}])
        assert body.status_code == 200, body.text
        assert body.json()["choices"][0]["text"] == text_of(tokenizer, expected)
        # counted once per member (with the saved mix "ab" as an adapter of its own) and twice as a mix
        samples = scrape(srv)
        assert samples[("loraplex_mix_requests_total", (("members", "a+b"), ("status", "length")))] == 2
        assert samples[("loraplex_requests_total", (("adapter", "a"), ("status", "length")))] == 2
        assert samples[("loraplex_requests_total", (("adapter", "b"), ("status", "length")))] == 2
        assert samples[("loraplex_requests_total", (("adapter", "ab"), ("status", "length")))] == 1


def test_a_saved_mix_exports_to_onnx_like_any_adapter(tiny_base, store, saved_mix, tmp_path):
    """``loraplex export-onnx`` takes the saved mix's folder; plain onnxruntime-genai with its
    ``.onnx_adapter`` gives peft's cat tokens."""
    from loraplex.server.cli import main as loraplex_main
    from tests.integration.test_onnx_export import og_greedy

    out = tmp_path / "onnx"
    assert loraplex_main(["export-onnx", "--model_name_or_path", str(tiny_base), "--adapter_paths", str(store / "ab"),
                          "--output_path", str(out), "--precision", "fp32", "--lora_targets", "union"]) == 0
    assert og_greedy(out, "ab", PROMPT, N) == peft_cat_greedy(tiny_base, store, [("a", 0.7), ("b", -0.5)])


def scrape(srv) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    page = httpx.get(srv.url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(page) for s in family.samples}


def srv_models(srv):
    import httpx

    return httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("a:0.7+zz:0.3", "adapter 'zz' not found"),  # messages are regular expressions
        ("a:x+b:1", r"the weight of 'a' in RECIPE 'a:x\+b:1' is 'x', not a number"),
        ("a:1+a:2", "names adapter 'a' twice"),
        ("a:20", r"\|weight\| may be at most 8"),
        ("a:1+b", None),  # fine, but the name exists: refused without --overwrite
    ],
)
def test_adapters_mix_errors_are_one_line_and_publish_nothing(tiny_base, store, recipe, message):
    before = sorted(p.name for p in store.iterdir())
    result = cli("adapters", "mix", "a" if message is None else "new-mix", recipe, "--adapters-dir", str(store), "--base", str(tiny_base))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("loraplex: error:")]
    assert len(lines) == 1, result.stderr
    assert re.search(message or "already exists .*--overwrite", lines[0]), lines[0]
    assert sorted(p.name for p in store.iterdir()) == before


def test_request_mixes_check_every_members_key_right_and_the_limits(tiny_base, store, tmp_path):
    """Over HTTP with API keys: a member the key may not use is a 403 naming it (even though the
    other member and the base are allowed); more members than --max-mix-adapters, or than
    --max-loras, is a 400 naming the numbers."""
    import httpx

    from loraplex.server.auth import KeyFile

    keys = KeyFile(tmp_path / "keys.yaml")
    only_a = keys.add("only-a", "user", ["a", "tiny"])[0]
    both = keys.add("both", "user", ["a", "b"])[0]
    with ServerProcess(tiny_base, store, "--dtype", "float32", "--api-keys-file", str(tmp_path / "keys.yaml"),
                       "--max-loras", "1", "--max-mix-adapters", "2") as srv:
        def ask(secret, model, **extra):
            body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, **extra}
            reply = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=120)
            return reply.status_code, reply.json()["error"]["message"] if reply.status_code != 200 else ""

        status, message = ask(only_a, "a:0.5+b:0.5")
        assert status == 403 and "'b'" in message, message
        status, message = ask(only_a, "tiny", adapters=[{"name": "a", "weight": 1}, {"name": "b", "weight": 1}])
        assert status == 403 and "'b'" in message, message
        status, message = ask(both, "a:1+b:1+ab:1")
        assert status == 400 and "mixes 3 adapters; the limit is 2 (--max-mix-adapters)" in message, message
        status, message = ask(both, "a:1+b:1")
        assert status == 400 and "2 adapters" in message and "--max-loras 1" in message, message
        assert ask(both, "a")[0] == 200  # the members themselves still serve
