"""Adapter names and peft config parsing: table-driven, each refusal names the value."""

import json

import pytest

from loraplex.server.errors import AdapterInvalid
from loraplex.server.store import read_lora_spec, validate_adapter_name


@pytest.mark.parametrize("name", ["a", "sentiment", "my-adapter_v1.2", "A" * 64, "0"])
def test_valid_names(name):
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "empty name"),
        ("a/b", "'/'"),
        ("../x", "'/'"),
        ("has space", "' '"),
        ("é", "'é'"),
        ("A" * 65, "65 characters long; the limit is 64"),
        (".hidden", "must not start with '.'"),
        ("..", "must not start with '.'"),
    ],
)
def test_invalid_names_name_value_and_rule(name, fragment):
    with pytest.raises(AdapterInvalid) as info:
        validate_adapter_name(name)
    assert fragment in str(info.value)


def _write_config(tmp_path, **overrides):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    config.update(overrides)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path


def test_lora_spec_reads_standard_peft_config(tmp_path):
    spec = read_lora_spec(_write_config(tmp_path, rank_pattern={"q_proj": 4}, use_rslora=True))
    assert spec.r == 8 and spec.max_rank == 8
    assert spec.target_modules == ("q_proj", "v_proj")
    assert spec.scaling(4) == pytest.approx(16 / 2)  # rsLoRA: alpha / sqrt(r)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"use_dora": True}, "use_dora=true"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"r": 0}, "r=0 must be a positive integer"),
        ({"r": "8"}, "r='8' must be a positive integer"),
        ({"lora_alpha": -1}, "lora_alpha=-1"),
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": []}, "target_modules=[]"),
    ],
)
def test_lora_spec_refusals(tmp_path, overrides, fragment):
    with pytest.raises(AdapterInvalid) as info:
        read_lora_spec(_write_config(tmp_path, **overrides))
    assert fragment in str(info.value)


def test_lora_spec_missing_or_broken_config(tmp_path):
    with pytest.raises(AdapterInvalid, match="no adapter_config.json"):
        read_lora_spec(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterInvalid, match="not valid JSON"):
        read_lora_spec(tmp_path)
