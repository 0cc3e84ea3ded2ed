"""``--bf16 auto|true|false``: whether training runs in bfloat16 on this machine.

auto is on with CUDA (bf16-capable) or on a CPU whose flags (``/proc/cpuinfo``) include
``amx_bf16`` or ``avx512_bf16``: there bf16 matmuls run several times faster than fp32. This module
knows nothing of models; the trainer turns the answer into TrainingArguments.
"""

from __future__ import annotations

from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def bf16_supported(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """(supported, why) for this machine."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA device " + ("supports" if ok else "lacks") + " bf16"
    found = sorted(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, f"CPU lacks {' and '.join(BF16_CPU_FLAGS)}"


def use_bf16(setting: str, cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """Resolve ``--bf16``: (on?, reason in words)."""
    if setting == "false":
        return False, "--bf16 false"
    if setting == "true":
        return True, "--bf16 true"
    ok, why = bf16_supported(cpuinfo)
    return ok, f"--bf16 auto: {why}"
