"""Read peft's ``adapter_config.json`` into our own small, frozen dataclass.

Only what loraplex supports is accepted; anything else is refused with a message that names the
field and its value (silently serving base-model output for an unsupported adapter is the worst
bug class in this field). Checks that need the base model (module names, shapes, fingerprint)
belong to the server's registry, not here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.server.errors import AdapterInvalid

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    """The parts of a peft LoRA config that change what the adapter computes."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def scaling(self, rank: int, alpha: float | None = None) -> float:
        """LoRA output scale for one module of this rank (rsLoRA: alpha / sqrt(r))."""
        alpha = self.lora_alpha if alpha is None else alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])


def _fail(path: Path, message: str, param: str | None = None) -> AdapterInvalid:
    return AdapterInvalid(f"{path}: {message}", param=param)


def parse_lora_spec(raw: dict, *, source: Path) -> LoraSpec:
    """Validate a loaded adapter_config.json dict."""
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _fail(source, f"peft_type={raw.get('peft_type')!r} is not supported; only LORA adapters are")
    if raw.get("use_dora"):
        raise _fail(source, "use_dora=true (DoRA) is not supported")
    if raw.get("modules_to_save"):
        raise _fail(source, f"modules_to_save={raw['modules_to_save']!r} is not supported (full-weight modules)")
    if raw.get("bias", "none") not in ("none", None):
        raise _fail(source, f"bias={raw.get('bias')!r} is not supported; only bias='none'")
    for unsupported in ("layer_replication", "megatron_config"):
        if raw.get(unsupported):
            raise _fail(source, f"{unsupported}={raw[unsupported]!r} is not supported")
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise _fail(source, f"r={r!r} must be a positive integer", "r")
    alpha = raw.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise _fail(source, f"lora_alpha={alpha!r} must be a positive number", "lora_alpha")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        # peft also accepts a regex or "all-linear"; the registry resolves names against the base.
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise _fail(source, f"target_modules={targets!r} must be a non-empty list of module names")
    rank_pattern = raw.get("rank_pattern") or {}
    for key, value in rank_pattern.items():
        if not isinstance(value, int) or value <= 0:
            raise _fail(source, f"rank_pattern[{key!r}]={value!r} must be a positive integer")
    alpha_pattern = raw.get("alpha_pattern") or {}
    return LoraSpec(
        r=r,
        lora_alpha=float(alpha),
        target_modules=tuple(sorted(targets)),
        rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        use_rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        task_type=raw.get("task_type"),
    )


def read_lora_spec(adapter_dir: str | Path) -> LoraSpec:
    """Read and validate ``<adapter_dir>/adapter_config.json``."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterInvalid(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterInvalid(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise AdapterInvalid(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return parse_lora_spec(raw, source=path)
