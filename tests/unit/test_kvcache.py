"""The in-place KV cache: slots are reused without moving the buffers, new K/V land at each
token's (slot, position), growth keeps what is cached, and the attention over the buffers equals
plain causal attention per sequence (computed here independently, with repeat_kv and softmax)."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.server.engine.kvcache import KvCache

HEADS, KV_HEADS, D = 4, 2, 8


def _cache(max_rows=8, max_len=64, initial_len=4):
    return KvCache(num_layers=1, kv_heads=KV_HEADS, head_dim=D, dtype=torch.float32, device="cpu", max_rows=max_rows, max_len=max_len, initial_len=initial_len)


def _reference(q, k, v):
    """Causal attention of one sequence: q [H, n, D] at the last n positions of k/v [KV, T, D]."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=0)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=0)
    n, t = q.shape[1], k.shape[1]
    scores = q @ k.transpose(1, 2) / math.sqrt(D)  # [H, n, T]
    allowed = torch.arange(t)[None, :] <= (torch.arange(n) + t - n)[:, None]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v  # [H, n, D]


def test_rows_join_and_leave_without_moving_the_buffers():
    cache = _cache()
    a, b = cache.allocate(), cache.allocate()
    cache.plan([], [(a, 0, 3), (b, 0, 2)])
    ptr = cache.keys[0].data_ptr()
    cache.release(a)
    c = cache.allocate()
    assert c == a  # the lowest free slot is reused
    cache.plan([b], [(c, 0, 2)])
    assert cache.keys[0].data_ptr() == ptr
    assert cache.used_tokens == 3 + 2 and cache.lengths[b] == 3


def test_growth_doubles_and_keeps_cached_values():
    cache = _cache(initial_len=4)
    s = cache.allocate()
    plan = cache.plan([], [(s, 0, 3)])
    k = torch.randn(1, KV_HEADS, 3, D)
    cache.attend(0, plan, torch.randn(1, HEADS, 3, D), k, k.clone(), 1.0)
    assert cache.len_cap == 4
    others = [cache.allocate() for _ in range(5)]  # slot 5 needs more rows
    cache.plan([], [(o, 0, 1) for o in others] + [(s, 3, 6)])  # 9 positions: 4 -> 16
    assert cache.len_cap == 16 and cache.rows_cap == 8
    assert torch.equal(cache.keys[0][s, :, :3], k[0])
    with pytest.raises(ValueError, match="max_model_len 64"):
        cache.reserve(s, 65)


def test_attention_over_the_buffers_equals_causal_attention_per_sequence():
    torch.manual_seed(0)
    cache = _cache()
    seqs = {}
    slots = [cache.allocate() for _ in range(3)]
    lengths = {slots[0]: 5, slots[1]: 9, slots[2]: 2}
    for s, n in lengths.items():
        seqs[s] = (torch.randn(KV_HEADS, n + 4, D), torch.randn(KV_HEADS, n + 4, D))
    # step 1: prefill slot0 whole, slot1 in two chunks (4 now), slot2 whole
    def run(decode, chunks):
        plan = cache.plan(decode, chunks)
        ks = [seqs[s][0][:, cache.lengths[s] - 1][:, None] for s in decode]
        vs = [seqs[s][1][:, cache.lengths[s] - 1][:, None] for s in decode]
        for s, start, n in chunks:
            ks.append(seqs[s][0][:, start : start + n])
            vs.append(seqs[s][1][:, start : start + n])
        k = torch.cat(ks, dim=1)[None]
        v = torch.cat(vs, dim=1)[None]
        q = torch.randn(1, HEADS, k.shape[2], D)
        out = cache.attend(0, plan, q, k, v, 1 / math.sqrt(D))[0]  # [N, H, D]
        i = 0
        for s in decode:
            t = cache.lengths[s]
            expect = _reference(q[0, :, i : i + 1], seqs[s][0][:, :t], seqs[s][1][:, :t])
            torch.testing.assert_close(out[i : i + 1].transpose(0, 1), expect)
            i += 1
        for s, start, n in chunks:
            expect = _reference(q[0, :, i : i + n], seqs[s][0][:, : start + n], seqs[s][1][:, : start + n])
            torch.testing.assert_close(out[i : i + n].transpose(0, 1), expect)
            i += n

    run([], [(slots[0], 0, 5), (slots[1], 0, 4), (slots[2], 0, 2)])
    run([slots[0], slots[2]], [(slots[1], 4, 5)])  # decode rows and a chunk at an offset, one step
    cache.release(slots[0])
    run([slots[2], slots[1]], [])  # a hole at slot 0, decode order != slot order
