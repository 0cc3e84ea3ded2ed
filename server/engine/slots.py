"""Adapter slots, one design for every engine: which adapter holds which slot of the engine's
LoRA weights (slot 0 = the bare base, never handed out), a free list (lowest slot first), and
capacity growth that is ALL-OR-NOTHING.

``SlotTable`` is backend-independent: it decides the slot and the capacity, and asks a
``SlotStore`` to grow, write and clear: the torch layers' rank rows (``TorchLayerStore``:
grown by adding blocks of rows, per layer), the onnx mixed-batch engine's numpy stacks
(``onnx/stacked.py``: grown by reallocation), the per-request onnx engine's ``og.Adapters``
containers. An install allocates everything it needs before anything changes, writes, and only
then commits; a failure at any point (out of memory while growing, a bad tensor while writing)
puts the stores back as they were and leaves no slot taken. ``LoraSlots`` is the torch engine's
table over its ``MultiLoraLinear`` layers.

Knows stacks and slot numbers; nothing of requests, files, HTTP or the registry.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, Mapping, Protocol, TypeVar

import torch

P = TypeVar("P")  # what a store writes into a slot (the engine's adapter payload contents)


class SlotStore(Protocol[P]):
    """The weight stacks a ``SlotTable`` manages (implemented per backend)."""

    def fits(self, capacity: int, payload: P) -> bool:
        """True when ``payload`` fits stacks of ``capacity`` slots as they are (no growth)."""
        ...

    def grow(self, capacity: int, payload: P) -> Callable[[], None] | None:
        """Make the stacks hold ``capacity`` slots and ``payload``'s ranks, keeping what they hold.
        Must allocate everything before replacing anything (a failure changes nothing); returns an
        undo that puts the previous stacks back, or None when nothing changed."""
        ...

    def write(self, slot: int, payload: P) -> None:
        """Write ``payload`` into ``slot`` (which is all-zero); may fail midway."""
        ...

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every stack (must not fail)."""
        ...


def default_growth(capacity: int, needed: int) -> int:
    """Slots to allocate when ``needed`` exceed ``capacity`` (slot 0 counted): +25%, at least +4,
    so a few more adapters do not each copy every stack, and memory stays near what is used."""
    return max(needed, capacity + max(4, capacity // 4))


class SlotTable(Generic[P]):
    """name -> slot over one ``SlotStore``. Slot 0 is the bare base and never handed out.

    ``add`` may grow the stacks (engine thread: nothing may read them meanwhile);
    ``try_add_in_place`` only writes into a free slot that already fits (any thread, concurrently
    with forwards: no stack is replaced and no running row can reference a free slot). A lock
    serializes every change of the table. Replacing a resident name installs the new weights in a
    fresh slot and frees the old one only once that succeeded.
    """

    def __init__(self, store: SlotStore[P], *, capacity: int = 1, growth: Callable[[int, int], int] = default_growth) -> None:
        self.store = store
        self.capacity = max(1, capacity)  # slots the stacks hold, slot 0 included
        self.growth = growth
        self._slots: dict[str, int] = {}
        self._free: set[int] = set(range(1, self.capacity))
        self.lock = threading.RLock()
        self.version = 0  # bumped on every change (engines re-bind or re-gather on it)

    # ------------------------------------------------------------- queries
    @property
    def slots(self) -> Mapping[str, int]:
        return self._slots

    @property
    def names(self) -> list[str]:
        return sorted(self._slots, key=self._slots.get)

    @property
    def free(self) -> list[int]:
        return sorted(self._free)

    @property
    def used(self) -> int:
        """Slots in use, slot 0 included (the highest slot any batch may reference is below)."""
        return 1 + len(self._slots)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def slot_of(self, name: str | None) -> int:
        """0 for the base; KeyError naming the adapter when it is not resident."""
        if name is None:
            return 0
        try:
            return self._slots[name]
        except KeyError:
            raise KeyError(f"adapter {name!r} is not resident") from None

    # ------------------------------------------------------------- changes
    def _next_slot(self) -> int:
        return min(self._free) if self._free else self.capacity

    def add(self, name: str, payload: P) -> int:
        """Install ``payload`` as ``name``; returns its slot. All-or-nothing (see the class)."""
        with self.lock:
            slot = self._next_slot()
            capacity = self._capacity_for(slot)
            undo = self.store.grow(capacity, payload)  # may raise: nothing has changed yet
            try:
                self.store.write(slot, payload)
            except BaseException:
                self.store.clear(slot)
                if undo is not None:
                    undo()
                raise
            # commit: nothing below allocates or fails
            self._free.update(range(self.capacity, capacity))
            self.capacity = capacity
            self._free.discard(slot)
            previous = self._slots.get(name)
            self._slots[name] = slot
            if previous is not None:
                self.store.clear(previous)
                self._free.add(previous)
            self.version += 1
            return slot

    def _capacity_for(self, slot: int) -> int:
        return self.capacity if slot < self.capacity else max(slot + 1, self.growth(self.capacity, slot + 1))

    def try_add_in_place(self, name: str, payload: P) -> bool:
        """Write into a free slot without reallocating anything; False when that is not possible
        (the stacks would have to grow: no free slot, or a rank that does not fit; or ``name`` is
        already resident). Stores that preallocate nothing (the torch layers) always fit."""
        with self.lock:
            if name in self._slots:
                return False
            slot = self._next_slot()
            capacity = self._capacity_for(slot)
            if not self.store.fits(capacity, payload):
                return False
            try:
                self.store.write(slot, payload)
            except BaseException:
                self.store.clear(slot)
                raise
            self._free.update(range(self.capacity, capacity))
            self.capacity = capacity
            self._free.discard(slot)
            self._slots[name] = slot
            self.version += 1
            return True

    def remove(self, name: str) -> int | None:
        """Zero and free ``name``'s slot (free slots are all-zero: in-place writes rely on it);
        idempotent. Returns the slot freed, or None."""
        with self.lock:
            slot = self._slots.pop(name, None)
            if slot is None:
                return None
            self.store.clear(slot)
            self._free.add(slot)
            self.version += 1
            return slot


# --------------------------------------------------------------------- torch


class TorchLayerStore:
    """The torch engine's adapter weights: every wrapped layer (``MultiLoraLinear``, lora.py)
    keeps its slots' A/B rows in blocks of rows, only in the layers the adapter targets (any
    slot number fits; what grows is a layer's block list, by adding a block, never moving rows,
    so it is safe beside a forward on the engine thread and ``fits`` is always true). ``grow``
    makes room in every targeted layer before any write, with an undo that drops the added
    blocks. The payload is ``{module name: weights}`` (store/validation.py's LoraModuleWeights:
    ``a`` [r, in], ``b`` [out, r], ``scale``, ``rank``). A write that fails midway is undone by
    ``clear`` (the slot is dropped from every layer)."""

    def __init__(self, layers: Mapping[str, object], *, dtype: torch.dtype, device) -> None:
        self.layers = layers
        self.dtype = dtype
        self.device = device

    def fits(self, capacity: int, modules: Mapping[str, object]) -> bool:
        return all(self.layers[name].fits(capacity - 1, weights.rank) for name, weights in modules.items())

    def grow(self, capacity: int, modules: Mapping[str, object]):
        undos = []
        try:
            for name, weights in modules.items():
                undo = self.layers[name].grow(weights.rank)
                if undo is not None:
                    undos.append(undo)
        except BaseException:
            for undo in reversed(undos):
                undo()
            raise
        if not undos:
            return None

        def undo_all() -> None:
            for undo in reversed(undos):
                undo()

        return undo_all

    def write(self, slot: int, modules: Mapping[str, object]) -> None:
        for name, weights in modules.items():
            self.layers[name].write(slot, weights)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear(slot)


class LoraSlots:
    """The torch engine's slot table (a ``SlotTable`` over ``TorchLayerStore``), with the names
    the engine calls: ``add``, ``remove``, ``try_add_in_place``, ``slot_of``, ``names``, ``slots``.
    Every change bumps the layers' shared ``LoraBatchContext.version`` (cached gathers drop)."""

    def __init__(self, layers: Mapping[str, object], context, *, dtype: torch.dtype, device) -> None:
        self.layers = layers
        self.context = context
        self.store = TorchLayerStore(layers, dtype=dtype, device=device)
        self.table: SlotTable[Mapping[str, object]] = SlotTable(self.store)
        #: called after every change, lock held (the lean forward re-folds its LoRA A rows)
        self.on_change: list[Callable[[], None]] = []

    def _changed(self) -> None:
        self.context.version += 1  # stacks may have been replaced and put back: drop cached gathers
        for hook in self.on_change:
            hook()

    @property
    def lock(self):
        return self.table.lock

    @property
    def slots(self) -> Mapping[str, int]:
        return self.table.slots

    @property
    def names(self) -> list[str]:
        return self.table.names

    @property
    def capacity(self) -> int:
        return self.table.capacity

    def slot_of(self, name: str | None) -> int:
        return self.table.slot_of(name)

    def _check_targets(self, name: str, modules: Mapping[str, object]) -> None:
        if not modules:  # an empty adapter would serve the bare base under its name
            raise ValueError(f"adapter {name!r} has no LoRA weights for this engine (validated for another backend?)")
        unknown = sorted(set(modules) - set(self.layers))
        if unknown:
            raise KeyError(f"adapter {name!r} targets modules the engine did not wrap: {unknown[:3]}")

    def try_add_in_place(self, name: str, modules: Mapping[str, object]) -> bool:
        self._check_targets(name, modules)
        with self.table.lock:
            try:
                added = self.table.try_add_in_place(name, modules)
            except BaseException:
                self._changed()  # a failed write was cleared: its rows changed too
                raise
            if added:
                self._changed()
        return added

    def add(self, name: str, modules: Mapping[str, object]) -> int:
        self._check_targets(name, modules)
        with self.table.lock:
            try:
                return self.table.add(name, modules)
            finally:
                self._changed()

    def remove(self, name: str) -> None:
        with self.table.lock:
            if self.table.remove(name) is not None:
                self._changed()
