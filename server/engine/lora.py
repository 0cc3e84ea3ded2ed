"""Mixed-adapter LoRA in one forward pass.

Every targeted Linear of the base (plain ``nn.Linear`` or a bitsandbytes ``Linear4bit`` /
``Linear8bitLt``) is wrapped by :class:`MultiLoraLinear`, which computes

    y = base(x) + (x @ A[slot[row]]) @ B[slot[row]]        (scale folded into B)

for each row of the batch, from stacked, rank-padded tensors of the resident adapters: slot 0 is
"no adapter" (zeros). The per-row slot vector is set once per forward on the shared
:class:`LoraBatchContext`; gathered per-row A/B are cached until the batch composition changes,
so a steady decode step costs two batched matmuls per module. A batch whose rows are all slot 0
skips LoRA entirely. This module knows nothing of requests, tokens or files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn


@dataclass
class LoraBatchContext:
    """Per-forward state shared by every wrapped layer: the slot of each row."""

    slots: torch.Tensor | None = None  # [batch] long; None or all-zero = base only
    version: int = 0  # bumped whenever slots or the stacks change
    any_adapter: bool = False

    def set_slots(self, slots: Sequence[int]) -> None:
        self.slots = torch.tensor(list(slots), dtype=torch.long)
        self.any_adapter = any(s != 0 for s in slots)
        self.version += 1


class MultiLoraLinear(nn.Module):
    """A base Linear plus stacked LoRA weights of every resident adapter."""

    def __init__(self, base: nn.Module, name: str, context: LoraBatchContext) -> None:
        super().__init__()
        self.base_layer = base
        self.module_name = name
        self.context = context
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.stack_a: torch.Tensor | None = None  # [slots, in, r]
        self.stack_b: torch.Tensor | None = None  # [slots, r, out]
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def set_stacks(self, stack_a: torch.Tensor | None, stack_b: torch.Tensor | None) -> None:
        self.stack_a, self.stack_b = stack_a, stack_b
        self._gathered = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ctx = self.context
        if not ctx.any_adapter or self.stack_a is None:
            return y
        if self._gathered is None or self._gathered[0] != ctx.version:
            slots = ctx.slots
            self._gathered = (ctx.version, self.stack_a.index_select(0, slots), self.stack_b.index_select(0, slots))
        _, a, b = self._gathered
        # x: [batch, seq, in] @ a: [batch, in, r] -> [batch, seq, r] @ b: [batch, r, out] -> [batch, seq, out]
        delta = torch.bmm(torch.bmm(x.to(a.dtype), a), b)
        return y + delta.to(y.dtype)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear


def inject_multi_lora(model: nn.Module, context: LoraBatchContext, exclude: Sequence[str] = ("lm_head",)) -> dict[str, MultiLoraLinear]:
    """Wrap every Linear of the model (except ``exclude``) in place; returns name -> wrapper."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if _is_linear(module) and name.rsplit(".", 1)[-1] not in exclude
    ]
    wrapped: dict[str, MultiLoraLinear] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(module, name, context)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


@dataclass
class SlotTable:
    """Which adapter holds which slot (slot 0 = base), and the stacks built from them."""

    names: list[str] = field(default_factory=list)  # index i -> slot i + 1

    def slot_of(self, name: str | None) -> int:
        return 0 if name is None else self.names.index(name) + 1


def rebuild_stacks(
    layers: Mapping[str, MultiLoraLinear],
    adapters: Sequence[tuple[str, Mapping[str, object]]],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SlotTable:
    """Stack (name, {module: LoraModuleWeights}) into every layer, padded to the largest rank.

    Modules an adapter does not target get zeros in its slot. Ranks are padded with zero rows /
    columns, which leaves each adapter's output exactly unchanged.
    """
    table = SlotTable(names=[name for name, _ in adapters])
    if not adapters:
        for layer in layers.values():
            layer.set_stacks(None, None)
        return table
    for module_name, layer in layers.items():
        per_slot = [weights.get(module_name) for _, weights in adapters]
        if all(w is None for w in per_slot):
            layer.set_stacks(None, None)
            continue
        rank = max(w.rank for w in per_slot if w is not None)
        n = len(per_slot) + 1
        stack_a = torch.zeros(n, layer.in_features, rank, dtype=dtype)
        stack_b = torch.zeros(n, rank, layer.out_features, dtype=dtype)
        for slot, w in enumerate(per_slot, start=1):
            if w is None:
                continue
            r = w.rank
            stack_a[slot, :, :r] = w.a.T.to(dtype)  # A: [r, in] -> [in, r]
            stack_b[slot, :r, :] = (w.b.T * w.scale).to(dtype)  # B: [out, r] -> [r, out], scale folded in
        layer.set_stacks(stack_a.to(device), stack_b.to(device))
    return table
