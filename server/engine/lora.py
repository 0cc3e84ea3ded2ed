"""Mixed-adapter LoRA in one forward pass, with an adapter slot per token.

Every targeted Linear of the base (plain ``nn.Linear`` or a bitsandbytes ``Linear4bit`` /
``Linear8bitLt``) is wrapped by :class:`MultiLoraLinear`. A step's tokens arrive flattened
(``[1, N, in]``, prefill chunks and decode tokens of many sequences together) and each token
carries the slot of its sequence's adapter (slot 0 = the bare base), set once per step on the
shared :class:`LoraBatchContext`. Each layer computes

    y = base(x) + ((x @ A_used) * onehot(token slot)) @ B_used

where ``A_used [in, R]`` / ``B_used [R, out]`` concatenate the adapters of the slots in use this
step (that this layer targets; scale folded into B) and the one-hot mask keeps, for each token,
only its own adapter's rank columns: two GEMMs and one multiply per layer whatever the mix, the
segmented-gather idea (SGMV) in dense form. One adapter for every token skips the mask; no
adapter skips LoRA entirely. The concatenation is cached until the set of slots in use changes.

Each slot's weights are stored once, at the served dtype and at their own rank, only in the
layers the adapter targets: nothing is padded to a common rank or slot count, and adding an
adapter never reallocates another one's weights (so any free slot can be written from another
thread while the engine decodes). This module knows nothing of requests, tokens or files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn


@dataclass
class LoraBatchContext:
    """Per-step state shared by every wrapped layer: the adapter slot of each flattened token."""

    token_slots: torch.Tensor | None = None  # [N] long
    used: tuple[int, ...] = ()  # the non-zero slots present this step, sorted
    single: bool = False  # every token uses used[0]
    version: int = 0  # bumped whenever the slots or any adapter's weights change
    _masks: dict = field(default_factory=dict)  # column layout -> [N, R] one-hot, per step

    @property
    def any_adapter(self) -> bool:
        return bool(self.used)

    def set_token_slots(self, slots: Sequence[int], device) -> None:
        """Slots of this step's tokens, in the flattened order."""
        used = tuple(sorted({s for s in slots if s}))
        self.used = used
        self.single = len(used) == 1 and all(s == used[0] for s in slots)
        self.token_slots = torch.tensor(list(slots), dtype=torch.long, device=device) if used and not self.single else None
        self._masks = {}

    def mask(self, layout: tuple[tuple[int, int], ...], columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N, R] with 1 where column r belongs to the token's slot; shared by layers of one layout."""
        key = (layout, dtype)
        found = self._masks.get(key)
        if found is None:
            found = (self.token_slots[:, None] == columns[None, :]).to(dtype)
            self._masks[key] = found
        return found


class MultiLoraLinear(nn.Module):
    """A base Linear plus the LoRA weights of every resident adapter that targets it."""

    def __init__(self, base: nn.Module, name: str, context: LoraBatchContext, *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.base_layer = base
        self.module_name = name
        self.context = context
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else next(base.parameters()).device
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A [in, r], B*scale [r, out])
        self.stack_a = None  # no stacks (kept for callers that check it): nothing is preallocated
        self._used: tuple | None = None  # (key, A_used [in, R], B_used [R, out], columns [R], layout)

    # ------------------------------------------------------------- weights
    def ensure(self, capacity: int, rank: int, dtype: torch.dtype, device) -> None:
        """Nothing to grow: each slot holds its own tensors (kept for the slot table's protocol)."""

    def fits(self, slot: int, rank: int) -> bool:
        return True

    def write(self, slot: int, weights) -> None:
        """Put one adapter's A [r, in] and B [out, r] (scale folded into B) into ``slot``."""
        a = weights.a.detach().to(device=self.device, dtype=self.dtype).T.contiguous()  # [in, r]
        b = (weights.b.detach().float() * weights.scale).to(device=self.device, dtype=self.dtype).T.contiguous()  # [r, out]
        self.slots[slot] = (a, b)  # one dict store: atomic for a forward on another thread
        self._used = None

    def clear(self, slot: int) -> None:
        self.slots.pop(slot, None)
        self._used = None

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.slots.values())

    # ------------------------------------------------------------- forward
    def _weights_for(self, used: tuple[int, ...]):
        cached = self._used
        if cached is not None and cached[0] == used:
            return cached
        pairs = [(s, self.slots[s]) for s in used]
        a_used = torch.cat([a for _, (a, _) in pairs], dim=1)  # [in, R]
        b_used = torch.cat([b for _, (_, b) in pairs], dim=0)  # [R, out]
        layout = tuple((s, a.shape[1]) for s, (a, _) in pairs)
        columns = torch.tensor([s for s, r in layout for _ in range(r)], dtype=torch.long, device=self.device)
        cached = (used, a_used, b_used, columns, layout)
        self._used = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ctx = self.context
        if not ctx.used or not self.slots:
            return y
        slots = self.slots
        used = tuple(s for s in ctx.used if s in slots)
        if not used:
            return y
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if ctx.single:  # one adapter for every token: y += (x @ A) @ B
            a, b = slots[used[0]]
            delta_in = x2 @ a  # [N, r]
            b_used = b
        else:
            _, a_used, b_used, columns, layout = self._weights_for(used)
            delta_in = (x2 @ a_used) * ctx.mask(layout, columns, self.dtype)  # [N, R], other slots' columns zeroed
        if y.dtype == self.dtype and y.is_contiguous():
            y.view(-1, self.out_features).addmm_(delta_in, b_used)  # in place: [N, out] += [N, R] @ [R, out]
            return y
        return y + (delta_in @ b_used).to(y.dtype).view(y.shape)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear


def inject_multi_lora(
    model: nn.Module,
    context: LoraBatchContext,
    exclude: Sequence[str] = ("lm_head",),
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> dict[str, MultiLoraLinear]:
    """Wrap every Linear of the model (except ``exclude``) in place; returns name -> wrapper.
    LoRA weights are kept (and applied) at ``dtype``."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if _is_linear(module) and name.rsplit(".", 1)[-1] not in exclude
    ]
    wrapped: dict[str, MultiLoraLinear] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(module, name, context, dtype=dtype, device=device)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped
