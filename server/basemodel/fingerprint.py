"""The base-model fingerprint: a stable hash that says "these exact weights and this config".

fingerprint = sha256 over
  * the model config (config.json minus keys that do not change the computation:
    names, library versions, dtype, cache flags), as canonical JSON;
  * for every tensor in the safetensors weight files, sorted by name: name, dtype, shape and
    the sha256 of its raw bytes (read by offset from the safetensors header, no framework needed).

It does not depend on file sharding, file names or metadata, so re-saving the same weights
gives the same fingerprint. Only safetensors weights are fingerprinted (pickled ``.bin``
files are never opened by loraplex). Results are memoized in ``<cache>/fingerprints.json``
keyed by the folder's real path and the size + mtime of its files.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from filelock import FileLock

from loraplex.server.basemodel.cache import cache_root
from loraplex.server.errors import BaseModelError

#: config keys that name or describe a checkpoint without changing what it computes
_IGNORED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "quantization_config",
        "_commit_hash",
        "architectures",
    }
)
FINGERPRINT_LENGTH = 24  # hex characters kept (96 bits)
_CHUNK = 1 << 22


def canonical_config(config: dict) -> str:
    """The config as canonical JSON, without keys that do not affect computation."""
    kept = {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors weight files of a model folder (sharded or not), sorted."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {', '.join(others)}: pickled weights are never loaded; re-save with safetensors)" if others else ""
        raise BaseModelError(f"base model folder {model_dir} has no *.safetensors weight files{hint}")
    return files


def _read_safetensors_header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise BaseModelError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > 100 * 1024 * 1024:
            raise BaseModelError(f"{path} is not a safetensors file (header length {header_len} > 100 MiB)")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as exc:
            raise BaseModelError(f"{path} is not a safetensors file (header is not JSON: {exc})") from exc
    return 8 + header_len, header


def _tensor_digests(path: Path) -> dict[str, str]:
    """name -> 'dtype|shape|sha256(bytes)' for each tensor of one safetensors file."""
    data_start, header = _read_safetensors_header(path)
    out: dict[str, str] = {}
    with path.open("rb") as fh:
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            fh.seek(data_start + begin)
            digest = hashlib.sha256()
            remaining = end - begin
            while remaining > 0:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    raise BaseModelError(f"{path} is truncated (tensor {name} ends past the end of the file)")
                digest.update(chunk)
                remaining -= len(chunk)
            out[name] = f"{info['dtype']}|{info['shape']}|{digest.hexdigest()}"
    return out


def _stat_key(model_dir: Path, files: list[Path]) -> str:
    parts = [str(model_dir.resolve())]
    for f in [model_dir / "config.json", *files]:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def compute_fingerprint(model_dir: str | Path, *, use_memo: bool = True) -> str:
    """Fingerprint of a Hugging Face model folder with config.json and safetensors weights."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise BaseModelError(f"base model folder {model_dir} has no config.json (expected a Hugging Face model folder)")
    files = weight_files(model_dir)
    memo_path = cache_root() / "fingerprints.json"
    key = _stat_key(model_dir, files)
    if use_memo and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
            if key in memo:
                return memo[key]
        except ValueError:
            pass
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise BaseModelError(f"{config_path} is not valid JSON: {exc}") from exc
    digest = hashlib.sha256()
    digest.update(canonical_config(config).encode())
    tensors: dict[str, str] = {}
    for f in files:
        tensors.update(_tensor_digests(f))
    for name in sorted(tensors):
        digest.update(f"\n{name}|{tensors[name]}".encode())
    fingerprint = digest.hexdigest()[:FINGERPRINT_LENGTH]
    if use_memo:
        try:
            _remember(memo_path, key, fingerprint)
        except OSError:  # a read-only cache (container image) still works, just without the memo
            pass
    return fingerprint


def _remember(memo_path: Path, key: str, fingerprint: str) -> None:
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(memo_path) + ".lock"):
        memo = {}
        if memo_path.is_file():
            try:
                memo = json.loads(memo_path.read_text())
            except ValueError:
                memo = {}
        memo[key] = fingerprint
        tmp = memo_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(memo, indent=0))
        tmp.replace(memo_path)
