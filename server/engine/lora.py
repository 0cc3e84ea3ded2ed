"""Mixed-adapter LoRA in one forward pass, with an adapter slot (or a weighted mix) per token.

Every targeted Linear of the base (plain ``nn.Linear`` or a bitsandbytes ``Linear4bit`` /
``Linear8bitLt``) is wrapped by :class:`MultiLoraLinear`. A step's tokens arrive flattened
(``[1, N, in]``, prefill chunks and decode tokens of many sequences together) and each token
carries the slot of its sequence's adapter (slot 0 = the bare base), set once per step on the
shared :class:`LoraBatchContext`. Each layer computes

    y = base(x) + ((x @ A_rows^T) * mask) @ B_rows

where ``A_rows [R, in]`` / ``B_rows [R, out]`` are the layer's stored rank rows of the slots in
use this step (scale folded into B), read in place, and ``mask [N, R]`` holds for each token
the weight of the slot owning each row (1 for its own adapter, 0 elsewhere): two GEMMs and one
multiply per layer whatever the mix, the segmented-gather idea (SGMV) in dense form. A token may
also carry a weighted mix of slots (``((slot, weight), ...)``): its mask row then holds each
member's weight on that member's rows, so it gets ``sum_i w_i B_i A_i x`` exactly, in the same
GEMMs. One adapter for every token skips the mask; no adapter skips LoRA entirely.

Storage: each layer keeps its slots' rows in blocks of ``BLOCK_ROWS`` rows (a pair of tensors
per block), at the served dtype and at each adapter's own rank, only in the layers the adapter
targets: stored once (no per-step concatenation, no second copy), and the slots of a step are
usually one contiguous span of one block (slots are handed out lowest first). Free rows are
zero. Writing an adapter changes no other slot's rows and blocks are only ever added, never
moved, so a write may run on another thread while the engine decodes. Besides the stored rows
there are working copies for speed, each rebuilt from the rows when they change and dropped when
a member's slot is cleared: a lone streaming slot's rows in fp32 (``MultiLoraLinear``,
``LoraGroup._single_f32``) and, for mixed steps, a group's used A rows and block-diagonal B rows
(``LoraGroup``; at most ``DIAG_MAX_BYTES`` of B per group).

In bf16 on CPU the shrink rides on the base GEMM (``FoldedShrink``) and the expand is one call
of a small C kernel per projection group (``expand_kernel``) that reads only each token's own
rows. The dense masked form above stays for fp32 and CUDA, with ``--lora-expand gemm``, where
the kernel cannot be built, for steps past ``expand_kernel.MAX_TOKENS``, for slots whose rows
are not folded (a later block), and for folds holding a rank past the kernel's limit.

bf16 base Linears on CPU (and the lm_head) run on oneDNN-prepacked weights: bit-identical to
``F.linear``, without re-laying out the weight on every call (what dominates small-M decode).
This module knows nothing of requests, tokens or files.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.server.engine import expand_kernel
from loraplex.server.store.targets import EXCLUDED_TARGETS


TokenSlot = Union[int, Tuple[Tuple[int, float], ...]]  # a slot (weight 1; 0 = base) or a weighted mix

#: use oneDNN-prepacked weights for bf16 CPU base Linears (bit-identical to ``F.linear``, less
#: per-call work); a switch so tools/engine_bench.py can compare both in one process
PACKED_LINEARS = {"enabled": True}


def _slot_weights(item: TokenSlot) -> dict[int, float]:
    """A token's slots and their weights: an int is that slot at weight 1; a mix sums the weights
    of a slot named twice; slot 0 (the base, always there once) adds nothing."""
    if isinstance(item, int):
        return {item: 1.0} if item else {}
    row: dict[int, float] = {}
    for slot, weight in item:
        if slot:
            row[int(slot)] = row.get(int(slot), 0.0) + float(weight)
    return row


@dataclass
class LoraBatchContext:
    """Per-step state shared by every wrapped layer: the adapter slot (or weighted mix of slots)
    of each flattened token."""

    token_slots: torch.Tensor | None = None  # [N] long, when no token carries a mix
    token_weights: torch.Tensor | None = None  # [N, len(used) + 1] fp32: weight of each used slot; last column 0
    used: tuple[int, ...] = ()  # the non-zero slots present this step, sorted
    single: bool = False  # every token uses used[0] at weight 1
    version: int = 0  # bumped whenever the slots or any adapter's weights change
    _masks: dict = field(default_factory=dict)  # row layout -> [N, span] mask, per step
    _slots: Sequence[TokenSlot] = ()  # this step's token slots as given
    _segments: expand_kernel.TokenSegments | None = None  # the expand kernel's view of them, built on first use

    @property
    def any_adapter(self) -> bool:
        return bool(self.used)

    def set_token_slots(self, slots: Sequence[TokenSlot], device) -> None:
        """Slots of this step's tokens, in the flattened order. Each item is an int (that slot's
        adapter at weight 1; 0 = the bare base) or a tuple of ``(slot, weight)`` pairs: the token
        gets ``sum_i weight_i * B_i A_i x`` (a weighted mix, exact for LoRA). Pairs on slot 0 add
        nothing (the base is always there once); a slot named twice in one mix sums its weights."""
        self._masks = {}
        self._slots, self._segments = slots, None
        self.token_slots = self.token_weights = None
        if all(isinstance(s, int) for s in slots):
            used = tuple(sorted({s for s in slots if s}))
            self.used = used
            self.single = len(used) == 1 and all(s == used[0] for s in slots)
            if used and not self.single:
                index = {s: i for i, s in enumerate(used)}
                self.token_slots = torch.tensor(list(slots), dtype=torch.long, device=device)
                columns = torch.tensor([index.get(s, len(used)) for s in slots], dtype=torch.long, device=device)
                weights = torch.zeros(len(slots), len(used) + 1, dtype=torch.float32, device=device)
                weights.scatter_(1, columns[:, None], 1.0)
                weights[:, len(used)] = 0.0  # base tokens: no column
                self.token_weights = weights
            return
        rows = [_slot_weights(item) for item in slots]
        used = tuple(sorted({s for row in rows for s in row}))
        self.used = used
        self.single = len(used) == 1 and all(row == {used[0]: 1.0} for row in rows)
        if not used or self.single:
            return
        index = {s: i for i, s in enumerate(used)}
        dense = [[0.0] * (len(used) + 1) for _ in rows]
        for dense_row, row in zip(dense, rows):
            for slot, weight in row.items():
                dense_row[index[slot]] = weight
        self.token_weights = torch.tensor(dense, dtype=torch.float32, device=device)  # [N, U + 1]

    def segments(self) -> expand_kernel.TokenSegments:
        """Each token's (slot, weight) pairs for the expand kernel, built once per step."""
        if self._segments is None:
            self._segments = expand_kernel.TokenSegments([list(_slot_weights(item).items()) for item in self._slots])
        return self._segments

    def mask(self, key, columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N, R]: for each token, the weight of the slot owning each of a layer's R LoRA rows
        (``columns`` [R]: index into ``used``, ``len(used)`` for rows of no slot in use); shared by
        the layers of one row layout (``key``)."""
        key = (key, dtype)
        found = self._masks.get(key)
        if found is None:
            found = self.token_weights.index_select(1, columns).to(dtype)  # [N, R]
            self._masks[key] = found
        return found


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's prepacked form of a bf16 CPU Linear weight [out, in], or None where unavailable."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (AttributeError, RuntimeError):
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``F.linear(x, W, bias)`` on the prepacked W (bit-identical); x [..., in] -> [..., out]."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")  # [M, out]
    return y.view(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """A plain bf16 CPU Linear computed on oneDNN-prepacked weights (the lm_head, which carries
    no LoRA); ``weight``/``bias`` stay readable (tied embeddings, ``get_output_embeddings``)."""

    def __init__(self, base: nn.Linear, packed: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base
        self.packed = packed
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if PACKED_LINEARS["enabled"] and x.dtype == torch.bfloat16:
            return packed_linear(x, self.packed, self.base_layer.bias, self.out_features)
        return self.base_layer(x)


#: rows per block of a layer's LoRA storage: 8 rank-8 adapters share one block
BLOCK_ROWS = 64

def _read_rows(rows: torch.Tensor, lo: int, hi: int, index: torch.Tensor | None) -> torch.Tensor:
    """A block's rows of a step's slots: the span [lo, hi) in place, or the gathered rows ``index``
    (see ``MultiLoraLinear._rows_plan``)."""
    return rows[lo:hi] if index is None else rows.index_select(0, index)


#: up to this many tokens, a bf16 CPU step computes the LoRA products in fp32 (see forward)
SMALL_M_FP32 = 16


class MultiLoraLinear(nn.Module):
    """A base Linear plus the LoRA weights of every resident adapter that targets it.

    A slot's rank rows live in a block of rows shared with other slots: per block one pair
    ``(A rows [n, in], B rows [n, out])`` (B with the scale folded in), ``n = BLOCK_ROWS`` (or the
    rank, if larger), and ``row_of[slot] = (block, first row, rank)``. The weights are stored once
    and a step reads the rows of the slots it uses in place: per block one contiguous span (slots
    are handed out lowest first, so that is usually one span in one block) or, when the used rows
    are scattered among many others, a gather. Free rows are all-zero and masked out. Blocks are
    never reallocated, only added (a new adapter that fits no free rows), so memory tracks what
    is stored and no copy is made. ``write`` (adding a block when needed) may run on another
    thread during a forward: it touches only free rows, and the block list is replaced as one
    reference; writers are serialized by the slot table's lock."""

    def __init__(self, base: nn.Module, name: str, context: LoraBatchContext, *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.base_layer = base
        self.module_name = name
        self.context = context
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else next(base.parameters()).device
        self.blocks: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # (A [n, in], B [n, out]) per block
        self.row_of: dict[int, tuple[int, int, int]] = {}  # slot -> (block, first row, rank)
        self._free: list[tuple[int, int, int]] = []  # free row ranges (block, start, length), sorted, merged
        self._plan: tuple | None = None  # ((ctx.used, rows version), how to read the rows)
        self._rows_version = 0
        # oneDNN-prepacked bf16 weight for a plain CPU nn.Linear (bitsandbytes layers are subclasses: not packed)
        self._packed = pack_weight(base.weight) if type(base) is nn.Linear else None
        self.stack_a = None  # kept for callers that check it
        self._single_f32: tuple | None = None  # ((slot, rows version), A [r, in], B [r, out]) fp32, see add_lora
        self.groups: list["LoraGroup"] = []  # the groups this layer belongs to (their copies are dropped with a slot)

    # ------------------------------------------------------------- weights
    @property
    def slots(self) -> dict[int, tuple[int, int, int]]:
        """slot -> (block, first row, rank) of the slots this layer holds."""
        return self.row_of

    @property
    def capacity(self) -> int:
        """Rows allocated (used and free)."""
        return sum(int(a.shape[0]) for a, _ in self.blocks)

    def _find(self, rank: int) -> tuple[int, int] | None:
        for block, start, length in self._free:
            if length >= rank:
                return block, start
        return None

    def fits(self, slot: int, rank: int) -> bool:
        """Always: a write may add a block (never moving other rows), from any thread."""
        return True

    def grow(self, rank: int):
        """Make room for ``rank`` more rows: a new block when no free range is long enough
        (allocated before anything changes); returns an undo that drops it, or None."""
        if self._find(rank) is not None:
            return None
        n = max(BLOCK_ROWS, rank)
        pair = (
            torch.zeros(n, self.in_features, dtype=self.dtype, device=self.device),
            torch.zeros(n, self.out_features, dtype=self.dtype, device=self.device),
        )
        old = (self.blocks, list(self._free))
        index = len(self.blocks)
        self._free = sorted(self._free + [(index, 0, n)])
        self.blocks = self.blocks + (pair,)  # one reference swap: a forward sees the old tuple or the new one

        def undo() -> None:
            self.blocks, self._free = old
            self._rows_version += 1

        return undo

    def ensure(self, capacity: int, rank: int, dtype: torch.dtype, device) -> None:
        """Kept for the slot table's protocol: room for ``rank`` rows."""
        self.grow(rank)

    def _release(self, block: int, start: int, length: int) -> None:
        merged: list[tuple[int, int, int]] = []
        for b, s, n in sorted(self._free + [(block, start, length)]):
            if merged and merged[-1][0] == b and merged[-1][1] + merged[-1][2] == s:
                merged[-1] = (b, merged[-1][1], merged[-1][2] + n)
            else:
                merged.append((b, s, n))
        self._free = merged

    def _take(self, rank: int) -> tuple[int, int]:
        found = self._find(rank)
        if found is None:
            self.grow(rank)  # written outside the slot table's grow (an in-place write)
            found = self._find(rank)
        block, start = found
        for i, (b, s, n) in enumerate(self._free):
            if (b, s) == found:
                self._free[i : i + 1] = [(b, s + rank, n - rank)] if n > rank else []
                break
        return block, start

    def write(self, slot: int, weights) -> None:
        """Put one adapter's A [r, in] and B [out, r] (scale folded into B) into ``slot``'s rows."""
        a = weights.a.detach().to(device=self.device, dtype=self.dtype)  # [r, in]
        b = (weights.b.detach().float() * weights.scale).T.to(device=self.device, dtype=self.dtype)  # [r, out]
        rank = int(a.shape[0])
        if tuple(a.shape) != (rank, self.in_features) or tuple(b.shape) != (rank, self.out_features):
            raise ValueError(f"{self.module_name}: LoRA A {tuple(weights.a.shape)} / B {tuple(weights.b.shape)} do not fit a Linear {self.in_features} -> {self.out_features}")
        if slot in self.row_of:
            self.clear(slot)
        block, start = self._take(rank)
        rows_a, rows_b = self.blocks[block]
        rows_a[start : start + rank] = a
        rows_b[start : start + rank] = b
        self.row_of[slot] = (block, start, rank)  # published last: one dict store, atomic for a forward on another thread
        self._rows_version += 1

    def clear(self, slot: int) -> None:
        found = self.row_of.pop(slot, None)
        if found is None:
            return
        self._single_f32 = None  # working copies may hold this slot's rows: dropped with it
        for group in self.groups:
            group.forget()
        block, start, rank = found
        self._rows_version += 1
        rows_a, rows_b = self.blocks[block]
        rows_a[start : start + rank] = 0  # free rows stay all-zero (masked spans read them)
        rows_b[start : start + rank] = 0
        self._release(block, start, rank)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows resident adapters hold (not counting free rows)."""
        per_row = (self.in_features + self.out_features) * torch.empty((), dtype=self.dtype).element_size()
        return sum(rank for _, _, rank in self.row_of.values()) * per_row

    @property
    def allocated_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.blocks)

    # ------------------------------------------------------------- forward
    def _rows_plan(self, ctx: LoraBatchContext) -> list[tuple]:
        """How this step reads the rows of the slots in use: per block ``(block, key, lo, hi,
        columns, index)``: the span [lo, hi) (``index`` None) or, when the used rows lie among
        many others, a gather of rows ``index`` [R]; ``columns`` [R] maps each row read to its
        slot's position in ``ctx.used`` (``len(used)`` = a row of no used slot: masked to 0)."""
        plan_key = (ctx.used, self._rows_version)
        cached = self._plan
        if cached is not None and cached[0] == plan_key:
            return cached[1]
        per_block: dict[int, list[tuple[int, int, int]]] = {}
        for i, s in enumerate(ctx.used):
            found = self.row_of.get(s)
            if found is not None:
                block, start, rank = found
                per_block.setdefault(block, []).append((i, start, rank))
        plan = []
        for block, used in sorted(per_block.items()):
            lo = min(start for _, start, _ in used)
            hi = max(start + rank for _, start, rank in used)
            owner = {r: i for i, start, rank in used for r in range(start, start + rank)}
            index = None
            rows = list(range(lo, hi))
            if hi - lo > 2 * len(owner) + 16:
                rows = sorted(owner)
                index = torch.tensor(rows, dtype=torch.long, device=self.device)
            cols = [owner.get(r, len(ctx.used)) for r in rows]
            columns = torch.tensor(cols, dtype=torch.long, device=self.device)
            plan.append((block, tuple(cols), lo, hi, columns, index))
        self._plan = (plan_key, plan)
        return plan

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed
        if packed is not None and PACKED_LINEARS["enabled"] and x.dtype == torch.bfloat16:
            return packed_linear(x, packed, self.base_layer.bias, self.out_features)
        return self.base_layer(x)

    def drop_packed(self) -> None:
        """Forget the prepacked base weight (a fused GEMM computes this projection's base now)."""
        self._packed = None

    def restore_packed(self) -> None:
        """Prepack the base weight again (tools/engine_bench.py's A/B against transformers' forward)."""
        if self._packed is None and type(self.base_layer) is nn.Linear:
            self._packed = pack_weight(self.base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        ctx = self.context
        if not ctx.used or not self.row_of:
            return y
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if y.dtype == self.dtype and y.is_contiguous():
            self.add_lora(x2, y.view(-1, self.out_features))
            return y
        y2 = torch.zeros(x2.shape[0], self.out_features, dtype=self.dtype, device=x2.device)
        self.add_lora(x2, y2)
        return y + y2.to(y.dtype).view(y.shape)

    def single_rows_f32(self, ctx: LoraBatchContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows of the one adapter streaming alone (``ctx.single``) in fp32, ``(A [r, in],
        B [r, out])``, or None when this projection has none for it. The copy is kept while the
        same slot streams alone (one slot per layer: at most the adapter's own fp32 file size,
        freed on the next mix). A is kept [r, in] and applied as F.linear (x @ A^T): for
        [1, in] @ [in, r] with A^T stored contiguous, MKL measured 30-38 us on a thread other than
        the first to call it (the engine's thread, in the server) against 4-6 us for this layout."""
        found = self.row_of.get(ctx.used[0])
        if found is None:
            return None
        key = (ctx.used[0], self._rows_version)
        cached = self._single_f32
        if cached is None or cached[0] != key:
            block, start, rank = found
            rows_a, rows_b = self.blocks[block]
            cached = self._single_f32 = (key, rows_a[start : start + rank].float().contiguous(), rows_b[start : start + rank].float())
        return cached[1], cached[2]

    def add_lora(self, x2: torch.Tensor, y2: torch.Tensor) -> None:
        """``y2 += LoRA(x2)`` for this step's tokens, in place: x2 [N, in], y2 [N, out] at the
        LoRA dtype (may be a column slice of a fused projection's output)."""
        ctx = self.context
        if not ctx.used or not self.row_of:
            return
        blocks = self.blocks
        small = x2.shape[0] <= SMALL_M_FP32 and self.dtype == torch.bfloat16 and x2.device.type == "cpu"
        if ctx.single:  # one adapter for every token: y += (x @ A^T) @ B
            found = self.row_of.get(ctx.used[0])
            if found is None:
                return
            block, start, rank = found
            rows_a, rows_b = blocks[block]
            a, b = rows_a[start : start + rank], rows_b[start : start + rank]  # [r, in], [r, out]
            if small:
                # a few tokens (decode of one or a few streams): the bf16 GEMM's fixed cost (~35 us a
                # call here) dwarfs the work; fp32 is ~4x cheaper, and no less exact
                a32, b32 = self.single_rows_f32(ctx)
                y2.add_(F.linear(x2.float(), a32) @ b32)  # [N, out] += ([N, in] @ [r, in]^T) @ [r, out], fp32
            else:
                y2.addmm_(x2 @ a.T, b)  # [N, out] += [N, r] @ [r, out]
            return
        self._single_f32 = None
        plan = self._rows_plan(ctx)
        for block, key, lo, hi, columns, index in plan:
            rows_a, rows_b = blocks[block]
            a, b = _read_rows(rows_a, lo, hi, index), _read_rows(rows_b, lo, hi, index)  # [R, in], [R, out]
            if small:  # as above, fp32 for a few tokens
                delta_in = (x2.float() @ a.float().T).mul_(ctx.mask(key, columns, torch.float32))  # [N, R]
                y2.add_(delta_in @ b.float())
            else:
                delta_in = (x2 @ a.T).mul_(ctx.mask(key, columns, self.dtype))  # [N, R]: each token's own slots' rows, weighted
                y2.addmm_(delta_in, b)  # [N, out] += [N, R] @ [R, out]


#: read the LoRA A rows of projections that share an input (q/k/v, gate/up) in one GEMM; a
#: switch so tools/engine_bench.py can compare both in one process
GROUPED_LORA = {"enabled": True}


#: place a group's B rows block-diagonally and add them with one GEMM where that pays (see
#: LoraGroup._diag_pays); a switch so tools/engine_bench.py can compare both in one process
DIAG_B = {"enabled": True}
# Fitted to [N, R] x [R, out] bf16 products on the development machine (gate/up and q/k/v at ranks
# 8 and 16, N = 16..512): one call costs ~60-75 us beyond its multiply-adds, done at ~900 GFLOP/s;
# e.g. gate/up with 8 rank-8 adapters: one B_diag GEMM 97-103 us against 140-174 us for two at N=64,
# 343 against 306 at N=256
# (CPU only: on other devices each member adds its own B rows)
DIAG_CALL_US = 60.0
DIAG_FLOPS_PER_US = 900e3
#: the largest B_diag copy a group keeps (it lives while the same slots are in use): 8 rank-16
#: adapters' gate/up rows take 1.5 MiB; at most ~120 MiB over a 30-layer model's 60 groups
DIAG_MAX_BYTES = 2 << 20


class LoraGroup:
    """Projections that read the same input (q/k/v; gate/up), each adding its LoRA delta into its
    own column span of one fused output. In a mixed step of more than ``SMALL_M_FP32`` tokens their
    used A rows are read by ONE GEMM over a copy ``A_cat [R_q + R_k + ..., in]`` (rebuilt when
    the used slots or any member's rows change; it holds only the used slots' A rows), the
    per-token mask is applied once, and each member's B rows (read in place) add into its span:
    ``2 + members`` ops instead of ``3 x members``. Where the members' B products are so small
    that their per-call cost dominates (decode-sized steps; see ``_diag_pays``), the B rows are
    instead placed block-diagonally in one ``B_diag [R, sum(out)]`` (a copy, zero where a member's
    rows meet another member's columns, built once per set of used slots) and added by ONE GEMM
    into the whole fused output: 3 ops for the group. Single-adapter and small steps, and rows
    spread over several blocks, use each member's own ``add_lora``."""

    def __init__(self, modules: Sequence[MultiLoraLinear]) -> None:
        self.modules = tuple(modules)
        for module in self.modules:
            module.groups.append(self)
        self._cache: tuple | None = None  # (key, A_cat [R, in], columns [R], mask key, per member (block, lo, hi, index, r0, r1))
        self._diag: tuple | None = None  # (cache key, B_diag [R, width]) for the used slots, see _b_diag
        self._single: tuple | None = None  # (key, A_cat [R, in], B_diag [R, width]) fp32, see _single_f32

    @property
    def context(self) -> LoraBatchContext:
        return self.modules[0].context

    def _single_f32(self, ctx: LoraBatchContext, spans: Sequence[tuple[int, int]]) -> tuple | None:
        """For one adapter streaming alone in small steps: its members' A rows stacked,
        ``A_cat [R, in]`` (applied as ``F.linear``: MKL's x @ A^T path, see ``add_lora``), and their
        B rows placed block-diagonally, ``B_diag [R, sum(out)]`` (zero where a member's rows meet
        another member's columns), both fp32; kept while that slot streams alone (rebuilt when its
        rows change). None when the members' outputs are not one contiguous span (then per member)."""
        slot = ctx.used[0]
        key = ("single", slot, tuple(m._rows_version for m in self.modules))
        cached = self._single
        if cached is not None and cached[0] == key:
            return cached
        width = spans[-1][1]
        parts, rows = [], []
        for module, (lo, hi) in zip(self.modules, spans):
            found = module.row_of.get(slot)
            if found is None:
                continue
            block, start, rank = found
            rows_a, rows_b = module.blocks[block]
            parts.append(rows_a[start : start + rank].float())  # [r, in]
            b = torch.zeros(rank, width, dtype=torch.float32, device=rows_b.device)
            b[:, lo:hi] = rows_b[start : start + rank].float()  # [r, out_i] in its own columns
            rows.append(b)
        if not parts:
            self._single = None
            return None
        self._single = (key, torch.cat(parts), torch.cat(rows))  # [R, in], [R, width]
        return self._single

    def single_rows_f32(self, ctx: LoraBatchContext, spans: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A_cat [R, in], B_diag [R, sum(out)])`` fp32 of the one adapter streaming alone (see
        ``_single_f32``), or None when no member has rows for it (then nothing is added: each
        member's own path finds none either). Drops the mixed-step copies while it streams."""
        single = self._single_f32(ctx, spans)
        if single is None:
            return None
        self._cache = self._diag = None  # the mixed-step copies: not needed while one slot streams alone
        return single[1], single[2]

    def _members(self, ctx: LoraBatchContext) -> tuple | None:
        key = (ctx.used, tuple(m._rows_version for m in self.modules))
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached
        parts, columns, layout, members = [], [], [], []
        start = 0
        for module in self.modules:
            plan = module._rows_plan(ctx) if module.row_of else []
            if len(plan) > 1:
                self._cache = None
                return None  # rows in several blocks: per member
            if not plan:
                members.append(None)
                continue
            block, mask_key, lo, hi, cols, index = plan[0]
            rows_a = module.blocks[block][0]
            a = _read_rows(rows_a, lo, hi, index)  # [R_i, in]
            parts.append(a)
            columns.append(cols)
            layout.append(mask_key)
            members.append((block, lo, hi, index, start, start + a.shape[0]))
            start += a.shape[0]
        if not parts:
            self._cache = None
            return None
        self._cache = (key, torch.cat(parts), torch.cat(columns), ("group", *layout), tuple(members))
        return self._cache

    def forget(self) -> None:
        """Drop the working copies (a member's slot was cleared, or this step does not use them):
        they are rebuilt from the stored rows when needed."""
        self._cache = self._diag = self._single = None

    def _diag_pays(self, n: int, members: tuple, spans: Sequence[tuple[int, int]]) -> bool:
        """Whether one GEMM over ``B_diag`` beats one per member for ``n`` tokens: its extra
        multiply-adds (the zero blocks) against the fixed cost of the calls it saves
        (``DIAG_CALL_US``, ``DIAG_FLOPS_PER_US``); never when the copy would exceed
        ``DIAG_MAX_BYTES`` (many adapters in one step)."""
        rows = [0 if m is None else m[5] - m[4] for m in members]
        return _diag_wins(n, rows, spans, self.modules[0].dtype.itemsize)

    def _b_diag(self, found: tuple, width: int, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``B_diag [R, width]``: each member's used B rows in its own columns, zero elsewhere;
        cached with the A rows (same key)."""
        key = found[0]
        cached = self._diag
        if cached is not None and cached[0] == key:
            return cached[1]
        _, a_cat, _, _, members = found
        b_diag = torch.zeros(a_cat.shape[0], width, dtype=a_cat.dtype, device=a_cat.device)
        for module, (lo, hi), member in zip(self.modules, spans, members):
            if member is None:
                continue
            block, row_lo, row_hi, index, r0, r1 = member
            b_diag[r0:r1, lo:hi] = _read_rows(module.blocks[block][1], row_lo, row_hi, index)
        self._diag = (key, b_diag)
        return b_diag

    def add_lora(self, x2: torch.Tensor, y2: torch.Tensor, spans: Sequence[tuple[int, int]]) -> None:
        """``y2[:, span_i] += LoRA_i(x2)`` for every member: x2 [N, in], y2 [N, sum(out)]."""
        ctx = self.modules[0].context
        if not ctx.used:
            return
        first = self.modules[0]
        small = x2.shape[0] <= SMALL_M_FP32 and first.dtype == torch.bfloat16 and x2.device.type == "cpu"
        if ctx.single and small and GROUPED_LORA["enabled"]:
            single = self.single_rows_f32(ctx, spans)
            if single is not None:  # y += (x @ A_cat^T) @ B_diag: 4 ops for the whole group, in fp32
                y2.add_(F.linear(x2.float(), single[0]) @ single[1])  # [N, sum(out)] += ([N, in] @ A_cat^T) @ [R, sum(out)]
                return
        self._single = None
        found = None if (ctx.single or small or not GROUPED_LORA["enabled"]) else self._members(ctx)
        if found is None:
            self._diag = None
            for module, (lo, hi) in zip(self.modules, spans):
                module.add_lora(x2, y2[:, lo:hi])
            return
        _, a_cat, columns, mask_key, members = found
        delta_in = (x2 @ a_cat.T).mul_(ctx.mask(mask_key, columns, first.dtype))  # [N, R]: each token's own slots' rows, weighted
        if DIAG_B["enabled"] and x2.device.type == "cpu" and y2.shape[1] == spans[-1][1] and self._diag_pays(x2.shape[0], members, spans):
            y2.addmm_(delta_in, self._b_diag(found, y2.shape[1], spans))  # [N, width] += [N, R] @ [R, width]
            return
        self._diag = None
        for module, (lo, hi), member in zip(self.modules, spans, members):
            if member is None:
                continue
            block, row_lo, row_hi, index, r0, r1 = member
            rows_b = module.blocks[block][1]
            b = _read_rows(rows_b, row_lo, row_hi, index)  # [R_i, out]
            y2[:, lo:hi].addmm_(delta_in[:, r0:r1], b)  # [N, out_i] += [N, R_i] @ [R_i, out_i]


#: fold the resident adapters' A rows into the base GEMM of their projection (bf16 on CPU, on
#: the prepacked path); a switch so tools/engine_bench.py can compare both in one process
FOLD_A = {"enabled": True}


def _diag_wins(n: int, rows: Sequence[int], spans: Sequence[tuple[int, int]], itemsize: int) -> bool:
    """Whether one GEMM over a block-diagonal B (``rows[i]`` rows for member i, in its own column
    span) beats one GEMM per member for ``n`` tokens: the zero blocks' multiply-adds against the
    fixed cost of the calls saved (``DIAG_CALL_US``, ``DIAG_FLOPS_PER_US``); never past
    ``DIAG_MAX_BYTES``."""
    present = [(r, span) for r, span in zip(rows, spans) if r]
    if len(present) < 2:
        return False
    total = sum(r for r, _ in present)
    width = spans[-1][1]
    if total * width * itemsize > DIAG_MAX_BYTES:
        return False
    wasted = 2 * n * (total * width - sum(r * (hi - lo) for r, (lo, hi) in present))
    return wasted / DIAG_FLOPS_PER_US < DIAG_CALL_US * (len(present) - 1)


@dataclass(frozen=True)
class Fold:
    """One build of a ``FoldedShrink``: the base weight with its members' A rows appended,
    prepacked, and what the extra output columns hold. Never changed once built (a refresh
    makes a new one), so a forward on another thread reads one consistent build; the one
    exception is ``b_diag``, filled in once from the build's own rows when the GEMM expand first
    runs beside a kernel plan (an idempotent cache: every writer stores the same tensor)."""

    packed: torch.Tensor  # oneDNN-prepacked [width + R, in]: base rows, then member i's block-0 A rows [0, hi_i)
    bias: torch.Tensor | None  # [width + R] (the base bias, zero on the A rows) or None
    width: int  # base output columns; the GEMM's output has width + R
    versions: tuple[int, ...]  # each member's rows version when built (a write or clear bumps it)
    rows: tuple[int, ...]  # hi_i: block-0 rows folded per member (0 = none)
    owners: tuple[tuple[int, ...], ...]  # per member: the slot owning each folded row (0 = free)
    b_diag: torch.Tensor | None  # [R, width]: each member's B rows [0, hi_i) in its own columns (groups only; with a kernel plan, built on the GEMM path's first use)
    kernel: expand_kernel.ExpandPlan | None = None  # the expand as one kernel call (bf16 CPU, compiler present), or None
    plans: dict = field(default_factory=dict, compare=False)  # ctx.used -> (layout key, columns [R]) or None


#: the largest block-diagonal B copy a fold keeps (it lives as long as the fold): q/k/v with 8
#: rank-8 adapters takes 360 KiB and its one GEMM measured 149-174 us against 275-316 for three
#: (64 tokens, cold caches); gate/up would take 768 KiB per layer (23 MiB on the embedded base)
#: for 222-239 us against 241-259: not worth the memory
FOLD_DIAG_MAX_BYTES = 512 << 10

#: column layouts of folded rows, interned so layers sharing one share the step's mask; ids
#: never repeat, so clearing the table (past 256 layouts) can only lose sharing, never mix masks
_LAYOUTS: dict[tuple[int, ...], tuple] = {}
_LAYOUT_IDS = itertools.count()


class FoldedShrink:
    """The LoRA shrink (``x @ A^T``) of a projection's members computed INSIDE its base GEMM.

    On this CPU a small bf16 GEMM costs 40-150 us whatever its size (measured: ``[64, 576] x
    [576, 64]`` 100-120 us with cold caches), so a separate shrink GEMM per projection was a third
    of a mixed step's LoRA time. Instead the resident adapters' A rows (each member's first block,
    rows ``[0, hi)``: every slot there, used this step or not) are appended to the base weight and
    prepacked once per adapter change (``refresh``, on a background thread). Every
    GEMM then returns ``[N, width + R]``: the base output and each token's products with all those
    A rows, for a few percent more multiply-adds and no extra call. ``add_lora`` then adds each
    token's ``u @ B`` over its own slots' rows (weighted for a mix) into the base output: with
    the C kernel (``expand_kernel``, one call for the group, each token reading only its rows)
    where it is available, else by masking the extra columns and one GEMM over a block-diagonal
    B copy, or one per member.

    The prepacked base weight is replaced by the folded one while a fold exists (one copy of the
    base weights, not two). Refolding costs a repack of the projection (about 250 ms for the
    whole embedded base), so it runs off the engine thread (``LlamaStepForward.schedule_refresh``)
    and meanwhile the last fold keeps serving: its base columns never go stale, and its LoRA
    columns are used only while it is current (no member's rows changed since the build) and
    covers every slot the step uses (slots whose rows lie in a later block are not folded);
    otherwise the caller adds LoRA by its plain path, so a step racing an install is exact.
    Knows nothing of models or requests: a base weight, members, their spans."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, modules: Sequence[MultiLoraLinear], spans: Sequence[tuple[int, int]]) -> None:
        self.weight = weight  # [width, in] the base weight (kept unpacked: the fold is rebuilt from it)
        self.bias = bias
        self.modules = tuple(modules)
        self.spans = tuple(spans)
        self.fold: Fold | None = None
        self.uses = 0  # steps that added LoRA through the fold (tests check the path ran)
        self.kernel_uses = 0  # of which through expand_kernel
        self.kernel_wanted = True  # False: the masked GEMM expand (--lora-expand gemm)

    def current(self) -> Fold | None:
        fold = self.fold
        if fold is None or not FOLD_A["enabled"]:
            return None
        if fold.versions != tuple(m._rows_version for m in self.modules):
            return None
        return fold

    def refresh(self) -> bool:
        """Rebuild the fold from the members' rows if any changed (or drop it when no member holds
        rows or folding is off); returns whether a fold exists now. Call with the slot table's lock
        held (no write may run meanwhile)."""
        versions = tuple(m._rows_version for m in self.modules)
        if self.fold is not None and self.fold.versions == versions and FOLD_A["enabled"]:
            return True
        rows, owners, parts = [], [], [self.weight]
        for module in self.modules:
            hi = max((start + rank for block, start, rank in module.row_of.values() if block == 0), default=0)
            slot_of = {}
            for slot, (block, start, rank) in module.row_of.items():
                if block == 0:
                    slot_of.update({r: slot for r in range(start, start + rank)})
            rows.append(hi)
            owners.append(tuple(slot_of.get(r, 0) for r in range(hi)))
            if hi:
                parts.append(module.blocks[0][0][:hi])  # [hi, in]
        if not FOLD_A["enabled"] or not sum(rows):
            self.fold = None
            return False
        folded = torch.cat(parts)  # [width + R, in]
        packed = pack_weight(folded)
        if packed is None:
            self.fold = None
            return False
        width = int(self.weight.shape[0])
        bias = None if self.bias is None else torch.cat([self.bias, self.bias.new_zeros(sum(rows))])
        kernel = None
        if self.kernel_wanted and folded.dtype == torch.bfloat16 and folded.device.type == "cpu" and expand_kernel.available():
            members, r0 = [], 0
            for module, (lo, _), hi in zip(self.modules, self.spans, rows):
                if hi:
                    slots = {slot: (first, count) for slot, (block, first, count) in module.row_of.items() if block == 0}
                    members.append((lo, r0, module.blocks[0][1][:hi], slots))
                r0 += hi
            try:
                kernel = expand_kernel.ExpandPlan(members)
            except ValueError:  # a slot past the kernel's row-pair limit: this fold keeps the GEMM expand
                kernel = None
        # the block-diagonal B serves the GEMM expand; with the kernel it is built only if that
        # path runs (the kernel switched off for an A/B run): memory for nothing otherwise
        b_diag = self._diag(rows) if kernel is None else None
        self.fold = Fold(packed=packed, bias=bias, width=width, versions=versions, rows=tuple(rows), owners=tuple(owners), b_diag=b_diag, kernel=kernel)
        return True

    def _diag(self, rows: Sequence[int]) -> torch.Tensor | None:
        """[R, width]: each member's B rows [0, hi_i) in its own columns (groups within
        ``FOLD_DIAG_MAX_BYTES`` only), or None."""
        if len(self.modules) == 1 or sum(rows) * self.spans[-1][1] * self.weight.element_size() > FOLD_DIAG_MAX_BYTES:
            return None
        b_diag = torch.zeros(sum(rows), self.spans[-1][1], dtype=self.weight.dtype, device=self.weight.device)  # a member may hold no rows (no block)
        r0 = 0
        for module, (lo, hi_col), hi in zip(self.modules, self.spans, rows):
            if hi:
                b_diag[r0 : r0 + hi, lo:hi_col] = module.blocks[0][1][:hi]
            r0 += hi
        return b_diag

    def _plan(self, fold: Fold, ctx: LoraBatchContext) -> tuple | None:
        """(layout key, columns [R]) for this step's used slots, or None when a used slot's rows
        are not folded (in a later block)."""
        found = fold.plans.get(ctx.used, False)
        if found is not False:
            return found
        index = {s: i for i, s in enumerate(ctx.used)}
        plan = None
        if all(module.row_of[s][0] == 0 for module in self.modules for s in ctx.used if s in module.row_of):
            cols = tuple(index.get(s, len(ctx.used)) for owner in fold.owners for s in owner)
            if len(_LAYOUTS) > 256:
                _LAYOUTS.clear()
            key = _LAYOUTS.get(cols)
            if key is None:
                key = _LAYOUTS[cols] = ("fold", next(_LAYOUT_IDS))
            columns = torch.tensor(cols, dtype=torch.long, device=fold.packed.device)
            plan = (key, columns, (columns == 0).to(self.weight.dtype))  # the last: rows of used[0], for single steps
        if len(fold.plans) > 64:
            fold.plans.clear()
        fold.plans[ctx.used] = plan
        return plan

    def add_lora(self, fold: Fold, u: torch.Tensor, y: torch.Tensor, ctx: LoraBatchContext) -> bool:
        """``y[:, span_i] += LoRA_i`` from the folded products ``u`` [N, R] (the extra columns of
        ``fold``'s GEMM; scaled in place), y [N, width]; False (nothing done) when the fold does
        not cover this step's slots or is stale (a member's rows changed since its build: the
        caller then adds LoRA by its plain path, the GEMM's base columns being still right)."""
        if not ctx.used:  # no token uses an adapter: the extra columns are ignored
            return True
        if fold.versions != tuple(m._rows_version for m in self.modules):
            return False
        plan = self._plan(fold, ctx)
        if plan is None:
            return False
        key, columns, first = plan
        if fold.kernel is not None and expand_kernel.usable(u.shape[0]):
            # each token reads only its own slots' rows: no mask, one call for the whole group
            fold.kernel.run(y, u, ctx.segments())
            self.uses += 1
            self.kernel_uses += 1
            return True
        if ctx.single:  # every token uses used[0]: keep its rows, zero the others
            u.mul_(first)
        else:
            u.mul_(ctx.mask(key, columns, u.dtype))  # [N, R]: each token's own slots' rows, weighted
        if fold.b_diag is None and fold.kernel is not None and DIAG_B["enabled"]:
            object.__setattr__(fold, "b_diag", self._diag(fold.rows))  # the GEMM path with a kernel plan: an A/B run, or a step past MAX_TOKENS
        if fold.b_diag is not None and DIAG_B["enabled"] and _diag_wins(u.shape[0], fold.rows, self.spans, u.element_size()):
            y.addmm_(u, fold.b_diag)  # [N, width] += [N, R] @ [R, width]
        else:
            r0 = 0
            for module, (lo, hi_col), hi in zip(self.modules, self.spans, fold.rows):
                if hi:
                    y[:, lo:hi_col].addmm_(u[:, r0 : r0 + hi], module.blocks[0][1][:hi])  # [N, out_i] += [N, hi] @ [hi, out_i]
                r0 += hi
        self.uses += 1
        return True


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear


def inject_multi_lora(
    model: nn.Module,
    context: LoraBatchContext,
    exclude: Sequence[str] = tuple(sorted(EXCLUDED_TARGETS)),
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> dict[str, MultiLoraLinear]:
    """Wrap every Linear of the model (except ``exclude``: by default the layers that never carry
    LoRA, ``store/targets.py``) in place; returns name -> wrapper. LoRA weights are kept (and
    applied) at ``dtype``."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if _is_linear(module) and name.rsplit(".", 1)[-1] not in exclude
    ]
    wrapped: dict[str, MultiLoraLinear] = {}
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in exclude:  # the lm_head: no LoRA, prepacked bf16
            packed = pack_weight(module.weight)
            if packed is not None:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, PackedLinear(module, packed))
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(module, name, context, dtype=dtype, device=device)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped
