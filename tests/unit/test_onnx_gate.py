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
