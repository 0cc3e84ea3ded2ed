"""What a store entry looks like on disk right now: a cheap signature (for "did it change, and
has it settled?"), a completeness check (are all files whole?) and a content digest (is it really
a different adapter?).

An adapter is its config, its weights and its optional manifest together: all three are part of
the signature and of the digest, so a config-only change (``lora_alpha`` 16 -> 64) counts as a
change, and a folder swapped in by rename (new inodes) does too. Knows files, never models.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.store.layout import ADAPTER_WEIGHTS, MANIFEST
from loraplex.server.store.peft_config import ADAPTER_CONFIG
from loraplex.server.store.weights import sha256_file_memo

#: the files that make up one adapter folder (the manifest is optional)
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)


@dataclass(frozen=True)
class StoreSignature:
    """stat() of the entry and of each of its files: (inode, size, mtime ns, ctime ns), plus the
    sha256 of the small JSON files, or None for an absent optional file. Any write in place changes
    a ctime and a rename an inode; hashing the JSON files also catches a same-size config edit
    within one timestamp tick. The weights are not read (they may be large)."""

    entry: tuple[int, int]
    files: tuple[tuple[str, tuple | None], ...]


def _stat(path: Path, *, read: bool = False) -> tuple | None:
    try:
        st = os.stat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if read else ""
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)


def signature(path: Path) -> StoreSignature | None:
    """The entry's signature; None when it is gone or lacks its config or weights."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if path.is_file():  # a single-file adapter (an exported .onnx_adapter)
        file = _stat(path)
        return None if file is None else StoreSignature((st.st_dev, st.st_ino), ((path.name, file),))
    files = tuple((name, _stat(path / name, read=name != ADAPTER_WEIGHTS)) for name in ADAPTER_FILES)
    if any(stat is None for name, stat in files if name != MANIFEST):
        return None
    return StoreSignature((st.st_dev, st.st_ino), files)


def incomplete_reason(path: Path) -> str | None:
    """Why the entry is not (yet) a whole adapter, or None: the config must be a JSON object,
    the manifest (if any) JSON, and the weights a safetensors file whose header accounts for
    exactly its size (a file still being written is shorter). Reads headers only."""
    if path.is_file():
        return None
    for name in (ADAPTER_CONFIG, MANIFEST):
        file = path / name
        if name == MANIFEST and not file.exists():
            continue
        try:
            data = json.loads(file.read_bytes())
        except (OSError, ValueError) as exc:
            return f"{name} is not readable JSON ({type(exc).__name__})"
        if not isinstance(data, dict):
            return f"{name} is not a JSON object"
    return _safetensors_incomplete(path / ADAPTER_WEIGHTS)


def _safetensors_incomplete(weights: Path) -> str | None:
    try:
        with weights.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                return f"{ADAPTER_WEIGHTS} has {size} bytes: shorter than a safetensors header"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                return f"{ADAPTER_WEIGHTS} header claims {header_len} bytes but the file has {size}"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{ADAPTER_WEIGHTS} header is unreadable ({type(exc).__name__})"
    if not isinstance(header, dict):
        return f"{ADAPTER_WEIGHTS} header is not a JSON object"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            return f"{ADAPTER_WEIGHTS} header entry {key!r} has no data_offsets"
    expected = 8 + header_len + end
    if expected != size:
        return f"{ADAPTER_WEIGHTS} has {size} bytes; its header accounts for {expected}"
    return None


def content_digest(path: Path) -> str:
    """sha256 over the bytes of config, weights and manifest (absent manifest = empty): equal
    digests mean the same adapter, whatever happened to inodes and timestamps."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(sha256_file_memo(path).encode())
        return digest.hexdigest()
    for name in ADAPTER_FILES:
        file = path / name
        if name == ADAPTER_WEIGHTS:
            part = sha256_file_memo(file)
        elif file.exists():
            part = hashlib.sha256(file.read_bytes()).hexdigest()
        else:
            part = "-"
        digest.update(f"{name}:{part}\n".encode())
    return digest.hexdigest()
