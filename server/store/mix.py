"""Named mixes: several adapters of the store written as ONE ordinary peft LoRA adapter, exactly.

For every module, the mix's LoRA is the members' LoRAs side by side (rank concatenation, peft's
``add_weighted_adapter(..., combination_type="cat")``)::

    A_mix = [A_1; A_2; ...]                          [r_1 + r_2 + ..., in]
    B_mix = [w_1 s_1 B_1, w_2 s_2 B_2, ...]          [out, r_1 + r_2 + ...]
    B_mix A_mix x = sum_i w_i s_i B_i A_i x          (s_i: member i's own LoRA scale there)

so the mix's own scale must be exactly 1: ``lora_alpha`` = ``r`` per module (``rank_pattern``
and ``alpha_pattern`` with the same values where a module's summed rank differs from ``r``).
A module only some members adapt gets only their ranks (no zero padding). The weight goes into
B (peft puts it into A: the product is the same). ``target_modules`` lists the layer suffixes
when the mix adapts every base layer with those suffixes, else the full module names (peft
matches both exactly).

The folder is staged, checked by the same gate as any adapter (``validation.py``) and published
atomically (``layout.AdapterStore.publish``); ``loraplex.json`` holds the recipe (members,
weights, each member's weights sha256 and content digest). Safetensors only, read and written.
Knows the store's files and tensors; nothing of servers, engines or requests.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraplex.server.errors import AdapterExists, AdapterInvalid
from loraplex.server.store.fingerprint import content_digest
from loraplex.server.store.layout import ADAPTER_WEIGHTS, AdapterStore
from loraplex.server.store.manifest import AdapterManifest, MixMember, MixRecipe, write_manifest
from loraplex.server.store.peft_config import ADAPTER_CONFIG
from loraplex.server.store.validation import BaseShapes, ValidatedAdapter, load_validated_adapter
from loraplex.server.store.weights import sha256_file

#: how peft names a module's LoRA tensors in adapter_model.safetensors
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class MixedAdapter:
    """The result before it is written: per-module tensors and the peft config."""

    tensors: dict[str, object]  # peft key -> torch.Tensor (fp32, contiguous)
    config: dict
    ranks: dict[str, int]  # module -> summed rank
    target_modules: tuple[str, ...]


def _targets(modules: Sequence[str], base: BaseShapes) -> tuple[str, ...]:
    """Suffixes when they select exactly ``modules`` among the base's layers, else full names."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    selected = {m for m in base.linear_shapes if m.rsplit(".", 1)[-1] in suffixes}
    return tuple(suffixes) if selected == set(modules) else tuple(sorted(modules))


def combine(members: Sequence[tuple[ValidatedAdapter, float]], base: BaseShapes, *, max_lora_rank: int) -> MixedAdapter:
    """Rank-concatenate validated adapters with their weights (see the module docstring)."""
    import torch

    if not members:
        raise AdapterInvalid("a mix needs at least one member")
    modules = sorted({m for adapter, _ in members for m in adapter.modules})
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module in modules:
        parts = [(adapter.modules[module], weight) for adapter, weight in members if module in adapter.modules]
        a = torch.cat([lora.a.float() for lora, _ in parts], dim=0)  # [sum r_i, in]
        b = torch.cat([lora.b.float() * (weight * lora.scale) for lora, weight in parts], dim=1)  # [out, sum r_i]
        rank = int(a.shape[0])
        if rank > max_lora_rank:
            raise AdapterInvalid(
                f"the mix has rank {rank} at {module} (the members' ranks add up: "
                f"{' + '.join(str(lora.rank) for lora, _ in parts)}), above --max-lora-rank {max_lora_rank}",
                param="max_lora_rank",
            )
        ranks[module] = rank
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: rank for module, rank in ranks.items() if rank != r}
    targets = _targets(modules, base)
    first = members[0][0].spec
    config = {
        "peft_type": "LORA",
        "task_type": (first.task_type if first is not None else None) or "CAUSAL_LM",
        "base_model_name_or_path": first.base_model_name_or_path if first is not None else None,
        "r": r,
        "lora_alpha": r,  # scale alpha / r = 1: each member's own scale is already in B
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return MixedAdapter(tensors=tensors, config=config, ranks=ranks, target_modules=targets)


def write_mix(
    store: AdapterStore,
    name: str,
    members: Sequence[tuple[str, float]],
    base: BaseShapes,
    *,
    base_model_id: str,
    max_lora_rank: int,
    overwrite: bool = False,
    loraplex_version: str = "",
) -> Path:
    """Read ``members`` ((adapter name, weight), from the store, each validated against
    ``base``), write their exact rank-concatenated mix as adapter ``name`` and publish it
    atomically. Returns the published folder. AdapterExists without ``overwrite``;
    AdapterInvalid for a member the gate refuses, a name used twice, a mix named after one of
    its members, or a summed rank above ``max_lora_rank``."""
    from safetensors.torch import save_file

    target = store.path_for(name)
    if target.exists() and not overwrite:
        raise AdapterExists(f"adapter {name!r} already exists in {store.root}; pass --overwrite to replace it")
    names = [member for member, _ in members]
    if len(set(names)) != len(names):
        raise AdapterInvalid(f"the mix names an adapter twice: {', '.join(names)}", param="members")
    if name in names:
        raise AdapterInvalid(f"the mix {name!r} would replace its own member {name!r}; give the mix another name", param="name")
    validated: list[tuple[ValidatedAdapter, float]] = []
    recipe = []
    for member, weight in members:
        folder = store.existing(member)
        adapter = load_validated_adapter(folder, member, base, max_lora_rank=max_lora_rank)
        validated.append((adapter, float(weight)))
        recipe.append(
            MixMember(
                name=member,
                weight=float(weight),
                rank=adapter.max_rank,
                weights_sha256=adapter.weights_sha256,
                content_sha256=content_digest(folder),
                base_fingerprint=adapter.manifest.base_fingerprint if adapter.manifest else None,
            )
        )
    mixed = combine(validated, base, max_lora_rank=max_lora_rank)
    with store.staging(name) as staged:
        (staged / ADAPTER_CONFIG).write_text(json.dumps(mixed.config, indent=2) + "\n")
        save_file(mixed.tensors, str(staged / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_manifest(
            staged,
            AdapterManifest(
                name=name,
                task="mix of " + " + ".join(f"{m.name} x {m.weight:g}" for m in recipe),
                base_model_id=base_model_id,
                base_fingerprint=base.fingerprint,
                rank=max(mixed.ranks.values()),
                alpha=float(mixed.config["lora_alpha"]),
                target_modules=mixed.target_modules,
                method="mix",
                weights_sha256=sha256_file(staged / ADAPTER_WEIGHTS),
                mix=MixRecipe(members=tuple(recipe)),
                loraplex_version=loraplex_version,
            ),
        )
        load_validated_adapter(staged, name, base, max_lora_rank=max_lora_rank)  # the gate every adapter passes
        for path in [staged, *staged.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        return store.publish(staged, name, overwrite=overwrite)
