"""Adapter weight files: safetensors only, hashed, never unpickled."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_SHA_MEMO: dict[tuple[int, ...], str] = {}


def sha256_file_memo(path: str | Path) -> str:
    """``sha256_file`` remembered per (device, inode, size, mtime, ctime) for this process: a file
    republished by atomic rename is a new inode, and any write in place changes its ctime (which,
    unlike mtime, ``touch``/``cp -p``/``rsync -t`` cannot set back), so either is hashed again."""
    st = Path(path).stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _SHA_MEMO.get(key)
    if digest is None:
        digest = _SHA_MEMO[key] = sha256_file(path)
    return digest
