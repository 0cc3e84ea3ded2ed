"""train-adapter --search on a tiny random Llama: Optuna trials with the base loaded once, the
trials table and plot, the best trial published with its record, and resuming the study."""

from __future__ import annotations

import json

from loraplex.server.store import read_manifest
from loraplex.training import trainer as trainer_module
from loraplex.training.cli import main

SPEC = """search_strategy: {{type: random, num_trials: {n}, seed: 3}}
search_space:
  learning_rate: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
  lora_r: {{type: int, low: 2, high: 8}}
  per_device_train_batch_size: {{type: choice, values: [2, 4]}}
"""


def test_random_search_loads_the_base_once_publishes_the_best_and_resumes(tmp_path, tiny_base, label_data, monkeypatch, capsys):
    loads = []
    real_load = trainer_module.load_base_model
    monkeypatch.setattr(trainer_module, "load_base_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    spec = tmp_path / "search.yaml"
    spec.write_text(SPEC.format(n=3))
    out = tmp_path / "adapters" / "tuned"
    argv = ["--search", str(spec), "--model_name_or_path", str(tiny_base), "--data_files", str(label_data), "--output_path", str(out),
            "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "1", "--bf16", "false", "--lora_r", "4", "--learning_rate", "5e-3"]
    assert main(argv) == 0
    assert len(loads) == 1
    printed = capsys.readouterr().out
    assert "search trials (loss on the eval split)" in printed and "published tuned" in printed

    manifest = read_manifest(out)
    record = manifest.model_extra["search"]
    assert record["strategy"] == "random" and record["num_trials"] == 3 and record["direction"] == "minimize"
    finished = record["trials"]
    assert [t["number"] for t in finished] == [0, 1, 2]
    # trial 0 is the command line's flags where they fit the space (batch 8 does not: it is sampled)
    assert finished[0]["params"]["learning_rate"] == 5e-3 and finished[0]["params"]["lora_r"] == 4
    assert finished[0]["params"]["per_device_train_batch_size"] in (2, 4)
    completed = [t for t in finished if t["state"] == "COMPLETE"]
    best = min(completed, key=lambda t: t["value"])
    assert record["best_trial"] == best["number"] and record["best_params"] == best["params"]
    # the published adapter is the best trial's configuration, scored on the same eval split
    assert manifest.rank == best["params"]["lora_r"] and manifest.training_args["learning_rate"] == best["params"]["learning_rate"]
    assert abs(manifest.metrics.adapter - best["value"]) < 1e-4
    run_dir = tmp_path / "adapters" / ".runs" / "tuned"
    assert (run_dir / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run_dir / "search.db").is_file()

    # resume: the same study, one more trial, the earlier three are not rerun
    spec.write_text(SPEC.format(n=4))
    assert main([*argv, "--overwrite"]) == 0
    record = read_manifest(out).model_extra["search"]
    assert [t["number"] for t in record["trials"]] == [0, 1, 2, 3]
    assert record["trials"][:3] == finished
    assert len(loads) == 2  # one per command


def test_bad_search_specs_are_named(tmp_path, label_data, capsys):
    cases = {
        "search_strategy: {type: grid, num_trials: 2}\nsearch_space: {lora_r: {type: int, low: 2, high: 4}}\n": "search_strategy.type 'grid'",
        "search_strategy: {type: random, num_trials: 0}\nsearch_space: {lora_r: {type: int, low: 2, high: 4}}\n": "num_trials must be a positive integer",
        "search_strategy: {type: tpe, num_trials: 2}\nsearch_space: {output_path: {type: choice, values: [a]}}\n": "search_space.output_path is not a searchable",
        "search_strategy: {type: tpe, num_trials: 2}\nsearch_space: {learning_rate: {type: float, low: 0, high: 1, log: true}}\n": "log-scaled, so low must be > 0",
    }
    for body, fragment in cases.items():
        spec = tmp_path / "s.yaml"
        spec.write_text(body)
        assert main(["--search", str(spec), "--data_files", str(label_data), "--output_path", str(tmp_path / "adapters/x")]) == 2
        assert fragment in capsys.readouterr().err
