"""Server behaviours that need their own process: a quantized (bitsandbytes int8, CPU) base
checked against peft on the same quantized base; promtool on /metrics; a fatal start-up."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
import pytest

from tests.integration.server_harness import ServerProcess, free_port
from tests.oracle import make_random_adapter, reference_greedy

PROMPTS = [[1, 520, 3000, 44, 17], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404]]


def test_int8_base_matches_peft_on_the_same_quantized_base(tiny_base, tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer, BitsAndBytesConfig

    store = tmp_path / "adapters"
    store.mkdir()
    adapters = {name: make_random_adapter(tiny_base, store / name, seed=i + 11) for i, name in enumerate(["qa", "qb"])}
    tokenizer = AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))
    with ServerProcess(tiny_base, store, "--quantize", "int8") as srv:
        import asyncio

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(model, prompt):
                    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
                    return (await client.post(srv.url + "/v1/completions", json=body)).json()["choices"][0]["text"]
                plan = [("qa", PROMPTS[0]), ("qb", PROMPTS[1]), ("tiny", PROMPTS[2]), ("qa", PROMPTS[1])]
                return plan, await asyncio.gather(*(one(m, p) for m, p in plan))

        plan, texts = asyncio.run(run())
    int8 = BitsAndBytesConfig(load_in_8bit=True)
    for (model, prompt), text in zip(plan, texts):
        expected = reference_greedy(tiny_base, adapters.get(model), prompt, n=16, quantization_config=int8)
        assert text == tokenizer.decode(expected, skip_special_tokens=True), model


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make test installs Debian's prometheus package)")
def test_promtool_on_metrics(tiny_base, tmp_path):
    """promtool finds nothing in loraplex's own metrics. Its only findings on the full /metrics
    are the colon lint on the four vllm:* names the Inference Extension reads verbatim (as it
    reports for vLLM itself); --no-vllm-metrics serves a fully promtool-clean page."""
    from loraplex.server.metrics import VLLM_COMPAT_NAMES

    store = tmp_path / "adapters"
    store.mkdir()
    make_random_adapter(tiny_base, store / "m", seed=5)
    pages = {}
    for flag in ("--vllm-metrics", "--no-vllm-metrics"):
        with ServerProcess(tiny_base, store, flag) as srv:
            httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": [1, 5, 6], "max_tokens": 3}, timeout=60).raise_for_status()
            pages[flag] = httpx.get(srv.url + "/metrics").text
    clean = subprocess.run(["promtool", "check", "metrics"], input=pages["--no-vllm-metrics"], capture_output=True, text=True)
    assert clean.returncode == 0 and clean.stdout.strip() == "" and clean.stderr.strip() == "", clean.stdout + clean.stderr
    assert "vllm:" not in pages["--no-vllm-metrics"] and "loraplex_requests_total" in pages["--no-vllm-metrics"]
    full = subprocess.run(["promtool", "check", "metrics"], input=pages["--vllm-metrics"], capture_output=True, text=True)
    findings = [line for line in (full.stdout + full.stderr).splitlines() if line.strip()]
    assert sorted(findings) == sorted(f"{name} metric names should not contain ':'" for name in VLLM_COMPAT_NAMES)


def test_unusable_base_exits_2_with_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loraplex.server.cli", "serve", "--base", str(tmp_path / "missing"), "--port", str(free_port()), "--grpc-port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "loraplex serve: error: base model" in result.stderr and "missing" in result.stderr
