"""Shared fixtures: a tiny random-weight Llama with the SmolLM2 tokenizer (no downloads),
isolated cache dirs, and small datasets written to real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Servers started by tests compute in fp32, where greedy output equals the fp32 peft oracle exactly
# (--dtype auto would pick bf16 on AMX CPUs; bf16 is checked against a bf16 oracle in test_engine.py).
os.environ.setdefault("LORAPLEX_DTYPE", "float32")


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer (with chat template) taken from the embedded GGUF, saved once."""
    from transformers import AutoTokenizer

    from loraplex.server.basemodel import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smol-tokenizer")
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer(smol_tokenizer_dir):
    """The SmolLM2 tokenizer itself (for decoding oracle tokens to text)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A 2-layer random Llama sharing SmolLM2's vocabulary, saved as a normal model folder."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, smol_tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer_dir)


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Each test gets its own LORAPLEX_CACHE, except slow tests: they share the user's cache so
    the embedded base is materialized once per machine, as it is for users."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    yield


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def label_data(tmp_path) -> Path:
    """A tiny classification dataset: 40 records, label from a keyword."""
    records = []
    for i in range(40):
        label = ["yes", "no"][i % 2]
        records.append({"input": f"Is item {i} {'good' if label == 'yes' else 'bad'}?", "output": label})
    return write_jsonl(tmp_path / "labels.jsonl", records)
