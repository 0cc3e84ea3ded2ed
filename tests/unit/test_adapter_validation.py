"""Validation at load: every refusal names the value; a valid adapter's tensors compute what
peft computes (peft's LoRA layer is the independent reference)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.basemodel import compute_fingerprint
from loraplex.server.errors import AdapterInvalid, AdapterNotFound
from loraplex.server.registry import BaseShapes, load_validated_adapter
from loraplex.server.store.validation import resolve_adapter_path
from loraplex.server.store import AdapterManifest, AdapterStore, sha256_file, write_manifest
from tests.conftest import make_tiny_llama

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base_model(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_base))


@pytest.fixture(scope="module")
def shapes(tiny_base, base_model):
    return BaseShapes.from_model(base_model, compute_fingerprint(tiny_base, use_memo=False))


def _peft_adapter(tiny_base, folder, *, r=4, targets=("q_proj", "v_proj"), seed=0, **extra):
    """A standard peft LoRA folder with random (non-zero) A and B, as any peft user would save."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(folder))
    return peft_model


def _manifest(folder, fingerprint, **overrides):
    fields = dict(name=folder.name, base_model_id="tiny", base_fingerprint=fingerprint, rank=4, alpha=8,
                  target_modules=("q_proj", "v_proj"), weights_sha256=sha256_file(folder / WEIGHTS))
    fields.update(overrides)
    write_manifest(folder, AdapterManifest(**fields))


def test_valid_adapter_computes_what_peft_computes(tmp_path, tiny_base, shapes):
    peft_model = _peft_adapter(tiny_base, tmp_path / "a", use_rslora=True, rank_pattern={"v_proj": 2})
    _manifest(tmp_path / "a", shapes.fingerprint)
    adapter = load_validated_adapter(tmp_path / "a", "a", shapes, max_lora_rank=8)
    assert len(adapter.modules) == 4  # 2 layers x (q_proj, v_proj)
    x = torch.randn(3, 64)
    for module_name, weights in adapter.modules.items():
        peft_layer = peft_model.base_model.model.get_submodule(module_name)
        base_out = peft_layer.base_layer(x)
        ours = base_out + weights.scale * (x @ weights.a.T) @ weights.b.T
        with torch.no_grad():
            torch.testing.assert_close(ours, peft_layer(x), rtol=1e-5, atol=1e-5)
    assert {m.rank for k, m in adapter.modules.items() if k.endswith("v_proj")} == {2}


def test_plain_peft_folder_without_manifest_is_valid(tmp_path, tiny_base, shapes):
    _peft_adapter(tiny_base, tmp_path / "plain")
    adapter = load_validated_adapter(tmp_path / "plain", "plain", shapes, max_lora_rank=64)
    assert adapter.manifest is None and adapter.max_rank == 4


def test_refusals_name_the_value(tmp_path, tiny_base, smol_tokenizer_dir, shapes):
    folder = tmp_path / "a"
    _peft_adapter(tiny_base, folder, r=8)

    def refused(fragment, max_rank=64):
        with pytest.raises(AdapterInvalid) as info:
            load_validated_adapter(folder, "a", shapes, max_lora_rank=max_rank)
        assert fragment in str(info.value), str(info.value)

    refused("has rank 8, above --max-lora-rank 4", max_rank=4)
    _manifest(folder, "0" * 24, rank=8)
    refused(f"trained on base fingerprint {'0' * 24} (tiny); the loaded base is {shapes.fingerprint}")
    _manifest(folder, shapes.fingerprint, rank=8, weights_sha256="f" * 64)
    refused("the manifest says ffffffffffffffff")
    (folder / "loraplex.json").unlink()

    tensors = load_file(str(folder / WEIGHTS))
    renamed = {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in tensors.items()}
    save_file(renamed, str(folder / WEIGHTS))
    refused("target module model.layers.7.self_attn.q_proj does not exist in the base")

    save_file({k: v for k, v in tensors.items() if "lora_B" not in k or "layers.0.self_attn.q_proj" not in k}, str(folder / WEIGHTS))
    refused("has lora_A but not both A and B")

    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, str(folder / WEIGHTS))
    refused("unexpected tensor 'base_model.model.lm_head.weight'")

    broken = dict(tensors)
    key = next(k for k in tensors if "lora_A" in k)
    broken[key] = torch.full_like(tensors[key], float("nan"))
    save_file(broken, str(folder / WEIGHTS))
    refused("NaN or infinite weights")

    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    refused("not a readable safetensors file")

    # an adapter made for a wider base: shapes do not fit
    wide = make_tiny_llama(tmp_path / "wide", smol_tokenizer_dir, hidden=128)
    _peft_adapter(wide, tmp_path / "wide-adapter")
    shutil.copy(tmp_path / "wide-adapter" / WEIGHTS, folder / WEIGHTS)
    refused("the base layer needs A (r, 64) and B (64, r)")


def test_pickled_weights_are_refused_without_being_opened(tmp_path, tiny_base, shapes):
    folder = tmp_path / "p"
    _peft_adapter(tiny_base, folder)
    (folder / WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # a malicious pickle
    with pytest.raises(AdapterInvalid, match="found adapter_model.bin: pickled weights are refused"):
        load_validated_adapter(folder, "p", shapes, max_lora_rank=64)


def test_unsupported_peft_features_are_refused(tmp_path, tiny_base, shapes):
    folder = tmp_path / "d"
    _peft_adapter(tiny_base, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterInvalid, match="use_dora=true"):
        load_validated_adapter(folder, "d", shapes, max_lora_rank=64)


def test_paths_stay_inside_the_store_unless_allowed(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    (store.root / "a").mkdir(parents=True)
    (store.root / "a" / "adapter_config.json").write_text("{}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert resolve_adapter_path(store, "a", None, allow_external=False) == store.root / "a"
    assert resolve_adapter_path(store, "x", "a", allow_external=False) == store.root / "a"
    with pytest.raises(AdapterInvalid, match="contains '..'"):
        resolve_adapter_path(store, "x", "../elsewhere", allow_external=False)
    with pytest.raises(AdapterInvalid, match="outside the adapters dir"):
        resolve_adapter_path(store, "x", str(outside), allow_external=False)
    assert resolve_adapter_path(store, "x", str(outside), allow_external=True) == outside
    with pytest.raises(AdapterInvalid, match="is invalid"):
        resolve_adapter_path(store, "bad/name", None, allow_external=False)
    with pytest.raises(AdapterNotFound):
        resolve_adapter_path(store, "missing", None, allow_external=False)
