"""train-adapter end to end on a tiny random Llama: real training steps, real files, and the
result checked with peft's own loader (an independent reader of the store format)."""

from __future__ import annotations

import json
import sys

import torch

from loraplex.server.store import AdapterStore, read_lora_spec, read_manifest, sha256_file
from loraplex.training import trainer as trainer_module
from loraplex.training.cli import main
from tests.conftest import write_jsonl

FAST = ["--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--logging_steps", "1", "--lora_r", "4"]


def _train(tmp_path, base, data, name="demo", *extra):
    out = tmp_path / "adapters" / name
    argv = ["--model_name_or_path", str(base), "--data_files", str(data), "--output_path", str(out), *FAST, *extra]
    assert main(argv) == 0
    return out


def _logits(model, tokenizer):
    enc = tokenizer(["Is item 3 good?"], return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_lora_run_publishes_a_peft_loadable_adapter_that_changes_the_model(tmp_path, tiny_base, label_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _train(tmp_path, tiny_base, label_data, "demo", "--max_steps", "12", "--metric", "accuracy", "--task_name", "yes/no")
    files = sorted(p.name for p in out.iterdir())
    for expected in ("adapter_config.json", "adapter_model.safetensors", "loraplex.json", "training_report.json", "loss.png"):
        assert expected in files
    assert not any(p.name.startswith(".tmp-") for p in out.parent.iterdir())
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    manifest = read_manifest(out)
    spec = read_lora_spec(out)
    assert manifest.name == "demo" and manifest.task == "yes/no" and manifest.rank == 4 == spec.r
    assert manifest.weights_sha256 == sha256_file(out / "adapter_model.safetensors")
    assert set(manifest.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    from loraplex.server.basemodel import compute_fingerprint

    assert manifest.base_fingerprint == compute_fingerprint(tiny_base)
    assert manifest.metrics.metric == "accuracy" and manifest.metrics.base is not None and manifest.metrics.adapter is not None

    report = json.loads((out / "training_report.json").read_text())
    losses = [h["loss"] for h in report["log_history"] if "loss" in h]
    assert report["global_step"] == 12 and len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # the loss falls
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    base_logits = _logits(base, tokenizer)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(out))
    assert not torch.allclose(_logits(adapted, tokenizer), base_logits, atol=1e-4)


def test_qlora_run_on_cpu_bitsandbytes(tmp_path, tiny_base, label_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _train(tmp_path, tiny_base, label_data, "q", "--method", "qlora", "--max_steps", "4")
    manifest = read_manifest(out)
    assert manifest.method == "qlora"
    assert read_lora_spec(out).r == 4
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_base)), tokenizer)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(out))
    assert not torch.allclose(_logits(adapted, tokenizer), base_logits, atol=1e-4)


def test_resume_continues_the_step_count(tmp_path, tiny_base, label_data):
    out = _train(tmp_path, tiny_base, label_data, "r", "--max_steps", "4", "--save_steps", "2")
    run_dir = tmp_path / "adapters" / ".runs" / "r"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    first = json.loads((out / "training_report.json").read_text())
    first_losses = {h["step"]: h["loss"] for h in first["log_history"] if "loss" in h}
    # another seed: a run that restarted from step 0 would log different losses for steps 1-4
    _train(tmp_path, tiny_base, label_data, "r", "--max_steps", "7", "--save_steps", "2", "--seed", "7",
           "--resume_from_checkpoint", "latest", "--overwrite")
    report = json.loads((out / "training_report.json").read_text())
    losses = [(h["step"], h["loss"]) for h in report["log_history"] if "loss" in h]
    assert report["global_step"] == 7
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6, 7]
    assert {s: v for s, v in losses if s <= 4} == first_losses  # steps 1-4 come from the checkpoint


def test_resume_auto_starts_fresh_without_a_checkpoint(tmp_path, tiny_base, label_data):
    out = _train(tmp_path, tiny_base, label_data, "fresh", "--max_steps", "2", "--resume_from_checkpoint", "auto")
    assert json.loads((out / "training_report.json").read_text())["global_step"] == 2


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_base, label_data, capsys):
    argv = ["--model_name_or_path", str(tiny_base), "--data_files", str(label_data), "--output_path", str(tmp_path / "adapters/x"), "--resume_from_checkpoint", "latest", "--max_steps", "1"]
    assert main(argv) == 2
    assert "no complete checkpoint-* folder" in capsys.readouterr().err
    assert not (tmp_path / "adapters" / "x").exists()


def test_config_file_trains_two_adapters_loading_the_base_once(tmp_path, tiny_base, label_data, monkeypatch):
    calls = []
    real_load = trainer_module.load_base_model

    def counting_load(*args, **kwargs):  # a spy: the real loader runs
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_base_model", counting_load)
    other = write_jsonl(tmp_path / "other.jsonl", [{"input": f"Name {i}", "output": f"n{i % 3}"} for i in range(30)])
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        f"defaults:\n  model_name_or_path: {tiny_base}\n  max_steps: 3\n  lora_r: 4\n  learning_rate: 0.005\n"
        f"adapters:\n  - output_path: {tmp_path}/adapters/first\n    data_files: {label_data}\n"
        f"  - output_path: {tmp_path}/adapters/second\n    data_files: {other}\n    lora_r: 2\n    target_modules: [q_proj, v_proj]\n"
    )
    assert main(["--config", str(tasks)]) == 0
    assert len(calls) == 1
    store = AdapterStore(tmp_path / "adapters")
    assert store.names() == ["first", "second"]
    second = read_lora_spec(store.existing("second"))
    assert second.r == 2 and second.target_modules == ("q_proj", "v_proj")
    # the second adapter was trained on the clean base, not on top of the first one's LoRA layers
    config = json.loads((store.existing("second") / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base.resolve())  # plain peft can find the base
    from safetensors import safe_open

    with safe_open(str(store.existing("second") / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(("q_proj" in k or "v_proj" in k) for k in keys)


def test_unknown_target_module_lists_available_ones(tmp_path, tiny_base, label_data, capsys):
    argv = ["--model_name_or_path", str(tiny_base), "--data_files", str(label_data), "--output_path", str(tmp_path / "adapters/x"), "--target_modules", "q_proj,wq", "--max_steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--target_modules wq not found" in err and "available linear modules: down_proj, gate_proj, k_proj" in err
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == [] if (tmp_path / "adapters").exists() else True


def test_qlora_without_bitsandbytes_is_refused(tmp_path, tiny_base, label_data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail, as on a machine without it
    argv = ["--model_name_or_path", str(tiny_base), "--data_files", str(label_data), "--output_path", str(tmp_path / "adapters/x"), "--method", "qlora"]
    assert main(argv) == 2
    assert "--method qlora needs bitsandbytes, which cannot run here" in capsys.readouterr().err


def test_existing_adapter_needs_overwrite(tmp_path, tiny_base, label_data, capsys):
    out = _train(tmp_path, tiny_base, label_data, "dup", "--max_steps", "1")
    before = sha256_file(out / "adapter_model.safetensors")
    argv = ["--model_name_or_path", str(tiny_base), "--data_files", str(label_data), "--output_path", str(out), "--max_steps", "1"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert sha256_file(out / "adapter_model.safetensors") == before


def test_template_mode_and_tensorboard(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"What is {i}+1?", "a": str(i + 1)} for i in range(20)])
    out = _train(
        tmp_path, tiny_base, data, "tmpl",
        "--text_template", "Q: {q}\nA: {a}", "--output_field", "a", "--metric", "exact_match",
        "--max_steps", "2", "--report_to", "tensorboard", "--eval_split", "train[:4]", "--train_split", "train[4:]",
    )
    report = json.loads((out / "training_report.json").read_text())
    assert report["eval_examples"] == 4 and report["train_examples"] == 16
    events = list((tmp_path / "adapters" / ".runs" / "tmpl").rglob("events.out.tfevents.*"))
    assert events, "tensorboard event files expected under the checkpoint dir"


def test_killed_run_publishes_nothing_and_resumes(tmp_path, tiny_base, label_data):
    """SIGKILL a training run after its first checkpoint: no adapter (not even a hidden half one)
    is visible in the store; `--resume_from_checkpoint latest` then finishes and publishes."""
    import os
    import signal
    import subprocess
    import time

    store = tmp_path / "adapters"
    argv = [sys.executable, "-m", "loraplex.training.cli", "--model_name_or_path", str(tiny_base), "--data_files", str(label_data),
            "--output_path", str(store / "k"), "--max_steps", "400", "--save_steps", "2", "--logging_steps", "1", "--lora_r", "4"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "LORAPLEX_CACHE": str(tmp_path / "cache")})
    deadline = time.monotonic() + 120
    while not list((store / ".runs" / "k").glob("checkpoint-*/trainer_state.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert AdapterStore(store).names() == []  # nothing half-published is visible
    assert not (store / "k").exists()
    saved = max(int(p.name.split("-")[1]) for p in (store / ".runs" / "k").glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert main(["--model_name_or_path", str(tiny_base), "--data_files", str(label_data), "--output_path", str(store / "k"),
                 "--max_steps", str(saved + 3), "--save_steps", "2", "--lora_r", "4", "--resume_from_checkpoint", "auto"]) == 0
    report = json.loads((store / "k" / "training_report.json").read_text())
    steps = [h["step"] for h in report["log_history"] if "loss" in h]
    assert report["global_step"] == saved + 3 and AdapterStore(store).names() == ["k"]
    assert steps[-3:] == [saved + 1, saved + 2, saved + 3]
