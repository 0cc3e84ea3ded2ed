"""``loraplex bench`` on the tiny model with tiny sizes (a smoke run of the real command against a
real server: never a speed test): against ``--url`` it runs no local peft baseline, measures the
machine's ceilings in the same run and reports each phase against them, with the single-stream,
burst and hot-load phases. The llama.cpp peer runs only when a llama-server binary is given."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from loraplex.server.cli import main as loraplex_main
from tests.integration.server_harness import ServerProcess
from tests.oracle import make_random_adapter


def test_bench_against_a_url_runs_no_baseline_and_reports_ceilings(tiny_base, tmp_path):
    store = tmp_path / "adapters"
    store.mkdir()
    for i in range(3):
        make_random_adapter(tiny_base, store / f"a{i}", seed=30 + i, r=2)
    out = tmp_path / "out"
    with ServerProcess(tiny_base, store, "--max-batch-size", "4") as srv:
        code = loraplex_main(["bench", "--url", srv.url, "--base", str(tiny_base), "--adapters-dir", str(store), "--concurrency", "2", "--requests", "2",
                              "--prompt-tokens", "4", "--output-tokens", "3", "--repeats", "1", "--burst", "3", "--single-stream-requests", "1",
                              "--hotload", "0", "--served-dtype", "float32", "--output", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["phases"]) == {"mixed", "base", "single", "burst"}  # no "naive": not asked for
    assert report["ceilings"]["bf16_gflops"] > 0 and report["ceilings"]["mem_read_gbs"] > 0
    for name, phase in report["phases"].items():
        assert phase["errors"] == 0 and phase["output_tokens"] == phase["requests"] * (6 if name == "single" else 3), name
        assert 0 < phase["of_compute_ceiling"] < 1, name
    assert report["phases"]["single"]["of_bandwidth_ceiling"] > 0
    assert report["phases"]["burst"]["requests"] == 3 and report["ratios"]["burst_ttft_p99_over_p50"] >= 1.0


def test_model_cost_of_smollm2_135m():
    """0.27 GFLOP per token for SmolLM2-135M (issue 15's figure), from its config alone."""
    from loraplex.server.bench_ceilings import model_cost

    config = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49152, "num_attention_heads": 9, "num_key_value_heads": 3}
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"smol-config-{os.getpid()}.json"
    path.write_text(json.dumps(config))
    try:
        assert abs(model_cost(path)["gflop_per_token"] - 0.269) < 0.001
    finally:
        path.unlink()


def test_peer_llama_server_needs_a_binary(tiny_base, tmp_path):
    """The llama.cpp side-by-side run: only with a llama-server binary built in its source tree
    (LORAPLEX_LLAMA_SERVER or llama-server on PATH); none is built on the development machine."""
    binary = os.environ.get("LORAPLEX_LLAMA_SERVER") or shutil.which("llama-server")
    if not binary:
        pytest.skip("no llama-server binary (set LORAPLEX_LLAMA_SERVER to one built from llama.cpp's tree; building takes ~20 min, never in CI)")
    from loraplex.server.bench_peer import find_converter

    assert find_converter(Path(binary)).name == "convert_lora_to_gguf.py"
    code = loraplex_main(["bench", "--synthetic-adapters", "2", "--concurrency", "2", "--requests", "2", "--prompt-tokens", "4", "--output-tokens", "3",
                          "--repeats", "1", "--burst", "0", "--hotload", "0", "--no-naive", "--no-ceilings", "--peer-llama-server", binary, "--output", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["peer_llama_server"]["mixed"]["errors"] == 0


def test_no_peer_binary_is_a_clear_error(tmp_path):
    from loraplex.server.bench_peer import find_converter

    fake = tmp_path / "bin" / "llama-server"
    fake.parent.mkdir()
    fake.write_text("")
    with pytest.raises(FileNotFoundError, match="convert_lora_to_gguf.py"):
        find_converter(fake)
