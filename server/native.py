"""Building, trusting and loading the engine's small C libraries (no torch headers).

A library is compiled once with the system C compiler (``cc``/``gcc``, or ``$CC``) into a folder,
named by a hash of its source and flags, published atomically (compile to a temp name in the same
folder, then rename), and loaded with ctypes. The folder is ``LORAPLEX_KERNEL_DIR`` when set (the
CPU image ships its libraries there, built at image build time) or ``<tmp>/loraplex-kernels-<uid>``.
Whatever is found there is loaded into the server, so both the folder and the file must be real
(not symlinks), owned by this user (or by root, for an explicitly named folder only) and closed
to writes by others; anything else is refused with the reason.

Owns: the folder and its checks, the compiler call, the CPU-feature check, and ``Library`` (one
library loaded once, with the reason kept when it cannot be). Knows nothing of LoRA,
tensors or models: a name, C source, compiler flags and the /proc/cpuinfo flags they need.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from typing import Callable

log = logging.getLogger(__name__)


def _trusted(path: str, *, explicit: bool, kind: str) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise RuntimeError(f"{kind} {path} is a symlink: not loading code through it")
    owners = (os.getuid(), 0) if explicit else (os.getuid(),)
    if info.st_uid not in owners or info.st_mode & 0o022:
        raise RuntimeError(f"{kind} {path} is not owned by this user or is writable by others: not loading code from it")


def kernel_dir() -> str:
    """The library folder, created (mode 0700) if missing, after the trust checks."""
    explicit = os.environ.get("LORAPLEX_KERNEL_DIR")
    base = explicit or os.path.join(tempfile.gettempdir(), f"loraplex-kernels-{os.getuid()}")
    if not os.path.lexists(base):
        os.makedirs(base, mode=0o700, exist_ok=True)
    _trusted(base, explicit=bool(explicit), kind="kernel folder")
    return base


def cpu_missing(flags: tuple[str, ...]) -> str | None:
    """None when /proc/cpuinfo lists every flag, else what is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "no /proc/cpuinfo to check the CPU's instructions"
    missing = [flag for flag in flags if flag not in have]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def library_path(name: str, source: str, cflags: list[str]) -> str:
    """Where the library of this source and these flags lives."""
    key = hashlib.sha256("\0".join([source, " ".join(cflags)]).encode()).hexdigest()[:16]
    return os.path.join(kernel_dir(), f"{name}_{key}.so")


def build(name: str, source: str, cflags: list[str]) -> str:
    """Compile the library unless it exists (whatever this CPU is: the flags name the ISA);
    returns its path."""
    path = library_path(name, source, cflags)
    if os.path.lexists(path):
        return path
    # gcc first: its -fopenmp links libgomp, the runtime torch's CPU wheels carry (same soname),
    # where clang's would link LLVM's libomp, a second OpenMP runtime (refused at load)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError(f"no C compiler (cc/gcc) on PATH and no prebuilt {path}")
    fd, src = tempfile.mkstemp(suffix=".c", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(source)
    tmp = src[:-2] + ".so"
    try:
        done = subprocess.run([cc, *cflags, "-o", tmp, src], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # atomic: concurrent builders each publish a whole file
    finally:
        for leftover in (src, tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path


def load(name: str, source: str, cflags: list[str], cpu_flags: tuple[str, ...]) -> ctypes.CDLL:
    """Check the CPU, build if needed, check the file, load it."""
    missing = cpu_missing(cpu_flags)
    if missing:
        raise RuntimeError(missing)
    path = build(name, source, cflags)
    _trusted(path, explicit=bool(os.environ.get("LORAPLEX_KERNEL_DIR")), kind="kernel library")
    lib = ctypes.CDLL(path)
    if "-fopenmp" in cflags:
        foreign = _foreign_openmp()
        if foreign:
            raise RuntimeError(f"{path} brought in {foreign}, an OpenMP runtime other than torch's libgomp (build it with gcc: CC=gcc)")
    return lib


def _foreign_openmp() -> str | None:
    """An OpenMP runtime other than GNU libgomp mapped into this process (LLVM's libomp, Intel's
    libiomp5), or None: two runtimes would each keep a team of spinning threads."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                name = os.path.basename(line.split()[-1]) if "/" in line else ""
                if name.startswith(("libomp.so", "libiomp5")):
                    return name
    except OSError:
        return None
    return None


class Library:
    """One C library loaded on first use: ``available()`` builds and loads it once (thread-safe)
    and is False, with the reason in ``why_not`` and one warning in the log, when the CPU lacks
    the flags, there is no compiler, the build fails, the folder is not trusted or ``check``
    (called with the loaded library: set argtypes, compare limits) raises. ``fallback`` says in
    that warning what runs instead."""

    def __init__(self, name: str, source: str, cflags: list[str], cpu_flags: tuple[str, ...], check: Callable[[ctypes.CDLL], None], *, fallback: str) -> None:
        self.name, self.source, self.cflags, self.cpu_flags = name, source, cflags, cpu_flags
        self._check, self._fallback = check, fallback
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self.why_not: str | None = None

    def build(self) -> str:
        """Compile now (no CPU check: an image build host may differ); the library's path."""
        return build(self.name, self.source, self.cflags)

    def available(self) -> bool:
        if self._tried:
            return self._lib is not None
        with self._lock:
            if not self._tried:
                try:
                    lib = load(self.name, self.source, self.cflags, self.cpu_flags)
                    self._check(lib)
                    self._lib = lib
                except Exception as exc:  # noqa: BLE001 - any failure means: keep the torch path
                    self.why_not = f"{type(exc).__name__}: {exc}"
                    log.warning("%s kernel unavailable (%s); %s", self.name, self.why_not, self._fallback)
                self._tried = True
        return self._lib is not None

    def loaded(self) -> ctypes.CDLL:
        """The library; raises RuntimeError with the reason when it is unavailable."""
        if self._lib is None and not self.available():
            raise RuntimeError(f"the {self.name} kernel is unavailable: {self.why_not}")
        return self._lib  # type: ignore[return-value]
