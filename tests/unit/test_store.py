"""The adapter store: atomic publication, overwrite rules, containment, listing."""

import os

import pytest

from loraplex.server.errors import AdapterExists, AdapterInvalid, AdapterNotFound
from loraplex.server.store import AdapterManifest, AdapterStore, read_manifest, write_manifest


def _stage(store, name, marker):
    with store.staging(name) as staged:
        (staged / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1, "target_modules": ["q_proj"]}')
        (staged / "adapter_model.safetensors").write_text(marker)
        return staged


def test_publish_is_a_rename_and_refuses_existing_without_overwrite(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    staged = _stage(store, "a", "one")
    assert staged.name.startswith(".tmp-a-")
    assert store.names() == []  # staging folders are never adapters
    target = store.publish(staged, "a")
    assert not staged.exists() and (target / "adapter_model.safetensors").read_text() == "one"
    assert store.names() == ["a"]
    again = _stage(store, "a", "two")
    with pytest.raises(AdapterExists, match="pass --overwrite"):
        store.publish(again, "a")
    assert (target / "adapter_model.safetensors").read_text() == "one"
    store.publish(again, "a", overwrite=True)
    assert (target / "adapter_model.safetensors").read_text() == "two"
    assert sorted(p.name for p in store.root.iterdir()) == ["a"]  # no trash or staging left behind


def test_staging_is_removed_when_the_block_fails(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    with pytest.raises(RuntimeError):
        with store.staging("a") as staged:
            (staged / "partial").write_text("x")
            raise RuntimeError("killed mid-write")
    assert list(store.root.iterdir()) == []


def test_publish_refuses_incomplete_folder(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    with store.staging("a") as staged:
        (staged / "adapter_config.json").write_text("{}")
        with pytest.raises(AdapterInvalid, match="lacks"):
            store.publish(staged, "a")


def test_symlink_escaping_the_store_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    store = AdapterStore(tmp_path / "adapters")
    store.root.mkdir()
    os.symlink(outside, store.root / "evil")
    with pytest.raises(AdapterInvalid, match="outside the store"):
        store.path_for("evil")
    assert store.names() == []
    with pytest.raises(AdapterInvalid):
        store.path_for("../outside")
    with pytest.raises(AdapterNotFound):
        store.existing("missing")


def test_manifest_round_trip_keeps_unknown_keys(tmp_path):
    manifest = AdapterManifest(
        name="a",
        base_model_id="base",
        base_fingerprint="f" * 24,
        rank=8,
        alpha=16,
        target_modules=("q_proj",),
        weights_sha256="0" * 64,
        metrics={"metric": "accuracy", "base": 0.1, "adapter": 0.9, "eval_examples": 10},
        future_field={"x": 1},
    )
    write_manifest(tmp_path, manifest)
    loaded = read_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.metrics.adapter == 0.9 and loaded.model_extra["future_field"] == {"x": 1}
    assert read_manifest(tmp_path / "nowhere") is None


def test_invalid_manifest_is_refused_with_the_field(tmp_path):
    (tmp_path / "loraplex.json").write_text('{"name": "a", "base_model_id": "b", "base_fingerprint": "f", "rank": 0, "alpha": 1, "target_modules": [], "weights_sha256": "zz"}')
    with pytest.raises(AdapterInvalid, match="rank"):
        read_manifest(tmp_path)
