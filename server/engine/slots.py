"""Which adapter holds which LoRA slot of the torch engine (slot 0 = the bare base), written into
every wrapped layer in place. Knows the wrapped layers' stacks, nothing of requests or files.
"""

from __future__ import annotations

import threading
from typing import Mapping

import torch

from loraplex.server.engine.lora import LoraBatchContext, MultiLoraLinear


class LoraSlots:
    """Which adapter holds which slot (slot 0 = the bare base), written into every layer in place.

    Loading writes one adapter into a free slot (stacks grow by doubling when full, or when a
    larger rank arrives); unloading zeroes its slot. Other slots are never touched, so adapters in
    use by running rows keep their slot numbers across loads and unloads.

    Thread-safety: ``add``/``remove`` run on the engine thread. ``try_add_in_place`` may run on any
    thread, concurrently with forwards: it only writes into a free slot that already fits every
    layer (no tensor is replaced) and no running row can reference that slot yet. A lock
    serializes all slot-table changes.
    """

    def __init__(self, layers: Mapping[str, MultiLoraLinear], context: LoraBatchContext, *, dtype: torch.dtype, device) -> None:
        self.layers = layers
        self.context = context
        self.dtype = dtype
        self.device = device
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.next_slot = 1
        self.lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        return sorted(self.slots, key=self.slots.get)

    def slot_of(self, name: str | None) -> int:
        return 0 if name is None else self.slots[name]

    def _check_targets(self, name: str, modules: Mapping[str, object]) -> None:
        unknown = sorted(set(modules) - set(self.layers))
        if unknown:
            raise KeyError(f"adapter {name!r} targets modules the engine did not wrap: {unknown[:3]}")

    def try_add_in_place(self, name: str, modules: Mapping[str, object]) -> bool:
        """Write into a free slot without growing anything; False when that is not possible."""
        self._check_targets(name, modules)
        with self.lock:
            if name in self.slots:
                return False
            slot = self.free[-1] if self.free else self.next_slot
            if not all(self.layers[m].fits(slot, w.rank) for m, w in modules.items()):
                return False
            if any(layer.stack_a is not None and slot >= layer.stack_a.shape[0] for layer in self.layers.values()):
                return False
            for module_name, weights in modules.items():
                self.layers[module_name].write(slot, weights)
            if self.free:
                self.free.pop()
            else:
                self.next_slot += 1
            self.slots[name] = slot
            return True

    def add(self, name: str, modules: Mapping[str, object]) -> int:
        self._check_targets(name, modules)
        with self.lock:
            if name in self.slots:
                self.remove(name)
            slot = self.free.pop() if self.free else self.next_slot
            if slot == self.next_slot:
                self.next_slot += 1
            for module_name, weights in modules.items():
                layer = self.layers[module_name]
                capacity = layer.stack_a.shape[0] if layer.stack_a is not None else 1
                while capacity <= slot:
                    capacity *= 2
                layer.ensure(max(capacity, slot + 1), weights.rank, self.dtype, self.device)
                layer.write(slot, weights)
            for module_name, layer in self.layers.items():
                if module_name in modules or layer.stack_a is None:
                    continue
                if layer.stack_a.shape[0] < self.next_slot:  # every slot index in a batch must be addressable
                    capacity = layer.stack_a.shape[0]
                    while capacity < self.next_slot:
                        capacity *= 2
                    layer.ensure(capacity, layer.stack_a.shape[2], self.dtype, self.device)
            self.slots[name] = slot
            self.context.version += 1
            return slot

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.slots:  # idempotent: already gone
                return
            slot = self.slots.pop(name)
            for layer in self.layers.values():
                layer.clear(slot)  # free slots are all-zero: in-place adds rely on it
            self.free.append(slot)
            self.context.version += 1
