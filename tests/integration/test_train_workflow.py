"""train-adapter's workflow on a tiny random Llama: chat data, several metrics and an honest verdict,
eval-only scoring, optimiser/LoRA flags, packing, bf16, and interop with plain peft and our server."""

from __future__ import annotations

import json
import os
import stat

import pytest

from loraplex.server.cli import main as loraplex_main
from loraplex.server.store import read_manifest
from loraplex.training.cli import main
from tests.conftest import write_jsonl

FAST = ["--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--logging_steps", "1", "--lora_r", "4", "--bf16", "false"]


def _chat_records(n=40):
    return [
        {"messages": [
            {"role": "system", "content": "Answer yes or no."},
            {"role": "user", "content": f"Is {i} even?"},
            {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"},
        ]}
        for i in range(n)
    ]


def _train(tmp_path, base, data, name, *extra):
    out = tmp_path / "adapters" / name
    assert main(["--model_name_or_path", str(base), "--data_files", str(data), "--output_path", str(out), *FAST, *extra]) == 0
    return out


def test_published_adapter_loads_with_plain_peft_and_matches_the_server(tmp_path, tiny_base, label_data):
    """base_model_name_or_path resolves (AutoPeftModel finds the base by it), files are readable by
    other users, and plain peft's greedy tokens equal what loraplex serve returns for the adapter."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from tests.integration.server_harness import ServerProcess, complete
    from tests.oracle import reference_greedy

    out = _train(tmp_path, tiny_base, label_data, "interop", "--max_steps", "6", "--init_lora_weights", "gaussian")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base.resolve())
    assert read_manifest(out).base_model_id == tiny_base.name  # our manifest keeps the served name + fingerprint
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}

    auto = AutoPeftModelForCausalLM.from_pretrained(str(out))  # finds the base through adapter_config.json alone
    assert auto.peft_config["default"].r == 4

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    prompt = tokenizer("Is item 7 good?", add_special_tokens=False)["input_ids"]
    expected = reference_greedy(tiny_base, out, prompt, n=8)
    base_tokens = reference_greedy(tiny_base, None, prompt, n=8)
    with ServerProcess(tiny_base, tmp_path / "adapters") as srv:
        reply = complete(srv, "interop", prompt, 8, logprobs=None)
        assert reply.status_code == 200, reply.text
        served = reply.json()
    served_ids = tokenizer(served["choices"][0]["text"], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(expected) == served["choices"][0]["text"], (expected, served_ids, base_tokens)


def test_chat_data_with_several_metrics_and_an_honest_verdict(tmp_path, tiny_base, capsys):
    """A random tiny model cannot learn yes/no in 3 steps: the verdict says so and `adapters list` shows it."""
    data = write_jsonl(tmp_path / "chat.jsonl", _chat_records())
    out = _train(tmp_path, tiny_base, data, "chatty", "--max_steps", "3", "--metric", "accuracy,rouge,bleu,perplexity", "--max_new_tokens", "3")
    manifest = read_manifest(out)
    scores = manifest.metrics.scores
    assert list(scores) == ["accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "perplexity"]
    import math

    assert manifest.metrics.metric == "accuracy"
    assert math.isclose(scores["perplexity"]["adapter"], math.exp(manifest.metrics.eval_loss), rel_tol=1e-6)
    assert math.isclose(scores["perplexity"]["base"], math.exp(manifest.metrics.base_eval_loss), rel_tol=1e-6)
    assert manifest.metrics.verdict == "below_chance"  # the eval split is 2 yes + 2 no: chance is 0.5
    assert "at or below chance (0.500" in manifest.metrics.verdict_detail
    printed = capsys.readouterr().out
    assert "WARNING: published chatty" in printed and "at or below chance" in printed
    report = json.loads((out / "training_report.json").read_text())
    assert report["data_format"] == "chat" and report["verdict"] == "below_chance"
    assert report["throughput"]["samples_per_second"] > 0 and report["memory"]["cpu_peak_rss_mb"] > 0

    assert loraplex_main(["adapters", "list", "--adapters-dir", str(tmp_path / "adapters"), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["status"] == "below_chance"
    assert loraplex_main(["adapters", "list", "--adapters-dir", str(tmp_path / "adapters")]) == 0
    assert "below_chance" in capsys.readouterr().out


def test_eval_only_scores_a_published_adapter_and_the_base(tmp_path, tiny_base, label_data, capsys):
    out = _train(tmp_path, tiny_base, label_data, "scored", "--max_steps", "4", "--eval_split", "train[:8]", "--train_split", "train[8:]")
    manifest = read_manifest(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    argv = ["--eval_only", "--adapter", str(out), "--model_name_or_path", str(tiny_base), "--data_files", str(label_data),
            "--eval_split", "train[:8]", "--metric", "loss,accuracy", "--bf16", "false"]  # the dtype it was trained and scored in
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "scored scored" in printed and "loss" in printed
    # the adapter read back from the store scores what the in-memory model scored after training
    assert f"{manifest.metrics.base_eval_loss:.4f}" in printed and f"{manifest.metrics.eval_loss:.4f}" in printed, printed
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written


def test_eval_only_flag_errors(tmp_path, label_data, capsys):
    assert main(["--eval_only", "--data_files", str(label_data)]) == 2
    assert "--eval_only needs --adapter NAME" in capsys.readouterr().err
    assert main(["--eval_only", "--adapter", str(tmp_path / "adapters" / "ghost"), "--data_files", str(label_data)]) == 2
    assert "adapter 'ghost' not found" in capsys.readouterr().err


def test_optimiser_and_lora_flags_reach_peft_and_the_trainer(tmp_path, tiny_base, label_data, capsys):
    out = _train(
        tmp_path, tiny_base, label_data, "flags", "--max_steps", "2", "--weight_decay", "0.1", "--optim", "adafactor",
        "--max_grad_norm", "0.5", "--use_rslora", "--init_lora_weights", "gaussian", "--modules_to_save", "lm_head",
    )
    err = capsys.readouterr().err
    assert "warning: --modules_to_save lm_head" in err and "loraplex serve refuses adapters with modules_to_save" in err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["modules_to_save"] == ["lm_head"] and config["init_lora_weights"] == "gaussian"
    report = json.loads((out / "training_report.json").read_text())
    assert report["config"]["optim"] == "adafactor" and report["config"]["weight_decay"] == 0.1
    # the server's own validation refuses it, as the warning said
    assert loraplex_main(["adapters", "list", "--adapters-dir", str(tmp_path / "adapters"), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["status"] == "invalid" and "modules_to_save" in row["error"]


def test_trainer_receives_the_optimiser_flags(tmp_path, tiny_base, label_data, monkeypatch):
    """A spy on the real TrainingArguments: the flags arrive as given."""
    from loraplex.training import trainer as trainer_module

    seen = {}
    real = trainer_module._training_arguments

    def spy(cfg, n_train, bf16):
        args = real(cfg, n_train, bf16)
        seen.update(optim=getattr(args.optim, "value", args.optim), weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, bf16=args.bf16)
        return args

    monkeypatch.setattr(trainer_module, "_training_arguments", spy)
    _train(tmp_path, tiny_base, label_data, "spy", "--max_steps", "1", "--weight_decay", "0.05", "--optim", "sgd", "--max_grad_norm", "0.25", "--bf16", "true")
    # --bf16 true on a plain LoRA run holds the base in bf16: no autocast (TrainingArguments.bf16 False)
    assert seen == {"optim": "sgd", "weight_decay": 0.05, "max_grad_norm": 0.25, "bf16": False}
    report = json.loads((tmp_path / "adapters" / "spy" / "training_report.json").read_text())
    assert report["bf16"] is True and report["bf16_mode"] == "weights"
    # the layers ran as training/layer_fused.py's node, the branch nodes installed under them (the tiny base: 2 layers x 7 projections)
    assert report["lora_branch"].startswith("fused decoder layer on 2 of 2 layers"), report["lora_branch"]
    assert "elsewhere fused LoRA branch on 14 layers" in report["lora_branch"]


def test_lora_branch_peft_keeps_peft_forward(tmp_path, tiny_base, label_data, monkeypatch):
    from loraplex.training import lora_fused

    monkeypatch.setattr(lora_fused, "install", lambda model: pytest.fail("--lora_branch peft must not swap layers"))
    _train(tmp_path, tiny_base, label_data, "plainpeft", "--max_steps", "1", "--lora_branch", "peft")
    report = json.loads((tmp_path / "adapters" / "plainpeft" / "training_report.json").read_text())
    assert report["lora_branch"] == "peft's LoRA forward (--lora_branch peft)"
    assert report["config"]["lora_branch"] == "peft"


def test_packing_trains_and_counts_examples(tmp_path, tiny_base, label_data):
    out = _train(tmp_path, tiny_base, label_data, "packed", "--max_steps", "3", "--packing", "--max_seq_length", "128")
    report = json.loads((out / "training_report.json").read_text())
    assert report["packing"] is True and report["throughput"]["examples_per_packed_row"] > 2
    assert report["global_step"] == 3 and all(h["loss"] > 0 for h in report["log_history"] if "loss" in h)


def test_quantization_aware_training_sees_the_int4_base(tmp_path, tiny_base, label_data):
    """--quantization_aware onnx-int4: the base is scored (and trained) on its int4 round trip, so
    its eval loss differs from the float base's; the report says what was quantized."""
    plain = _train(tmp_path, tiny_base, label_data, "plain", "--max_steps", "2", "--seed", "3")
    aware = _train(tmp_path, tiny_base, label_data, "aware", "--max_steps", "2", "--seed", "3", "--quantization_aware", "onnx-int4")
    plain_report = json.loads((plain / "training_report.json").read_text())
    aware_report = json.loads((aware / "training_report.json").read_text())
    assert aware_report["quantization_aware"] == {"target": "onnx-int4", "modules": 2 * 7 + 1, "block_size": 32}
    assert plain_report["quantization_aware"]["target"] == "none"
    assert aware_report["config"]["quantization_aware"] == "onnx-int4"
    assert abs(aware_report["base_eval_loss"] - plain_report["base_eval_loss"]) > 1e-6


def test_wandb_without_the_package_is_a_clear_error(tmp_path, tiny_base, label_data, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    argv = ["--model_name_or_path", str(tiny_base), "--data_files", str(label_data), "--output_path", str(tmp_path / "adapters/w"), "--report_to", "wandb"]
    assert main(argv) == 2
    assert "--report_to wandb needs the wandb package" in capsys.readouterr().err


@pytest.mark.parametrize("flags, fragment", [
    (["--metric", "accuracy,bogus"], "--metric bogus is not one of"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--bf16", "maybe"], "invalid choice: 'maybe'"),
    (["--data_name", "x/y"], "give --data_files or --data_name, not both"),
    (["--quantization_aware", "onnx-int4", "--method", "qlora"], "--quantization_aware onnx-int4 replaces the base weights"),
])
def test_new_flag_errors(tmp_path, label_data, capsys, flags, fragment):
    argv = ["--data_files", str(label_data), "--output_path", str(tmp_path / "adapters/a"), *flags]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse choices
        code = exc.code
    assert code == 2
    assert fragment in capsys.readouterr().err


def test_pissa_adapter_is_converted_to_plain_lora_on_the_original_base(tmp_path, tiny_base, label_data):
    """PiSSA rewrites the base while training; the published adapter (rank 2r after peft's
    conversion) on the untouched base must give the eval loss the trained model had."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from loraplex.training.config import TrainConfig
    from loraplex.training.data import PromptRenderer, SupervisedDataset, prepare_records
    from loraplex.training.trainer import mean_eval_loss

    out = _train(tmp_path, tiny_base, label_data, "pissa", "--max_steps", "3", "--init_lora_weights", "pissa", "--eval_split", "train[:8]", "--train_split", "train[8:]")
    manifest = read_manifest(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert manifest.rank == 8 and config["r"] == 8  # 2 x --lora_r 4
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    cfg = TrainConfig(data_files=str(label_data), output_path=str(out), eval_split="train[:8]", train_split="train[8:]").validate()
    fmt, _, evaluation = prepare_records(cfg)
    eval_ds = SupervisedDataset(evaluation, PromptRenderer(cfg, tokenizer, fmt), tokenizer, 512, split="eval")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(out))
    tokenizer.padding_side = "right"
    loss = mean_eval_loss(model, eval_ds, DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"), 8)
    torch.testing.assert_close(loss, manifest.metrics.eval_loss, atol=1e-4, rtol=1e-4)
    assert abs(manifest.metrics.eval_loss - manifest.metrics.base_eval_loss) > 1e-4  # the adapter changed something
