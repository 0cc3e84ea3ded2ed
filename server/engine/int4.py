"""Weight-only int4 GEMMs for decode steps of a few rows, when the base's weights ARE int4.

The embedded base is a Q4_1 GGUF: every projection weight is ``d * q + m`` per group of 32
inputs, ``q`` in 0..15, with one scale ``d`` and minimum ``m`` per group. Served as bf16, a decode
step of one or a few rows reads 2 bytes per weight through oneDNN's small-M bf16 GEMM (about
9.5 GB/s here); torch's int4 weight-only CPU kernel (``_weight_int4pack_mm_for_cpu``) reads half a
byte per weight and ran the 30 layers' projections about 3.7x faster at one row on this machine.

:func:`int4_levels` recovers ``(q, d, m)`` from a weight and accepts it only when every group is
reproduced to within bf16 rounding (a weight that was never int4, e.g. a random test model or a
fp16 base, is refused: no silent requantization); :func:`exact_int4` packs them. :class:`Int4Weight` then holds the packed
form; the kernel takes bf16 activations and bf16 scales/offsets, so its result differs from the
bf16 GEMM by about bf16 rounding (the scales are rounded like the weights are). Steps with more
rows than the engine's ``int4_decode_rows`` use the bf16 GEMM, where AMX wins.
This module knows nothing of models, adapters or requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # Q4_1's group size along the input dimension


@dataclass(frozen=True)
class Int4Weight:
    """A [out, in] weight packed for ``_weight_int4pack_mm_for_cpu``."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor  # [in / GROUP, out, 2] bf16: scale, zero (w = (q - 8) * scale + zero)
    out_features: int

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, in] bf16 -> [M, out] bf16."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        return y if bias is None else y.add_(bias)


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int4_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(q [out, in] in 0..15, scale [out, in / 32], low [out, in / 32])`` fp32 with
    ``weight = scale * q + low`` per group of 32 inputs to within bf16 rounding, when the weight
    is Q4_1-shaped (groups of 32 inputs, 16 evenly spaced levels each); else None."""
    out, inp = weight.shape
    if inp % GROUP or weight.device.type != "cpu":
        return None
    w = weight.detach().float().view(out, inp // GROUP, GROUP)  # [out, g, 32]
    low = w.amin(-1)  # [out, g]
    step = (w.amax(-1) - low) / 15  # [out, g]
    q = ((w - low[..., None]) / step.clamp_min(1e-30)[..., None]).round_().clamp_(0, 15)  # [out, g, 32]
    error = (q * step[..., None] + low[..., None] - w).abs().amax(-1)  # [out, g]
    tolerance = w.abs().amax(-1) * 2.0**-7 + 1e-12  # bf16 keeps 8 significant bits
    if bool((error > tolerance).any()):
        return None
    return q.view(out, inp), step, low


def exact_int4(weight: torch.Tensor, levels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Int4Weight | None:
    """The int4 form of ``weight`` [out, in] when it is Q4_1-shaped (``int4_levels``, or the
    ``levels`` it gave) to within bf16 rounding; else None."""
    if not available():
        return None
    found = levels if levels is not None else int4_levels(weight)
    if found is None:
        return None
    q, step, low = found
    out, inp = q.shape
    zeros = low + 8 * step  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.stack([step, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [g, out, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return Int4Weight(packed=packed, scales_zeros=scales_zeros, out_features=out)
