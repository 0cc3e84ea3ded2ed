"""Base model resolution and fingerprints (tiny random models; no downloads)."""

import json
import shutil

import pytest

from loraplex.server.basemodel import compute_fingerprint, resolve_base
from loraplex.server.errors import BaseModelError
from tests.conftest import make_tiny_llama


def test_fingerprint_is_stable_across_resave_and_names(tmp_path, tiny_base):
    from transformers import AutoModelForCausalLM

    first = compute_fingerprint(tiny_base, use_memo=False)
    resaved = tmp_path / "resaved"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    model.config._name_or_path = "some other name"
    model.save_pretrained(str(resaved), safe_serialization=True, max_shard_size="2MB")  # sharded differently
    assert len(list(resaved.glob("*.safetensors"))) > 1
    assert compute_fingerprint(resaved, use_memo=False) == first
    assert compute_fingerprint(tiny_base) == first  # memoized path agrees


def test_fingerprint_changes_with_weights_or_config(tmp_path, smol_tokenizer_dir, tiny_base):
    other = make_tiny_llama(tmp_path / "other", smol_tokenizer_dir, seed=1)
    assert compute_fingerprint(other, use_memo=False) != compute_fingerprint(tiny_base, use_memo=False)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_base, changed)
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (changed / "config.json").write_text(json.dumps(config))
    assert compute_fingerprint(changed, use_memo=False) != compute_fingerprint(tiny_base, use_memo=False)


def test_resolve_local_folder(tiny_base):
    ref = resolve_base(str(tiny_base))
    assert ref.path == tiny_base.resolve() and len(ref.fingerprint) == 24 and not ref.is_embedded


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p / "missing", "not found: no such folder"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
    ],
)
def test_bad_base_paths_give_one_clear_line(tmp_path, make, fragment):
    with pytest.raises(BaseModelError) as info:
        resolve_base(str(make(tmp_path)))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(BaseModelError, match="pickled weights are never loaded"):
        resolve_base(str(folder))
