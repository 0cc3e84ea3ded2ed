"""Where adapters live in the store, and atomic publication into it.

Clients name adapters, never paths: ``AdapterStore.path_for(name)`` validates the name and checks
(realpath + commonpath) that the folder stays inside the store, so neither ``..`` nor a symlink
can escape it. Publication writes into a dot-prefixed staging folder next to the store (same
filesystem) and renames it into place, so a reader never sees half an adapter. Replacing an
existing adapter swaps the two folders in one step where the OS can (Linux ``renameat2`` with
``RENAME_EXCHANGE``), so the name never disappears; elsewhere the old folder is first moved aside.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loraplex.server.errors import AdapterExists, AdapterInvalid, AdapterNotFound
from loraplex.server.store.names import validate_adapter_name
from loraplex.server.store.peft_config import ADAPTER_CONFIG

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "loraplex.json"


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or
    filesystem cannot, and then nothing was changed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def is_within(root: Path, candidate: Path) -> bool:
    """True when ``candidate`` resolves (symlinks followed) inside ``root``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    return os.path.commonpath([real_root, real]) == real_root and real != real_root


class AdapterStore:
    """A folder of adapters, one sub-folder per adapter name."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_for(self, name: str) -> Path:
        """The folder of adapter ``name`` (may not exist yet); refuses names that escape the store."""
        validate_adapter_name(name)
        path = self.root / name
        if path.exists() and not is_within(self.root, path):
            raise AdapterInvalid(f"adapter {name!r} resolves to {os.path.realpath(path)}, outside the store {self.root}")
        return path

    def names(self) -> list[str]:
        """Adapters present: valid names with an adapter_config.json, hidden folders skipped."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                validate_adapter_name(entry.name)
            except AdapterInvalid:
                continue
            if (entry / ADAPTER_CONFIG).is_file() and is_within(self.root, entry):
                out.append(entry.name)
        return out

    def existing(self, name: str) -> Path:
        path = self.path_for(name)
        if not (path / ADAPTER_CONFIG).is_file():
            raise AdapterNotFound(f"adapter {name!r} not found in {self.root}", param="model")
        return path

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A fresh hidden folder next to the store; removed if the block raises."""
        validate_adapter_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def publish(self, staged: Path, name: str, *, overwrite: bool = False) -> Path:
        """Move a staged adapter folder into place under ``name`` (rename, never copy)."""
        target = self.path_for(name)
        if not (staged / ADAPTER_CONFIG).is_file() or not (staged / ADAPTER_WEIGHTS).is_file():
            raise AdapterInvalid(f"refusing to publish {staged}: it lacks {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS}")
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise AdapterExists(
                    f"adapter {name!r} already exists in {self.root}; pass --overwrite to replace it"
                )
            # A reader sees the old adapter or the new one, never a mix: swap the two folders in one
            # step where possible (the name never disappears), else move the old one aside first.
            if target.is_dir() and not target.is_symlink() and exchange(staged, target):
                shutil.rmtree(staged, ignore_errors=True)  # now holds the old adapter
                return target
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, trash)
            try:
                os.rename(staged, target)
            except BaseException:
                os.rename(trash, target)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staged, target)
        return target
