"""The running batch's KV cache, written in place, and the attention over it.

Per layer, keys and values live in one preallocated buffer ``[rows, kv_heads, capacity, head_dim]``;
each running sequence owns one row (a KV slot) from admission to its end. A step's new keys and
values are written at each token's (slot, position): no per-step concatenation, and nothing is
copied when a sequence joins or leaves (its slot is simply reused). The buffers grow by doubling,
in rows up to ``max_rows`` and in positions up to ``max_len``; a growth copies the cache once
(at most log2 times over a server's life), never per step.

A step's tokens arrive flattened, ``[1, N]`` (decode tokens first, one per decoding row, then the
prefill chunks): :class:`StepPlan` says where each token goes. :meth:`KvCache.attend_flat`
writes a layer's new k/v into the buffers and attends (one batched SDPA over the decoding rows,
one per prefill chunk); the engine's lean forward calls it directly, and for other models it is
registered with transformers as the attention implementation ``loraplex_rows`` (the model's own
modules compute q/k/v and rotary, then call :func:`rows_attention`). Knows nothing of adapters,
requests or tokenizers.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.server.engine import attention_kernel

ATTENTION_NAME = "loraplex_rows"

#: decode attention with a kv head's query heads folded into query positions (see attend_flat);
#: a switch so tools/engine_bench.py can compare both in one process
FOLD_GQA = {"enabled": True}


@dataclass
class _Chunk:
    token_start: int  # index of its first token in the flattened step
    n: int  # tokens in the chunk
    slot: int  # KV row
    start_pos: int  # position of its first token
    mask: torch.Tensor | None  # [n, start_pos + n] bool; None = plain causal from position 0


@dataclass
class StepPlan:
    """Where one step's flattened tokens go; built once per step, used by every layer."""

    cache: "KvCache"
    token_slots: torch.Tensor  # [N] long: KV row of each token
    token_pos: torch.Tensor  # [N] long: position of each token
    num_decode: int  # the first num_decode tokens are one per decoding row
    decode_slots: torch.Tensor | None  # [num_decode] long
    decode_rows: int  # decode attention runs over KV rows [0, decode_rows)
    decode_len: int  # ... and positions [0, decode_len)
    decode_mask: torch.Tensor | None  # [decode_rows, 1, 1, decode_len] bool
    chunks: list[_Chunk]
    decode_in_order: bool = False  # decode tokens are rows 0..num_decode-1 in order: no scatter/gather
    decode_slots32: torch.Tensor | None = None  # [num_decode] int32: the decode kernel's rows ...
    decode_lens32: torch.Tensor | None = None  # ... and lengths (positions [0, len) of its row)


class KvCache:
    """K/V buffers for up to ``max_rows`` sequences of up to ``max_len`` positions each."""

    def __init__(self, *, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, max_rows: int, max_len: int, initial_len: int = 128, min_rows: int = 1, decode_kernel: bool = False) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        #: decode tokens attend through attention_kernel where it fits (bf16 on CPU), else SDPA
        self.decode_kernel = decode_kernel
        self.kernel_calls = 0  # layers whose decode attention ran in the kernel (tests count it)
        # buffers hold at least min_rows rows even when max_rows is smaller (the compiled one-row
        # step takes the row count as a dynamic size, and torch.compile specializes sizes of 1)
        self.min_rows = min_rows
        self.dtype, self.device = dtype, torch.device(device)
        self.max_rows, self.max_len = max_rows, max_len
        self.initial_len = min(initial_len, max_len)
        self.keys: list[torch.Tensor] = []  # per layer [rows_cap, kv_heads, len_cap, head_dim]
        self.values: list[torch.Tensor] = []
        self.rows_cap = 0
        self.len_cap = 0
        self.lengths = [0] * max_rows  # tokens in the cache per slot
        self._free = list(range(max_rows))  # a heap: the lowest free slot first keeps the rows in use compact
        self.used_slots: set[int] = set()

    # --------------------------------------------------------------- slots
    @property
    def used_tokens(self) -> int:
        return sum(self.lengths[s] for s in self.used_slots)

    @property
    def capacity_tokens(self) -> int:
        return min(self.rows_cap, self.max_rows) * self.len_cap  # rows kept beyond max_rows (min_rows) never hold a sequence

    @property
    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"no free KV slot: {self.max_rows} sequences already hold one")
        slot = heapq.heappop(self._free)
        self.used_slots.add(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self.used_slots:
            self.used_slots.discard(slot)
            self.lengths[slot] = 0
            heapq.heappush(self._free, slot)

    def release_all(self) -> None:
        for slot in list(self.used_slots):
            self.release(slot)

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copy positions [0, length) of every layer's K/V from row ``src_slot`` into row
        ``dst_slot`` (n > 1: the prompt is prefilled once and each fork starts from a copy). Both
        slots must be allocated and ``src_slot`` must hold ``length`` positions; ``dst_slot`` then
        holds exactly those ``length`` positions (its length is set to ``length``)."""
        for slot in (src_slot, dst_slot):
            if slot not in self.used_slots:
                raise ValueError(f"KV slot {slot} is not allocated")
        if not 0 <= length <= self.lengths[src_slot]:
            raise ValueError(f"cannot copy {length} positions from KV slot {src_slot}, which holds {self.lengths[src_slot]}")
        if src_slot == dst_slot:
            return
        if length:
            self.reserve(dst_slot, length)
            for store in (self.keys, self.values):
                for buf in store:  # [rows, kv_heads, cap, d]
                    buf[dst_slot, :, :length].copy_(buf[src_slot, :, :length])
        self.lengths[dst_slot] = length

    def reserve(self, slot: int, length: int) -> None:
        """Make room for ``length`` positions in ``slot`` (grows the buffers by doubling)."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_model_len {self.max_len}")
        rows, cap = self.rows_cap, self.len_cap
        while rows <= slot:
            rows = min(max(self.max_rows, self.min_rows), max(4, rows * 2))
        while cap < length:
            cap = min(self.max_len, max(self.initial_len, cap * 2))
        if (rows, cap) != (self.rows_cap, self.len_cap):
            self._grow(rows, cap)

    def _grow(self, rows: int, cap: int) -> None:
        shape = (rows, self.kv_heads, cap, self.head_dim)
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(store):
                    new[: self.rows_cap, :, : self.len_cap] = store[layer]
                    store[layer] = new
                else:
                    store.append(new)
        self.rows_cap, self.len_cap = rows, cap

    # ---------------------------------------------------------------- steps
    def plan(self, decode: list[int], chunks: list[tuple[int, int, int]]) -> StepPlan:
        """Plan a step: ``decode`` = KV slots getting one token each (at position = their
        length), ``chunks`` = (slot, start_pos, n) prefill chunks, in the flattened token order.
        Reserves room and advances the slots' lengths (the forward writes those positions)."""
        dev = self.device
        slots: list[int] = []
        positions: list[int] = []
        for slot in decode:
            slots.append(slot)
            positions.append(self.lengths[slot])
            self.reserve(slot, self.lengths[slot] + 1)
        planned: list[_Chunk] = []
        for slot, start, n in chunks:
            self.reserve(slot, start + n)
            planned.append(_Chunk(len(slots), n, slot, start, None))
            slots.extend([slot] * n)
            positions.extend(range(start, start + n))
        for slot in decode:
            self.lengths[slot] += 1
        for chunk in planned:
            self.lengths[chunk.slot] = chunk.start_pos + chunk.n
            if chunk.start_pos:
                # query i (position start+i) sees keys 0..start+i
                q = torch.arange(chunk.start_pos, chunk.start_pos + chunk.n, device=dev)[:, None]
                chunk.mask = torch.arange(chunk.start_pos + chunk.n, device=dev)[None, :] <= q
        decode_slots = decode_mask = decode_slots32 = decode_lens32 = None
        decode_rows = decode_len = 0
        if decode:
            decode_rows = max(decode) + 1
            decode_len = max(self.lengths[s] for s in decode)
            lengths = [1] * decode_rows  # rows not decoding attend to position 0 only (finite, discarded)
            for s in decode:
                lengths[s] = self.lengths[s]
            valid = torch.tensor(lengths, dtype=torch.long, device=dev)
            decode_mask = (torch.arange(decode_len, device=dev)[None, :] < valid[:, None])[:, None, None, :]
            decode_slots = torch.tensor(decode, dtype=torch.long, device=dev)
            if self.decode_kernel:
                decode_slots32 = torch.tensor(decode, dtype=torch.int32)
                decode_lens32 = torch.tensor([self.lengths[s] for s in decode], dtype=torch.int32)
        return StepPlan(
            cache=self,
            token_slots=torch.tensor(slots, dtype=torch.long, device=dev),
            token_pos=torch.tensor(positions, dtype=torch.long, device=dev),
            num_decode=len(decode),
            decode_slots=decode_slots,
            decode_rows=decode_rows,
            decode_len=decode_len,
            decode_mask=decode_mask,
            chunks=planned,
            decode_in_order=decode == list(range(len(decode))),
            decode_slots32=decode_slots32,
            decode_lens32=decode_lens32,
        )

    def attend(self, layer: int, plan: StepPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """transformers' layout: query [1, heads, N, d], key/value [1, kv_heads, N, d] (rotary
        applied) -> [1, N, heads, d]."""
        out = self.attend_flat(layer, plan, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling)
        return out[None].to(query.dtype)

    def attend_flat(self, layer: int, plan: StepPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        """q [N, heads, d], k/v [N, kv_heads, d] (rotary applied): write k/v at each token's
        (slot, position), attend -> [N, heads, d] at the cache's dtype."""
        k_buf, v_buf = self.keys[layer], self.values[layer]  # [rows, kv_heads, cap, d]
        k_buf[plan.token_slots, :, plan.token_pos] = k.to(k_buf.dtype)
        v_buf[plan.token_slots, :, plan.token_pos] = v.to(v_buf.dtype)
        q = q.to(k_buf.dtype)
        parts: list[torch.Tensor] = []
        nd = plan.num_decode
        if nd and plan.decode_lens32 is not None and attention_kernel.fits(q, k_buf):
            # bf16 on CPU: the C kernel reads each token's own row and length (no mask, no padding)
            parts.append(attention_kernel.decode(q[:nd], k_buf, v_buf, plan.decode_slots32, plan.decode_lens32, scaling))  # [nd, heads, d]
            self.kernel_calls += 1
        elif nd:
            _, heads, d = q.shape
            q_dec = q[:nd, :, None, :]  # [nd, heads, 1, d]
            if plan.decode_in_order:  # rows 0..nd-1 decode, in order (every row, or one stream)
                q_rows = q_dec
            else:
                q_rows = q.new_zeros(plan.decode_rows, heads, 1, d)
                q_rows.index_copy_(0, plan.decode_slots, q_dec)
            rows, kv_heads = q_rows.shape[0], k_buf.shape[1]
            if not FOLD_GQA["enabled"]:
                kv_heads = heads  # (the unfolded form, enable_gqa: for tools/engine_bench.py's A/B)
            # GQA folded: the query heads sharing a kv head attend as that head's query
            # POSITIONS (no causal mask among them, the row's mask broadcast to each), so each
            # kv head's K/V is read once for its group and the kernel runs rows x kv_heads
            # problems instead of rows x heads: measured 1.4-2x faster than enable_gqa here
            out = F.scaled_dot_product_attention(
                q_rows.reshape(rows, kv_heads, heads // kv_heads, d),  # [rows, kv_heads, group, d]
                k_buf[: plan.decode_rows, :, : plan.decode_len],
                v_buf[: plan.decode_rows, :, : plan.decode_len],
                attn_mask=plan.decode_mask,  # [rows, 1, 1, len]
                scale=scaling,
                enable_gqa=kv_heads != k_buf.shape[1],
            ).reshape(rows, heads, 1, d)  # [rows, heads, 1, d]
            parts.append((out if plan.decode_in_order else out.index_select(0, plan.decode_slots))[:, :, 0])  # [nd, heads, d]
        for chunk in plan.chunks:
            end = chunk.start_pos + chunk.n
            out = F.scaled_dot_product_attention(
                q[chunk.token_start : chunk.token_start + chunk.n].transpose(0, 1)[None],  # [1, heads, n, d]
                k_buf[chunk.slot : chunk.slot + 1, :, :end],
                v_buf[chunk.slot : chunk.slot + 1, :, :end],
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None,
                scale=scaling,
                enable_gqa=True,
            )  # [1, heads, n, d]
            parts.append(out[0].transpose(0, 1))  # [n, heads, d]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # [N, heads, d]


def rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, loraplex_plan: StepPlan | None = None, **kwargs):
    """transformers attention implementation ``loraplex_rows`` (see the module docstring)."""
    if loraplex_plan is None:
        raise RuntimeError("the loraplex_rows attention runs only inside the loraplex engine (no step plan given)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return loraplex_plan.cache.attend(module.layer_idx, loraplex_plan, query, key, value, scale), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, rows_attention)
