"""The lean forward's element-wise steps at bf16 on CPU as small C calls: residual add + RMSNorm,
SiLU-gated product, rotary embedding.

Why it exists: each of these is 3-6 torch ops on tensors of a few thousand to a hundred thousand
elements, and at those sizes a CPU op costs its dispatch and its OpenMP region, not its
arithmetic: on a 64-row decode step of the embedded base they took about 10 ms of the step's
80 (RMSNorm 75 us, SiLU * up 81 us, rotary 92 us per layer measured alone). One C call each does
the same rounding steps as the torch ops it replaces (every bf16 result rounded to nearest even
where torch rounds it), so the outputs are those of the torch ops except where the fp32 sum of
squares or ``exp`` differ in their last bits, and for results below about 1e-38 (the bf16
conversion flushes subnormals to zero, torch keeps them).

Rows are shared out with OpenMP over torch's own team, as in ``attention_kernel`` (the library
links the libgomp torch loaded). Built and loaded by ``native``; callers keep the torch ops when
``available()`` is False (the reason is logged once).

Owns the kernels' source and calls. Knows nothing of models or layers: rows of bf16 numbers.
"""

from __future__ import annotations

import ctypes

import torch

from loraplex.server import native
from loraplex.server.engine import csimd

#: the switch tools/engine_bench.py and tools/paired_steps.py flip for A/B runs
POINTWISE_KERNEL = {"enabled": True}

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

int pointwise_fast(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)
#include <immintrin.h>

/* rows are split over the OpenMP team only when there is enough work for both */
#define PAR_MIN 16384

static inline __m512 load16(const uint16_t *p, __mmask16 live) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
}
static inline __m512 round_bf16(__m512 v) {  /* to bf16, nearest even, and back to fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
static inline void store16(uint16_t *p, __m512 v, __mmask16 live) {
    _mm256_mask_storeu_epi16(p, live, (__m256i)_mm512_cvtneps_pbh(v));
}
static inline __mmask16 tail(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

""" + csimd.EXP16 + r"""
/* h[t] += delta[t] (rounded to bf16; skipped when delta is NULL), then
   out[t] = bf16(w * bf16(h[t] / sqrt(mean(h[t]^2) + eps))): transformers' LlamaRMSNorm on bf16
   (normalised in fp32, cast back, scaled at bf16). Strides in elements. */
void add_rms_bf16(int64_t n, int64_t cols, uint16_t *h, int64_t h_row, const uint16_t *delta, int64_t d_row,
                  const uint16_t *w, float eps, uint16_t *out, int64_t o_row, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n * cols >= PAR_MIN)
    for (int64_t t = 0; t < n; t++) {
        uint16_t *hr = h + t * h_row;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 live = tail(cols - c);
            __m512 x = load16(hr + c, live);
            if (delta) {
                x = round_bf16(_mm512_add_ps(x, load16(delta + t * d_row + c, live)));
                store16(hr + c, x, live);
            }
            ss = _mm512_fmadd_ps(x, x, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / (float)cols + eps));
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 live = tail(cols - c);
            const __m512 normed = round_bf16(_mm512_mul_ps(load16(hr + c, live), r));
            store16(out + t * o_row + c, _mm512_mul_ps(load16(w + c, live), normed), live);
        }
    }
}

/* out[t] = bf16(bf16(silu(g[t])) * u[t]): F.silu(g) * u on bf16 */
void silu_mul_bf16(int64_t n, int64_t cols, const uint16_t *g, int64_t g_row, const uint16_t *u, int64_t u_row,
                   uint16_t *out, int64_t o_row, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n * cols >= PAR_MIN)
    for (int64_t t = 0; t < n; t++) {
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 live = tail(cols - c);
            const __m512 x = load16(g + t * g_row + c, live);
            const __m512 s = round_bf16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
            store16(out + t * o_row + c, _mm512_mul_ps(s, load16(u + t * u_row + c, live)), live);
        }
    }
}

/* rotary on heads of size d (even, up to 512): out[t, h] = bf16(bf16(x * cos[t]) + bf16(rot(x) * sin[t]))
   with rot(x) = (-x[d/2:], x[:d/2]): the three roundings of x * cos + rotate_half(x) * sin on bf16.
   x[t, h, i] at x + t * x_row + h * d + i; cos/sin[t, i] at cos + t * cs_row + i; out contiguous. */
void rope_bf16(int64_t n, int64_t heads, int64_t d, const uint16_t *x, int64_t x_row, const uint16_t *cos,
               const uint16_t *sin, int64_t cs_row, uint16_t *out, int threads) {
    const int64_t half = d / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n * heads * d >= PAR_MIN)
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *ct = cos + t * cs_row, *st = sin + t * cs_row;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *xh = x + t * x_row + h * d;
            uint16_t *oh = out + (t * heads + h) * d;
            for (int64_t c = 0; c < half; c += 16) {
                const __mmask16 live = tail(half - c);
                const __m512 lo = load16(xh + c, live), hi = load16(xh + half + c, live);
                /* first half: x_lo * cos_lo + (-x_hi) * sin_lo; second: x_hi * cos_hi + x_lo * sin_hi */
                const __m512 a0 = round_bf16(_mm512_mul_ps(lo, load16(ct + c, live)));
                const __m512 b0 = round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), load16(st + c, live)));
                const __m512 a1 = round_bf16(_mm512_mul_ps(hi, load16(ct + half + c, live)));
                const __m512 b1 = round_bf16(_mm512_mul_ps(lo, load16(st + half + c, live)));
                store16(oh + c, _mm512_add_ps(a0, b0), live);
                store16(oh + half + c, _mm512_add_ps(a1, b1), live);
            }
        }
    }
}
#endif
"""

_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fPIC", "-shared", "-fno-math-errno"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")


def _check(lib: ctypes.CDLL) -> None:
    if not lib.pointwise_fast():
        raise RuntimeError("the library was built without AVX512-BF16")
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.add_rms_bf16.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, ctypes.c_float, ptr, i64, i32]
    lib.silu_mul_bf16.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, i64, i32]
    lib.rope_bf16.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, i64, ptr, i32]
    for fn in (lib.add_rms_bf16, lib.silu_mul_bf16, lib.rope_bf16):
        fn.restype = None


LIBRARY = native.Library("pointwise", _SOURCE, _FLAGS, _CPU_FLAGS, _check, fallback="the lean forward keeps torch's element-wise ops")


#: compile the library now (no CPU check: an image build host may differ); its path
build = LIBRARY.build
#: whether the kernel is built and loaded (builds it on the first call)
available = LIBRARY.available


def why_not() -> str | None:
    return LIBRARY.why_not


def _rows_ok(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError(f"pointwise kernels take bf16 CPU tensors with a contiguous last dimension, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")


def add_rms(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += delta`` in place (when given), then RMSNorm of h scaled by weight -> a new [N, H]."""
    n, cols = h.shape
    _rows_ok(h, weight, *(() if delta is None else (delta,)))
    if weight.shape != (cols,) or not weight.is_contiguous() or (delta is not None and delta.shape != h.shape):
        raise ValueError(f"add_rms: h {tuple(h.shape)}, delta {None if delta is None else tuple(delta.shape)}, weight {tuple(weight.shape)}")
    out = h.new_empty(n, cols)
    LIBRARY.loaded().add_rms_bf16(n, cols, h.data_ptr(), h.stride(0), None if delta is None else delta.data_ptr(), 0 if delta is None else delta.stride(0),
                                  weight.data_ptr(), eps, out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` on [N, I] bf16 (both may be column slices of one tensor)."""
    _rows_ok(gate, up)
    if gate.shape != up.shape or gate.dim() != 2:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    n, cols = gate.shape
    out = gate.new_empty(n, cols)
    LIBRARY.loaded().silu_mul_bf16(n, cols, gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x [N, heads, d] (heads contiguous within a row, rows
    strided) and cos/sin [N, 1, d] -> a new contiguous [N, heads, d]."""
    n, heads, d = x.shape
    _rows_ok(x, cos, sin)
    if d % 2 or x.stride(1) != d or cos.shape != (n, 1, d) or sin.shape != cos.shape or cos.stride(0) != sin.stride(0):
        raise ValueError(f"rope: x {tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    out = x.new_empty(n, heads, d)
    LIBRARY.loaded().rope_bf16(n, heads, d, x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0), out.data_ptr(), torch.get_num_threads())
    return out


if __name__ == "__main__":  # `python -m loraplex.server.engine.pointwise_kernel`: build now (the CPU image does)
    print(build())
