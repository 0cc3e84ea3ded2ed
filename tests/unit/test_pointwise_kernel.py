"""The C element-wise kernels (server/engine/pointwise_kernel.py) against the torch ops they
replace in the lean forward, on bf16: rotary must be bit-identical (the same three roundings of
products and a sum; no input here has subnormal results, which the kernel's bf16 conversion
flushes to zero); residual add + RMSNorm and SiLU * up may differ only where an fp32 sum of
squares or exp differs in its last bits, so at most one bf16 step on a tiny share of elements.
Widths that are not multiples of 16 (masked tails), one row and many, strided column slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.engine import pointwise_kernel

pytestmark = pytest.mark.skipif(not pointwise_kernel.available(), reason=f"the element-wise kernels do not build here: {pointwise_kernel.why_not()}")


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal but for rare one-step bf16 differences (a rounding tie decided by the last fp32 bit)."""
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
    differ = out != ref
    assert int(differ.sum()) <= max(2, ref.numel() // 1000), f"{int(differ.sum())} of {ref.numel()} elements differ"
    step = ref.float().abs() * 2.0**-7 + 1e-30
    assert bool(((out.float() - ref.float()).abs() <= step).all())


@pytest.mark.parametrize("n, cols", [(1, 576), (3, 40), (70, 576), (513, 100), (2, 7)])
def test_add_rms_matches_the_residual_add_and_llama_rmsnorm(n, cols):
    torch.manual_seed(n + cols)
    h = torch.randn(n, cols).bfloat16()
    big = torch.randn(n, cols * 2).bfloat16() * 4
    delta = big[:, 3 : 3 + cols]  # a strided column slice, as the projections' outputs are
    w = torch.randn(cols).bfloat16()
    eps = 1e-5
    summed = h + delta
    ref = w * F.rms_norm(summed.float(), (cols,), None, eps).to(torch.bfloat16)  # transformers' LlamaRMSNorm on bf16
    got_h = h.clone()
    out = pointwise_kernel.add_rms(got_h, delta, w, eps)
    assert torch.equal(got_h, summed)  # the residual is updated in place, rounded like torch's add
    _close(out, ref)
    alone = h.clone()
    _close(pointwise_kernel.add_rms(alone, None, w, eps), w * F.rms_norm(h.float(), (cols,), None, eps).to(torch.bfloat16))
    assert torch.equal(alone, h)  # no delta: h untouched


@pytest.mark.parametrize("n, cols", [(1, 1536), (64, 1536), (5, 24), (300, 33)])
def test_silu_mul_matches_torch(n, cols):
    torch.manual_seed(n * cols)
    gate_up = (torch.randn(n, 2 * cols) * 5).bfloat16()
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamps and zero
    gate, up = gate_up[:, :cols], gate_up[:, cols:]
    _close(pointwise_kernel.silu_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("n, heads, d", [(1, 12, 64), (64, 12, 64), (7, 6, 16), (3, 2, 40), (2, 3, 128)])
def test_rope_is_bit_identical_to_the_torch_rotation(n, heads, d):
    torch.manual_seed(n * heads + d)
    fused = torch.randn(n, (heads + 2) * d).bfloat16()
    x = fused[:, : heads * d].view(n, heads, d)  # rows strided past the heads, as q/k inside the fused q/k/v output
    angles = torch.randn(n, 1, d)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    half = d // 2
    ref = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    assert torch.equal(pointwise_kernel.rope(x, cos, sin), ref)


def test_refused_inputs_name_the_shapes():
    with pytest.raises(ValueError, match="bf16"):
        pointwise_kernel.silu_mul(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="differ"):
        pointwise_kernel.silu_mul(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rope"):
        x = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
        pointwise_kernel.rope(x, torch.zeros(2, 1, 6, dtype=torch.bfloat16), torch.zeros(2, 1, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="add_rms"):
        pointwise_kernel.add_rms(torch.zeros(2, 8, dtype=torch.bfloat16), None, torch.zeros(6, dtype=torch.bfloat16), 1e-6)
