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


@pytest.mark.parametrize("fold_gqa", [True, False], ids=["gqa-folded", "enable-gqa"])
def test_attention_over_the_buffers_equals_causal_attention_per_sequence(fold_gqa, monkeypatch):
    """Decode rows (with each kv head's query heads folded into query positions, or through
    enable_gqa) and prefill chunks, against causal attention computed here per sequence."""
    from loraplex.server.engine import kvcache

    monkeypatch.setitem(kvcache.FOLD_GQA, "enabled", fold_gqa)
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
    assert cache.plan([], []).decode_in_order  # (an empty plan)
    run([slots[0], slots[1], slots[2]], [])  # every row decoding, rows in order (no scatter/gather)
    cache.release(slots[0])
    run([slots[2], slots[1]], [])  # a hole at slot 0, decode order != slot order


def test_copy_prefix_copies_every_layer_and_leaves_the_rest():
    torch.manual_seed(1)
    cache = KvCache(num_layers=3, kv_heads=KV_HEADS, head_dim=D, dtype=torch.float32, device="cpu", max_rows=8, max_len=64, initial_len=4)
    src, other, dst = cache.allocate(), cache.allocate(), cache.allocate()
    plan = cache.plan([], [(src, 0, 6), (other, 0, 3)])
    written = []
    for layer in range(3):
        k, v = torch.randn(1, KV_HEADS, 9, D), torch.randn(1, KV_HEADS, 9, D)
        cache.attend(layer, plan, torch.randn(1, HEADS, 9, D), k, v, 1.0)
        written.append((k[0, :, :6].clone(), v[0, :, :6].clone()))
    other_before = [(cache.keys[i][other].clone(), cache.values[i][other].clone()) for i in range(3)]
    cache.copy_prefix(src, dst, 5)
    assert cache.lengths[dst] == 5 and cache.lengths[src] == 6
    for layer, (k, v) in enumerate(written):
        assert torch.equal(cache.keys[layer][dst, :, :5], k[:, :5])
        assert torch.equal(cache.values[layer][dst, :, :5], v[:, :5])
        assert torch.equal(cache.keys[layer][src, :, :6], k) and torch.equal(cache.values[layer][src, :, :6], v)
        assert torch.equal(cache.keys[layer][other], other_before[layer][0])
        assert torch.equal(cache.values[layer][other], other_before[layer][1])
    # the fork decodes on from its copy: its next token attends over the copied prefix
    plan = cache.plan([dst], [])
    k_new, v_new = torch.randn(1, KV_HEADS, 1, D), torch.randn(1, KV_HEADS, 1, D)
    q = torch.randn(1, HEADS, 1, D)
    out = cache.attend(0, plan, q, k_new, v_new, 1 / math.sqrt(D))[0]
    k_all = torch.cat([written[0][0][:, :5], k_new[0]], dim=1)
    v_all = torch.cat([written[0][1][:, :5], v_new[0]], dim=1)
    torch.testing.assert_close(out.transpose(0, 1), _reference(q[0], k_all, v_all))


def test_copy_prefix_refuses_bad_slots_and_lengths():
    cache = _cache()
    src, dst = cache.allocate(), cache.allocate()
    cache.plan([], [(src, 0, 3)])
    with pytest.raises(ValueError, match="holds 3"):
        cache.copy_prefix(src, dst, 4)
    with pytest.raises(ValueError, match="not allocated"):
        cache.copy_prefix(src, 7, 2)
    assert cache.lengths[dst] == 0
    rows_before = cache.rows_cap
    while (new := cache.allocate()) < rows_before:
        pass  # a fresh row past the current rows capacity: the copy grows the buffers
    cache.copy_prefix(src, new, 3)
    assert cache.rows_cap > rows_before
    assert cache.lengths[new] == 3 and torch.equal(cache.keys[0][new, :, :3], cache.keys[0][src, :, :3])
