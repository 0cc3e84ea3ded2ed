"""train-adapter's flags: every bad input is one clear line on stderr, exit code 2, no output."""

import dataclasses

import pytest

from loraplex.training.cli import main
from loraplex.training.config import TrainConfig, build_parser, configs_from_argv


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
    assert "--config" in text and "example:" in text


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--lora_r", "0"], "--lora_r must be a positive integer, got 0"),
        (["--lora_r", "-4"], "--lora_r must be a positive integer, got -4"),
        (["--output_path", "adapters/bad name"], "adapter name 'bad name' is invalid"),
        (["--output_path", "adapters/" + "x" * 65], "the limit is 64"),
        (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
        (["--max_steps", "0"], "--max_steps must be -1 or a positive integer, got 0"),
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["--text_template", "no placeholders"], "has no {field} placeholder"),
        (["--text_template", "Q: {input}", "--metric", "accuracy"], "must contain {output}"),
        (["--target_modules", ","], "--target_modules is empty"),
    ],
)
def test_bad_flags(tmp_path, capsys, label_data, extra, fragment):
    argv = ["--data_files", str(label_data), "--output_path", str(tmp_path / "adapters" / "a"), *extra]
    argv = [a.replace("adapters/", str(tmp_path / "adapters") + "/") if a.startswith("adapters/") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train-adapter: error: ") and fragment in err
    assert not (tmp_path / "adapters").exists()


def test_missing_data_file_fails_before_loading_any_model(tmp_path, capsys):
    assert main(["--data_files", str(tmp_path / "nope.jsonl"), "--output_path", str(tmp_path / "adapters/a"), "--model_name_or_path", str(tmp_path / "no-model")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_missing_base_names_the_path(tmp_path, capsys, label_data):
    assert main(["--data_files", str(label_data), "--output_path", str(tmp_path / "adapters/a"), "--model_name_or_path", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert "no-model" in err and "Hugging Face model folder" in err


def test_config_file_defaults_entries_and_overrides(tmp_path, label_data):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        f"defaults:\n  lora_r: 4\n  data_files: {label_data}\n  max_steps: 10\n"
        f"adapters:\n  - output_path: {tmp_path}/adapters/one\n  - output_path: {tmp_path}/adapters/two\n    lora_r: 16\n"
    )
    one, two = configs_from_argv(["--config", str(tasks), "--max_steps", "3"])
    assert (one.adapter_name, one.lora_r, one.max_steps) == ("one", 4, 3)
    assert (two.adapter_name, two.lora_r, two.max_steps) == ("two", 16, 3)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("adapters: []\n", "non-empty 'adapters:' list"),
        ("adapters:\n  - output_path: a/x\n    bogus: 1\n", "unknown setting(s) bogus"),
        ("adapters:\n  - output_path: a/x\n  - output_path: b/x\n", "adapter names repeat: x"),
        ("adapters: [\n", "not valid YAML"),
    ],
)
def test_bad_config_files(tmp_path, capsys, label_data, body, fragment):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(body)
    assert main(["--config", str(tasks), "--data_files", str(label_data)]) == 2
    assert fragment in capsys.readouterr().err
