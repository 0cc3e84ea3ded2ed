"""Interop on the real embedded base (slow): an adapter trained here names the base by its hub id,
and plain peft on the folder `loraplex base` prints gives the greedy tokens `loraplex serve` gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.server.cli import main as loraplex_main
from loraplex.training.cli import main

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parents[2] / "training" / "demo_data" / "sentiment.jsonl"


def test_plain_peft_on_the_base_folder_matches_the_server(tmp_path, capsys):
    from transformers import AutoTokenizer

    from tests.integration.server_harness import ServerProcess, complete
    from tests.oracle import reference_greedy

    out = tmp_path / "adapters" / "senti"
    argv = ["--data_files", str(DEMO), "--output_path", str(out), "--train_split", "train[:16]", "--eval_split", "train[1196:1200]",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_seq_length", "96",
            "--init_lora_weights", "gaussian", "--metric", "loss"]
    assert main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    capsys.readouterr()
    assert loraplex_main(["base"]) == 0
    base_dir = Path(json.loads(capsys.readouterr().out)["path"])
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Classify the sentiment: the soup was cold."}], add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = reference_greedy(base_dir, out, prompt, n=6)
    with ServerProcess(base_dir, tmp_path / "adapters") as srv:
        reply = complete(srv, "senti", prompt, 6)
    assert reply.status_code == 200, reply.text
    # the server's text leaves special tokens out (the base answers, then emits <|im_end|> and more)
    assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert tokenizer.decode(expected, skip_special_tokens=True).strip()  # it did answer something
