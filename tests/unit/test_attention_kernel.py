"""The C decode attention kernel (server/engine/attention_kernel.py) against softmax attention
computed here in float64 from the raw bf16 tensors: every specialised (group, head size) pair and
the generic path, lengths around the 16-position score blocks and the 64-position softmax blocks
(the online rescaling), tokens reading rows out of order, strided queries, large score gaps (the
running max), and the shapes it refuses."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import attention_kernel

pytestmark = pytest.mark.skipif(not attention_kernel.available(), reason=f"the attention kernel does not build here: {attention_kernel.why_not()}")


def _reference(q, k, v, slots, lens, scale):
    """Per token t and query head h: softmax(scale * K q) V over positions [0, lens[t]) of row
    slots[t], kv head h // group, in float64 from the bf16 values."""
    n, heads, d = q.shape
    group = heads // k.shape[1]
    out = torch.empty(n, heads, d, dtype=torch.float64)
    for t in range(n):
        s, length = int(slots[t]), int(lens[t])
        for h in range(heads):
            keys = k[s, h // group, :length].double()  # [L, d]
            p = torch.softmax(keys @ q[t, h].double() * scale, dim=0)
            out[t, h] = p @ v[s, h // group, :length].double()
    return out


def _check(out, ref):
    # the kernel rounds once to bf16 (within 2^-8 relative of its fp32 value); its fp32 softmax
    # and dot products are far tighter than that at these sizes
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs()
    bound = ref.abs() * 2.0**-8 + 1e-3
    assert bool((err <= bound).all()), f"largest error {float(err.max()):.3g} at {divmod(int(err.argmax()), out.shape[1] * out.shape[2])}"


@pytest.mark.parametrize(
    "heads, kv_heads, d",
    [(9, 3, 64), (4, 4, 64), (4, 2, 64), (8, 2, 64), (5, 1, 64), (16, 2, 64), (6, 1, 64), (7, 1, 64), (8, 8, 128), (8, 4, 128), (8, 2, 128), (8, 1, 128), (6, 2, 96), (2, 1, 32), (3, 3, 256)],
)
def test_decode_attention_matches_float64_softmax(heads, kv_heads, d):
    torch.manual_seed(heads * 1000 + kv_heads * 10 + d)
    rows, cap = 6, 160
    k = torch.randn(rows, kv_heads, cap, d).bfloat16()
    v = torch.randn(rows, kv_heads, cap, d).bfloat16()
    lens = torch.tensor([1, 15, 16, 17, 64, 65, 130, 160], dtype=torch.int32)
    slots = torch.tensor([5, 0, 3, 3, 1, 2, 4, 0], dtype=torch.int32)  # out of order, a row read twice
    q = torch.randn(len(lens), heads, d).bfloat16()
    out = attention_kernel.decode(q, k, v, slots, lens, d**-0.5)
    _check(out, _reference(q, k, v, slots, lens, d**-0.5))


def test_strided_queries_and_a_large_score_gap():
    """q as the head slice of a fused q/k projection (row stride past the heads), and a key far
    more similar than the rest in a late softmax block: the online max must rescale what the
    earlier blocks summed."""
    torch.manual_seed(7)
    heads, kv_heads, d, cap = 9, 3, 64, 200
    fused = torch.randn(4, heads + kv_heads, d).bfloat16()
    q = fused[:, :heads]  # [4, 9, 64], row stride 12 * 64
    k = torch.randn(2, kv_heads, cap, d).bfloat16() * 0.1
    v = torch.randn(2, kv_heads, cap, d).bfloat16()
    k[1, :, 150] = q[2].reshape(kv_heads, heads // kv_heads, d)[:, 0] * 4  # position 150 dominates token 2's first heads
    slots = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    lens = torch.tensor([3, 151, 200, 199], dtype=torch.int32)
    out = attention_kernel.decode(q, k, v, slots, lens, 0.125)
    ref = _reference(q, k, v, slots, lens, 0.125)
    _check(out, ref)
    assert float((ref[2, 0] - v[1, 0, 150].double()).abs().max()) < 0.05  # the case is what it claims: one key wins


def test_refused_shapes_name_what_does_not_fit():
    k = torch.zeros(2, 2, 8, 64, dtype=torch.bfloat16)
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    ok = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        attention_kernel.decode(q, k, k, ok, ok.long(), 0.1)  # int64 lengths
    with pytest.raises(ValueError, match="do not fit"):
        narrow = k[..., :32].contiguous()
        attention_kernel.decode(q, narrow, narrow, ok, ok, 0.1)  # head sizes differ (q 64, K/V 32)
    with pytest.raises(ValueError, match="refused"):
        attention_kernel.decode(torch.zeros(1, 3, 64, dtype=torch.bfloat16), k, k, ok, ok + 1, 0.1)  # 3 heads over 2 kv heads
    odd = torch.zeros(2, 2, 8, 48, dtype=torch.bfloat16)
    assert not attention_kernel.fits(torch.zeros(1, 4, 48, dtype=torch.bfloat16), odd)  # 48 is not a multiple of 32
    assert not attention_kernel.fits(q.float(), k.float())  # fp32 keeps SDPA
    assert not attention_kernel.fits(q, k[:, :, ::2])  # a strided cache: decode() would refuse it
    assert attention_kernel.fits(q, k)
