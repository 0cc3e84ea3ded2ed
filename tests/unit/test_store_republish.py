"""The store's side of republishing: the signature and digest cover config, weights and manifest
together, a half-written weights file is recognised as incomplete, and publishing over an
existing adapter swaps the folders so the name never disappears (readers see old or new)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from loraplex.server.store import AdapterStore
from loraplex.server.store.fingerprint import content_digest, incomplete_reason, signature
from tests.oracle import make_random_adapter


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("republish-store")
    return [make_random_adapter(tiny_base, root / f"v{i}", seed=i + 31, r=2 + 2 * i) for i in range(2)]


def test_store_fingerprint_covers_config_weights_and_manifest(adapters, tmp_path):
    folder = tmp_path / "x"
    shutil.copytree(adapters[0], folder)
    sig, digest = signature(folder), content_digest(folder)
    assert incomplete_reason(folder) is None
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 64}))
    assert signature(folder) != sig and content_digest(folder) != digest  # config-only change
    weights = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "header accounts for" in incomplete_reason(folder) or "header claims" in incomplete_reason(folder)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    assert incomplete_reason(folder) is None
    (folder / "loraplex.json").write_text("{")
    assert "loraplex.json" in incomplete_reason(folder)
    (folder / "adapter_config.json").unlink()
    assert signature(folder) is None


_READER = """
import os, sys, time
path, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
missing = checks = 0
while time.monotonic() < end:
    checks += 1
    missing += not os.path.exists(path)
print(missing, checks)
"""


def test_publishing_over_an_adapter_never_hides_it(adapters, tmp_path):
    """A reader in another process checks the adapter's config exists, as fast as it can, while
    it is republished over and over (before the folder swap, ~5% of its checks found nothing)."""
    store = AdapterStore(tmp_path / "adapters")

    def publish(source, **kw):
        with store.staging("x") as staged:
            for f in source.iterdir():
                shutil.copy(f, staged / f.name)
            store.publish(staged, "x", **kw)

    publish(adapters[0])
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(store.root / "x" / "adapter_config.json"), "2"], stdout=subprocess.PIPE, text=True)
    publishes, deadline = 0, time.monotonic() + 1.5
    while time.monotonic() < deadline:
        publish(adapters[publishes % 2], overwrite=True)
        publishes += 1
    missing, checks = map(int, reader.communicate(timeout=30)[0].split())
    assert publishes >= 20 and checks > 1000, (publishes, checks)
    assert missing == 0, f"{missing} of {checks} checks found no adapter during {publishes} publishes"
    assert [p.name for p in store.root.iterdir()] == ["x"]  # no staging or trash folder left behind
    assert json.loads((store.root / "x" / "adapter_config.json").read_text())["r"] in (2, 4)
