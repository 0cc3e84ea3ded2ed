"""The shared slot table (server/engine/slots.py) over the torch engine's real layers: slot 0 is
the base, freed slots are reused lowest first, and an install that fails midway (a bad tensor in
the third of four layers) takes no slot and leaves no weights behind, on both the engine-thread
path and the in-place path; a failed replacement keeps the old adapter serving."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from loraplex.server.engine.lora import BLOCK_ROWS, LoraBatchContext, MultiLoraLinear
from loraplex.server.engine.slots import LoraSlots, SlotTable, default_growth


@dataclass(frozen=True)
class W:  # the shape of store.validation.LoraModuleWeights
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float = 2.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


class Broken:
    """Weights whose A cannot be read (a corrupt tensor)."""

    def __init__(self, rank: int, b: torch.Tensor) -> None:
        self.rank, self.b, self.scale = rank, b, 2.0

    @property
    def a(self):
        raise RuntimeError("simulated failure while reading the weights")


def _layers():
    context = LoraBatchContext()
    torch.manual_seed(0)
    layers = {f"l{i}": MultiLoraLinear(torch.nn.Linear(8, 6, bias=False), f"l{i}", context) for i in range(4)}
    return layers, context


def _adapter(seed, rank=2, broken_at=None):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(4):
        a, b = torch.randn(rank, 8, generator=g), torch.randn(6, rank, generator=g)
        modules[f"l{i}"] = Broken(rank, b) if i == broken_at else W(a, b)
    return modules


def _delta(layer, slot, x):
    """What slot ``slot`` adds to the base output, through the layer's own forward."""
    layer.context.set_token_slots([slot] * x.shape[1], "cpu")
    with_lora = layer(x)
    layer.context.set_token_slots([0] * x.shape[1], "cpu")
    return with_lora - layer(x)


def test_failed_installs_take_no_slot_and_leave_no_weights():
    layers, context = _layers()
    slots = LoraSlots(layers, context, dtype=torch.float32, device="cpu")
    good = _adapter(1)
    assert slots.add("good", good) == 1
    slots.add("spare", _adapter(4))
    slots.remove("spare")  # its rows are free (and zero)
    blocks = {name: layer.blocks for name, layer in layers.items()}
    for install in (slots.add, slots.try_add_in_place):
        with pytest.raises(RuntimeError, match="simulated"):
            install("bad", _adapter(2, broken_at=2))
        assert dict(slots.slots) == {"good": 1} and slots.table.free == list(range(2, slots.capacity))
        assert all(set(layer.slots) == {1} for layer in layers.values())  # layers l0, l1 were written, then cleared
        assert all(layer.blocks is blocks[name] and not layer.blocks[0][0][2:].any() for name, layer in layers.items())  # free rows zero again
    assert slots.add("next", _adapter(3)) == 2  # the slot the failures tried is free
    x = torch.randn(1, 3, 8)
    w = good["l0"]
    torch.testing.assert_close(_delta(layers["l0"], 1, x), x @ w.a.T @ w.b.T * w.scale)


def test_a_failed_replacement_keeps_the_old_adapter():
    layers, context = _layers()
    slots = LoraSlots(layers, context, dtype=torch.float32, device="cpu")
    old = _adapter(1)
    slots.add("a", old)
    with pytest.raises(RuntimeError):
        slots.add("a", _adapter(5, broken_at=3))
    assert slots.slot_of("a") == 1 and all(set(layer.slots) == {1} for layer in layers.values())
    x = torch.randn(1, 2, 8)
    torch.testing.assert_close(_delta(layers["l3"], 1, x), x @ old["l3"].a.T @ old["l3"].b.T * 2.0)
    new = _adapter(6, rank=4)
    assert slots.add("a", new) == 2  # a fresh slot, then the old one is freed
    assert slots.table.free[0] == 1 and all(set(layer.slots) == {2} for layer in layers.values())
    torch.testing.assert_close(_delta(layers["l1"], 2, x), x @ new["l1"].a.T @ new["l1"].b.T * 2.0)


def test_free_slots_are_reused_lowest_first_and_capacity_grows_all_or_nothing():
    class Stacks:  # a preallocating store (the onnx engine's kind): grow may fail
        def __init__(self):
            self.capacity, self.fail_grow, self.written = 1, False, {}

        def fits(self, capacity, payload):
            return capacity <= self.capacity

        def grow(self, capacity, payload):
            if self.fail_grow:
                raise MemoryError("simulated")
            before, self.capacity = self.capacity, capacity
            return lambda: setattr(self, "capacity", before)

        def write(self, slot, payload):
            self.written[slot] = payload

        def clear(self, slot):
            self.written.pop(slot, None)

    store = Stacks()
    table = SlotTable(store)
    assert [table.add(n, n) for n in "abcd"] == [1, 2, 3, 4] and table.capacity == store.capacity == default_growth(1, 2)
    table.remove("b")
    table.remove("a")
    assert table.try_add_in_place("e", "e") and table.slot_of("e") == 1  # lowest free slot first
    assert table.add("f", "f") == 2
    store.fail_grow = True
    with pytest.raises(MemoryError):
        table.add("g", "g")  # every slot taken: must grow, and growing fails
    assert not table.try_add_in_place("g", "g")  # in place never grows
    assert table.capacity == store.capacity == 5 and "g" not in table and table.free == []
    store.fail_grow = False
    assert table.add("g", "g") == 5 and table.capacity == store.capacity == default_growth(5, 6)
    assert table.slot_of(None) == 0
    with pytest.raises(KeyError, match="'zz' is not resident"):
        table.slot_of("zz")


def test_rows_are_stored_once_reused_and_read_in_place():
    """Layer storage: a removed adapter's rows are reused by the next one of that rank; a failed
    growth (undo) puts the previous rows back; a step over scattered slots reads their rows."""
    layers, context = _layers()
    slots = LoraSlots(layers, context, dtype=torch.float32, device="cpu")
    adapters = {n: _adapter(10 + i, rank=2 + i % 2) for i, n in enumerate("abcde")}
    for n, modules in adapters.items():
        slots.add(n, modules)
    layer = layers["l0"]
    assert layer.nbytes == sum(m["l0"].rank for m in adapters.values()) * (8 + 6) * 4
    assert layer.capacity == BLOCK_ROWS and len(layer.blocks) == 1  # one block holds them all
    start_b = layer.row_of[slots.slot_of("b")]
    slots.remove("b")
    slots.add("f", _adapter(20, rank=3))  # b's three rows again: no growth
    assert layer.row_of[slots.slot_of("f")] == start_b
    undo = layer.grow(BLOCK_ROWS)  # no free range that long: a second block, nothing moved
    assert layer.capacity == 2 * BLOCK_ROWS
    undo()
    assert layer.capacity == BLOCK_ROWS
    slots.remove("e")
    for i in range(10):
        slots.add(f"filler{i}", _adapter(30 + i, rank=3))
    adapters["e"] = _adapter(50, rank=2)
    slots.add("e", adapters["e"])  # after the fillers: rows far from f's
    for n in ["a", "c", "d"] + [f"filler{i}" for i in range(10)]:
        slots.remove(n)  # slots "e" and "f" remain, far apart in the rows: the step gathers their rows
    x = torch.randn(1, 4, 8)
    e, f = adapters["e"]["l0"], _adapter(20, rank=3)["l0"]
    assert layer.row_of[slots.slot_of("e")][1] - layer.row_of[slots.slot_of("f")][1] > 2 * 5 + 16
    context.set_token_slots([slots.slot_of("e"), 0, slots.slot_of("f"), ((slots.slot_of("e"), 0.5), (slots.slot_of("f"), -1.0))], "cpu")
    got = layer(x)[0]
    base = layer.base_layer(x)[0]
    expect = base + torch.stack([
        x[0, 0] @ e.a.T @ e.b.T * 2.0,
        torch.zeros(6),
        x[0, 2] @ f.a.T @ f.b.T * 2.0,
        0.5 * (x[0, 3] @ e.a.T @ e.b.T * 2.0) - x[0, 3] @ f.a.T @ f.b.T * 2.0,
    ])
    torch.testing.assert_close(got, expect)
