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
    start, end = report["ceilings_start"], report["ceilings_end"]  # measured before the phases and after them
    for key in ("bf16_gflops", "fp32_gflops", "mem_read_gbs"):
        assert start[key] > 0 and end[key] > 0
        assert report["ceilings"][key] == max(start[key], end[key]), key  # fractions divide by the higher
    for name, phase in report["phases"].items():
        assert phase["errors"] == 0 and phase["output_tokens"] == phase["requests"] * (6 if name == "single" else 3), name
        assert 0 < phase["of_compute_ceiling"] < 1, name
    assert report["phases"]["single"]["of_bandwidth_ceiling"] > 0
    assert report["phases"]["burst"]["requests"] == 3 and report["ratios"]["burst_ttft_p99_over_p50"] >= 1.0


def test_bench_constrained_and_mix_composition_phases(tiny_base, tmp_path):
    """--phases constrained,mixcomp alone: response_format json_schema on every request vs free;
    every third request a 2-adapter mix (body field "adapters") vs the same requests on single
    adapters; all served without errors, the ratios and the per-token overhead reported."""
    from loraplex.server.bench import mix_models

    singles, with_mixes = mix_models(["a0", "a1", "a2"], 6)
    assert singles == ["a0", "a1", "a2", "a0", "a1", "a2"]
    assert with_mixes == ["a0", "a1", "a2:0.7+a0:0.3", "a0", "a1", "a2:0.7+a0:0.3"]
    store = tmp_path / "adapters"
    store.mkdir()
    for i in range(3):
        make_random_adapter(tiny_base, store / f"a{i}", seed=40 + i, r=2)
    out = tmp_path / "out"
    with ServerProcess(tiny_base, store, "--max-batch-size", "6") as srv:
        code = loraplex_main(["bench", "--url", srv.url, "--base", str(tiny_base), "--adapters-dir", str(store), "--concurrency", "3", "--requests", "6",
                              "--prompt-tokens", "4", "--output-tokens", "3", "--repeats", "1", "--phases", "constrained,mixcomp", "--no-ceilings",
                              "--output", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["phases"]) == {"singles", "with_mixes", "constrained", "unconstrained"}
    for name, phase in report["phases"].items():
        assert phase["errors"] == 0 and phase["requests"] == 6 and phase["output_tokens"] == 18, name
    assert report["ratios"]["mixes_over_singles"] > 0 and report["mixcomp"]["mix_fraction"] == round(2 / 6, 3)
    # the schema's output is longer than 3 tokens: constrained requests also end by length
    assert report["ratios"]["constrained_over_free"] > 0 and report["constrained"]["tokens_per_request"] == {"constrained": 3.0, "free": 3.0}
    assert isinstance(report["constrained"]["overhead_ms_per_token"], float)
    assert report["ratios"]["mixed_over_base"] is None  # not run


def test_bench_phases_flag_refuses_unknown_names(capsys):
    with pytest.raises(SystemExit):
        loraplex_main(["bench", "--phases", "mixed,warp"])
    assert "warp" in capsys.readouterr().err


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


def test_fractions_divide_by_the_higher_ceiling_of_start_and_end():
    """A run whose host got faster (or slower) midway is judged against the faster window: the
    figures are compared one by one, the thread count kept, a missing end measurement changes
    nothing."""
    from loraplex.server.bench_ceilings import fractions, higher_ceilings

    start = {"threads": 2, "fp32_gflops": 221.2, "bf16_gflops": 466.2, "mem_read_gbs": 18.98}
    end = {"threads": 2, "fp32_gflops": 200.0, "bf16_gflops": 803.9, "mem_read_gbs": 20.5}
    assert higher_ceilings(start, end) == {"threads": 2, "fp32_gflops": 221.2, "bf16_gflops": 803.9, "mem_read_gbs": 20.5}
    assert higher_ceilings(start, None) == start
    cost = {"matmul_params": 134_400_000, "gflop_per_token": 0.2688}
    slow = fractions(475.5, ceilings=start, cost=cost, dtype="bfloat16")
    fast = fractions(475.5, ceilings=higher_ceilings(start, end), cost=cost, dtype="bfloat16")
    assert slow["of_compute_ceiling"] > 0.25 > fast["of_compute_ceiling"]  # 475.5 tok/s: 27% of a 466 GFLOP/s window, 16% of an 804 one


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


def test_failed_requests_are_counted_with_their_reason(tiny_base, tmp_path):
    """A phase whose requests the server refuses reports them as errors, with the server's answer
    in words (``error_samples``), never silently: here an adapter name the server does not know."""
    import asyncio

    from loraplex.server.bench import run_load

    store = tmp_path / "adapters"
    store.mkdir()
    with ServerProcess(tiny_base, store, "--max-batch-size", "2") as srv:
        result = asyncio.run(run_load(srv.url, "mixed", adapters=["no-such-adapter"], base="base", mix="uniform", concurrency=2, requests=3,
                                      prompt_tokens=4, output_tokens=2, seed=0))
    summary = result.summary()
    assert summary["errors"] == 3 and summary["requests"] == 0 and summary["output_tokens"] == 0
    assert len(summary["error_samples"]) == 1  # three identical failures, one sample
    assert summary["error_samples"][0].startswith("HTTP 404") and "no-such-adapter" in summary["error_samples"][0]
