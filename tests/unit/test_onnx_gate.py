"""The onnx backend's adapter gate: full validation + conversion on first sight, a cache hit for
the same bytes afterwards, a new conversion when anything the checks depend on changes, and
refusals that leave nothing behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from loraplex.server.errors import AdapterInvalid
from loraplex.server.store.onnx_adapter import read_onnx_adapter
from tests.oracle import make_random_adapter


@pytest.fixture(scope="module")
def shapes(tiny_base):
    from loraplex.server.basemodel import compute_fingerprint
    from loraplex.server.store.validation import BaseShapes

    return BaseShapes.from_config(tiny_base, compute_fingerprint(tiny_base))


def _count_validations(monkeypatch):
    import loraplex.server.onnx.gate as gate_module

    calls = []
    real = gate_module.load_validated_adapter

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(gate_module, "load_validated_adapter", spy)
    return calls


def test_first_load_converts_then_the_same_bytes_hit_the_cache(tiny_base, shapes, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from loraplex.server.onnx.gate import OnnxAdapterGate

    calls = _count_validations(monkeypatch)
    adapter = make_random_adapter(tiny_base, tmp_path / "a", seed=3, r=4, targets=("q_proj", "v_proj"))
    gate = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache")
    first = gate(adapter, "a")
    assert calls == ["a"] and first.artifact.parent == tmp_path / "cache" and first.artifact.suffix == ".onnx_adapter"
    assert first.max_rank == 4 and len(first.module_names) == 4
    # the file holds A^T and (alpha/r * B)^T of the peft weights
    arrays = read_onnx_adapter(first.artifact)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].numpy()
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    assert np.allclose(arrays["model.layers.0.attn.q_proj.lora_A.weight"], a.T)
    assert np.allclose(arrays["model.layers.0.attn.q_proj.lora_B.weight"], (config["lora_alpha"] / config["r"] * b).T, rtol=1e-6)
    # a new gate (a restart) over the same cache: no validation run, the same file, the same summary
    again = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache")(adapter, "a")
    assert calls == ["a"] and again.artifact == first.artifact
    assert again.max_rank == 4 and again.module_names == first.module_names and again.weights_sha256 == first.weights_sha256
    # anything the checks depend on changes the key: a new alpha is a new validation and conversion
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 3}))
    changed = gate(adapter, "a")
    assert calls == ["a", "a"] and changed.artifact != first.artifact
    # ... and so does the rank limit: an adapter valid under 8 is refused under 2
    with pytest.raises(AdapterInvalid, match="above --max-lora-rank 2"):
        OnnxAdapterGate(shapes, max_lora_rank=2, cache_dir=tmp_path / "cache")(adapter, "a")


def test_a_lost_artifact_means_a_full_validation_again(tiny_base, shapes, tmp_path, monkeypatch):
    from loraplex.server.onnx.gate import OnnxAdapterGate

    calls = _count_validations(monkeypatch)
    adapter = make_random_adapter(tiny_base, tmp_path / "b", seed=4, r=2)
    gate = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache")
    first = gate(adapter, "b")
    first.artifact.unlink()
    second = gate(adapter, "b")
    assert calls == ["b", "b"] and second.artifact.is_file()


def test_refused_adapters_leave_no_cache_entry(tiny_base, shapes, tmp_path):
    from loraplex.server.onnx.gate import OnnxAdapterGate

    adapter = make_random_adapter(tiny_base, tmp_path / "c", seed=5, r=4)
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    gate = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache")
    with pytest.raises(AdapterInvalid, match="not a readable safetensors file"):
        gate(broken, "broken")
    (tmp_path / "cache").mkdir(exist_ok=True)
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unreadable_record_means_a_full_validation_again(tiny_base, shapes, tmp_path, monkeypatch):
    from loraplex.server.onnx.gate import OnnxAdapterGate

    calls = _count_validations(monkeypatch)
    adapter = make_random_adapter(tiny_base, tmp_path / "d", seed=6, r=2)
    gate = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache")
    gate(adapter, "d")
    [record] = (tmp_path / "cache").glob("*.json")
    record.write_text(json.dumps({"artifact": "x"}))  # no rank, no modules
    again = gate(adapter, "d")
    assert calls == ["d", "d"] and again.max_rank == 2


def test_export_manifest_refuses_adapter_files_outside_the_folder(tmp_path):
    from loraplex.server.errors import BaseModelError
    from loraplex.server.onnx.manifest import EXPORT_MANIFEST, read_export_manifest

    (tmp_path / "genai_config.json").write_text("{}")
    manifest = {
        "base_model_id": "b", "base_fingerprint": "f", "precision": "int4", "lora_targets": "all", "lora_modules": {},
        "adapters": [{"name": "a", "file": "../../etc/a.onnx_adapter", "file_sha256": "0" * 64, "source_path": "x",
                      "source_sha256": "0" * 64, "rank": 1, "modules": 1}],
    }
    (tmp_path / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BaseModelError, match="adapters.0.file: .*plain <name>.onnx_adapter file name"):
        read_export_manifest(tmp_path)


# ------------------------------------------------------------ held-out answers replayed on the export
PROMPTS = ["Convert this date: March 3, 1990", "Sort this item: hammer", "What is the capital of France?", "Say hello"]


@pytest.fixture(scope="module")
def replay_setup(tiny_base, tmp_path_factory):
    """A fp32 export of the tiny base (any export precision replays the same way), a random
    adapter, and what peft's own greedy decoding answers on each prompt: the stored predictions."""
    from transformers import AutoTokenizer

    from loraplex.server.cli import main as loraplex_main
    from tests.oracle import reference_greedy

    root = tmp_path_factory.mktemp("replay")
    export = root / "export"
    assert loraplex_main(["export-onnx", "--model_name_or_path", str(tiny_base), "--output_path", str(export), "--precision", "fp32"]) == 0
    adapter = make_random_adapter(tiny_base, root / "adapter", seed=11, r=4)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    samples, ends = [], set()
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        greedy = reference_greedy(tiny_base, adapter, ids, n=7)  # the 7 generated ids
        answer, end = greedy[:6], greedy[6]
        text = tokenizer.decode(answer)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != answer:
            continue  # random tokens that do not survive decode -> encode cannot be stored as text
        samples.append({"prompt": prompt, "reference": text, "prediction": text})
        ends.add(end)
    assert len(samples) >= 2, "too few prompts whose greedy answer round-trips through the tokenizer"
    return export, adapter, tokenizer, samples, ends


def _store_samples(adapter, samples):
    (adapter / "training_report.json").write_text(json.dumps({"eval_samples": samples}))


def test_replay_reproduces_peft_answers_and_counts_changed_ones(replay_setup, caplog):
    from loraplex.server.onnx.agreement import PredictionReplay
    from loraplex.server.onnx.gate import onnx_adapter_arrays
    from loraplex.server.store.validation import BaseShapes, load_validated_adapter

    export, adapter, tokenizer, samples, ends = replay_setup
    manifest = json.loads((export / "loraplex-export.json").read_text())
    shapes = BaseShapes(fingerprint=manifest["base_fingerprint"], linear_shapes={m: tuple(v) for m, v in manifest["lora_modules"].items()})
    arrays = onnx_adapter_arrays(load_validated_adapter(adapter, "a", shapes, max_lora_rank=8).modules)
    replay = PredictionReplay(export, tokenizer, sorted(ends), precision="fp32", threshold=0.9)
    _store_samples(adapter, samples)
    full = replay(adapter, arrays)
    assert (full.samples, full.reproduced, full.ok) == (len(samples), len(samples), True)
    # the bare base (no adapter tensors) does not give the adapter's answers
    assert replay(adapter, {}).reproduced < len(samples)
    # one answer changed in its last token: not reproduced, and the number falls below the threshold
    changed = [dict(s) for s in samples]
    ids = tokenizer(changed[0]["prediction"], add_special_tokens=False)["input_ids"]
    changed[0]["prediction"] = tokenizer.decode([*ids[:-1], (ids[-1] + 1) % 1000 + 500])
    _store_samples(adapter, changed)
    partial = replay(adapter, arrays)
    assert partial.reproduced == len(samples) - 1 and not partial.ok
    from loraplex.server.onnx.agreement import warn_if_low

    with caplog.at_level("WARNING", logger="loraplex.onnx.agreement"):
        warn_if_low("a", partial)
    assert f"reproduces {len(samples) - 1} of {len(samples)} held-out answers" in caplog.text and "--quantization_aware onnx-int4" in caplog.text
    (adapter / "training_report.json").unlink()
    assert replay(adapter, arrays) is None  # nothing stored: no number


def test_gate_keeps_the_agreement_in_its_record(replay_setup, tmp_path, monkeypatch):
    from loraplex.server.onnx.agreement import PredictionReplay
    from loraplex.server.onnx.gate import OnnxAdapterGate
    from loraplex.server.store.validation import BaseShapes

    export, adapter, tokenizer, samples, ends = replay_setup
    manifest = json.loads((export / "loraplex-export.json").read_text())
    shapes = BaseShapes(fingerprint=manifest["base_fingerprint"], linear_shapes={m: tuple(v) for m, v in manifest["lora_modules"].items()})
    folder = tmp_path / "a"
    shutil.copytree(adapter, folder)
    _store_samples(folder, samples)
    replay = PredictionReplay(export, tokenizer, sorted(ends), precision="fp32")
    gate = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache", replay=replay)
    assert gate.agreement("a") is None
    gate(folder, "a")
    assert gate.agreement("a").as_dict()["agreement"] == 1.0
    # a restart over the same cache: the number comes from the record, no replay runs
    calls = []
    monkeypatch.setattr(PredictionReplay, "__call__", lambda self, *a: calls.append(a))
    again = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache", replay=replay)
    again(folder, "a")
    assert calls == [] and again.agreement("a").reproduced == len(samples)
    # a gate without replay (an fp32 export configured so) never reuses a record with a number
    plain = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache")
    plain(folder, "a")
    assert plain.agreement("a") is None


def test_exported_adapter_files_are_replayed_from_the_copied_answers(replay_setup, tmp_path):
    """An adapter shipped inside the export (``NAME.onnx_adapter``) is replayed from
    ``NAME.training_report.json`` beside it (export-onnx copies the stored answers there)."""
    from loraplex.server.onnx.agreement import PredictionReplay
    from loraplex.server.onnx.export import _copy_stored_answers
    from loraplex.server.onnx.gate import OnnxAdapterGate, onnx_adapter_arrays, write_onnx_adapter
    from loraplex.server.store.validation import BaseShapes, load_validated_adapter

    export, adapter, tokenizer, samples, ends = replay_setup
    manifest = json.loads((export / "loraplex-export.json").read_text())
    shapes = BaseShapes(fingerprint=manifest["base_fingerprint"], linear_shapes={m: tuple(v) for m, v in manifest["lora_modules"].items()})
    source = tmp_path / "src"
    shutil.copytree(adapter, source)
    _store_samples(source, samples)
    shipped = tmp_path / "exported" / "a.onnx_adapter"
    write_onnx_adapter(shipped, onnx_adapter_arrays(load_validated_adapter(source, "a", shapes, max_lora_rank=8).modules))
    replay = PredictionReplay(export, tokenizer, sorted(ends), precision="fp32")
    gate = OnnxAdapterGate(shapes, max_lora_rank=8, cache_dir=tmp_path / "cache", replay=replay)
    gate(shipped, "a")
    assert gate.agreement("a") is None  # no answers beside it yet
    _copy_stored_answers(source, shipped)
    assert (tmp_path / "exported" / "a.training_report.json").is_file()
    gate(shipped, "a")
    assert gate.agreement("a").reproduced == len(samples)
