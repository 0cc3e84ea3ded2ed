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
from typing import Sequence

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

    def ensure(self, capacity: int, rank: int, dtype: torch.dtype, device) -> None:
        """Grow the stacks to hold ``capacity`` slots of rank ``rank``, keeping what they hold."""
        if self.stack_a is not None and self.stack_a.shape[0] >= capacity and self.stack_a.shape[2] >= rank:
            return
        old_a, old_b = self.stack_a, self.stack_b
        cap = max(capacity, old_a.shape[0] if old_a is not None else 0)
        r = max(rank, old_a.shape[2] if old_a is not None else 0)
        new_a = torch.zeros(cap, self.in_features, r, dtype=dtype, device=device)
        new_b = torch.zeros(cap, r, self.out_features, dtype=dtype, device=device)
        if old_a is not None:
            new_a[: old_a.shape[0], :, : old_a.shape[2]] = old_a
            new_b[: old_b.shape[0], : old_b.shape[1], :] = old_b
        self.set_stacks(new_a, new_b)

    def write(self, slot: int, weights) -> None:
        """Put one adapter's A [r, in] and B [out, r] (scale folded into B) into ``slot``."""
        r = weights.rank
        self.stack_a[slot].zero_()
        self.stack_b[slot].zero_()
        self.stack_a[slot, :, :r] = weights.a.T.to(self.stack_a.dtype)
        self.stack_b[slot, :r, :] = (weights.b.T * weights.scale).to(self.stack_b.dtype)
        # no cache reset: a slot is written only while no running row uses it, and the cached
        # per-row copies hold only slots in use

    def fits(self, slot: int, rank: int) -> bool:
        return self.stack_a is not None and slot < self.stack_a.shape[0] and rank <= self.stack_a.shape[2]

    def clear(self, slot: int) -> None:
        if self.stack_a is not None and slot < self.stack_a.shape[0]:
            self.stack_a[slot].zero_()
            self.stack_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ctx = self.context
        if not ctx.any_adapter or self.stack_a is None:
            return y
        if self._gathered is None or self._gathered[0] != ctx.version:
            slots = ctx.slots
            self._gathered = (ctx.version, self.stack_a.index_select(0, slots), self.stack_b.index_select(0, slots))
        _, a, b = self._gathered
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        # x: [batch, seq, in] @ a: [batch, in, r] -> [batch, seq, r];  y + (.) @ b: [batch, r, out] -> [batch, seq, out]
        if y.dtype == a.dtype:
            return torch.baddbmm(y, torch.bmm(x, a), b)
        return y + torch.bmm(torch.bmm(x, a), b).to(y.dtype)


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
