"""Decode attention of a bf16 CPU step as one small C kernel.

Why it exists: a decode token attends with one query per head over its own KV row. torch's CPU
SDPA (flash attention) spends most of a call on per-problem setup at these sizes: on the
embedded base a 64-row decode step's attention took 0.65-0.8 ms a layer for about 7 MFLOP,
20-25% of the whole step (docs/benchmarks.md, eighth engine-v2 session). Here each (token, kv
head) pair is one small loop: the group's query heads dot every valid key with AVX512-BF16's
``vdpbf16ps`` (bf16 pairs multiplied exactly, summed in fp32), an online softmax over blocks of
positions (``exp`` as a vectorized polynomial), and the values are accumulated in fp32 and
rounded to bf16 once. Nothing is masked: a token reads exactly positions ``[0, length)`` of its
row, so rows of different lengths cost only their own length.

Built and loaded by ``native`` like the LoRA expand kernel (gcc, explicit ISA flags checked
against /proc/cpuinfo); ``available()`` is False, with the reason logged once, when that fails,
and the cache keeps SDPA. The (token, kv head) pairs are shared out with OpenMP over the team
torch itself uses on the calling thread: the library is built with ``-fopenmp`` and loads after
torch, so its ``libgomp.so.1`` is torch's. Threads of its own would fight torch's workers, which
keep spinning after each parallel region (the expand kernel measured that); on one thread the
kernel was no faster than SDPA inside a step, which reads every row's K/V once per layer.

Owns the kernel's source and its call. Knows nothing of the cache's bookkeeping, adapters or
models: a query tensor, two KV buffers, and per token its row and length.
"""

from __future__ import annotations

import ctypes

import torch

from loraplex.server import native
from loraplex.server.engine import csimd

#: the switch tools/engine_bench.py and tools/paired_steps.py flip for A/B runs
DECODE_KERNEL = {"enabled": True}

#: head sizes and query heads per kv head the C side takes (checked again there)
MAX_HEAD_DIM = 256
MAX_GROUP = 8

#: the C of one (token, kv head) problem, ``attend_group`` over ``attend_one`` (and ``hsum16``,
#: which it uses): shared with the one-row decode step (row_kernel.py); needs ``load16`` (an
#: unmasked bf16 load to fp32), ``exp16``, MAXG, MAXD and BLK defined before it
ATTEND_ONE = r"""
/* lane j of the result = the sum of a[j]'s 16 lanes: pairs interleaved and added (unpack), then
   quads (shuffle), then across the four 128-bit lanes (shuffle_f32x4), 45 instructions for 16
   sums where 16 separate reductions take about 8 each */
static inline __m512 hsum16(const __m512 *a) {
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; i++) x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44), _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++) z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88), _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

/* One (token, kv head): the G query heads at q (head stride qh) over positions [0, L) of kb/vb
   (position stride d), into out (head stride d). Inlined with G and nc = d / 32 constant, so the
   queries and accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend_one(const int G, const int nc, const uint16_t *q, const int64_t qh, const uint16_t *kb, const uint16_t *vb,
                                                             const int64_t L, const float scale, uint16_t *out) {
    const int nv = 2 * nc, d = 32 * nc;
    __m512 acc[MAXG][MAXD / 16];
    __m512bh qv[MAXG][MAXD / 32];
    float sc[MAXG][BLK] __attribute__((aligned(64)));
    float m[MAXG], l[MAXG];
    for (int h = 0; h < G; h++) {
        for (int c = 0; c < nc; c++) qv[h][c] = (__m512bh)_mm512_loadu_si512(q + h * qh + 32 * c);
        for (int c = 0; c < nv; c++) acc[h][c] = _mm512_setzero_ps();
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    for (int64_t p0 = 0; p0 < L; p0 += BLK) {
        const int nb = L - p0 < BLK ? (int)(L - p0) : BLK;
        /* scores of this block of positions, 16 at a time: one query head's dot products with
           16 keys (re-read from L1 per head), summed lane-wise by hsum16 */
        for (int j0 = 0; j0 < nb; j0 += 16) {
            const int cnt = nb - j0 < 16 ? nb - j0 : 16;
            for (int h = 0; h < G; h++) {
                __m512 a[16];
                for (int jj = 0; jj < 16; jj++) {
                    a[jj] = _mm512_setzero_ps();
                    if (jj < cnt) {
                        const uint16_t *kr = kb + (p0 + j0 + jj) * d;
                        for (int c = 0; c < nc; c++) a[jj] = _mm512_dpbf16_ps(a[jj], qv[h][c], (__m512bh)_mm512_loadu_si512(kr + 32 * c));
                    }
                }
                _mm512_store_ps(&sc[h][j0], _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale)));
            }
        }
        /* online softmax: the new running max, what was summed rescaled, this block's weights */
        for (int h = 0; h < G; h++) {
            __m512 bmv = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < nb; j += 16) {
                const __mmask16 live = nb - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
                bmv = _mm512_mask_max_ps(bmv, live, bmv, _mm512_load_ps(&sc[h][j]));
            }
            const float bm = _mm512_reduce_max_ps(bmv);
            const float nm = bm > m[h] ? bm : m[h];
            const float corr = expf(m[h] - nm); /* 0 on the first block (m = -inf) */
            l[h] *= corr;
            const __m512 cv = _mm512_set1_ps(corr);
            for (int c = 0; c < nv; c++) acc[h][c] = _mm512_mul_ps(acc[h][c], cv);
            m[h] = nm;
            const __m512 mv = _mm512_set1_ps(nm);
            __m512 sum = _mm512_setzero_ps();
            for (int j = 0; j < nb; j += 16) {
                const __mmask16 live = nb - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
                __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, &sc[h][j]), mv)));
                _mm512_mask_storeu_ps(&sc[h][j], live, e);
                sum = _mm512_add_ps(sum, e);
            }
            l[h] += _mm512_reduce_add_ps(sum);
        }
        /* values, weighted */
        for (int j = 0; j < nb; j++) {
            const uint16_t *vr = vb + (p0 + j) * d;
            for (int c = 0; c < nv; c++) {
                const __m512 vv = load16(vr + 16 * c);
                for (int h = 0; h < G; h++) acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[h][j]), vv, acc[h][c]);
            }
        }
    }
    for (int h = 0; h < G; h++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[h]);
        for (int c = 0; c < nv; c++)
            _mm256_storeu_si256((__m256i *)(out + h * d + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[h][c], inv)));
    }
}


/* One kv head's group: the common shapes with constants (the queries and accumulators stay in
   registers), any other through the generic code. */
#define ONE(GG, NC) attend_one(GG, NC, q, qh, kb, vb, L, scale, out)
static void attend_group(const int G, const int nc, const uint16_t *q, const int64_t qh, const uint16_t *kb, const uint16_t *vb,
                         const int64_t L, const float scale, uint16_t *out) {
    if (nc == 2) {
        switch (G) {
            case 1: ONE(1, 2); return;
            case 2: ONE(2, 2); return;
            case 3: ONE(3, 2); return;
            case 4: ONE(4, 2); return;
            case 5: ONE(5, 2); return;
            case 6: ONE(6, 2); return;
            case 7: ONE(7, 2); return;
            case 8: ONE(8, 2); return;
        }
    } else if (nc == 4) {
        switch (G) {
            case 1: ONE(1, 4); return;
            case 2: ONE(2, 4); return;
            case 4: ONE(4, 4); return;
            case 8: ONE(8, 4); return;
        }
    }
    attend_one(G, nc, q, qh, kb, vb, L, scale, out);
}
#undef ONE
"""

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

int decode_attention_fast(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#define MAXD 256
#define MAXG 8
#define BLK 64

int decode_attention_max_head_dim(void) { return MAXD; }
int decode_attention_max_group(void) { return MAXG; }

#if defined(__AVX512BF16__)
#include <immintrin.h>

static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

""" + csimd.EXP16 + r"""
""" + ATTEND_ONE + r"""/* n decode tokens. Token t attends with query heads q[t, h, :] (h in [0, heads)) over positions
   [0, lens[t]) of KV row slots[t]; query head h reads kv head h / (heads / kv_heads). Layouts
   (strides in elements, the last dimension contiguous):
     q[t, h, i]      at q + t * q_row + h * q_head + i
     k[s, g, p, i]   at k + s * kv_row + g * kv_head + p * d + i   (v the same)
     out[t, h, i]    at out + t * out_row + h * d + i
   d a multiple of 32 up to MAXD, heads / kv_heads up to MAXG. Returns 0, or -1 for shapes it
   does not take (nothing written). */
int64_t decode_attention_bf16(int64_t n, int64_t heads, int64_t kv_heads, int64_t d,
                              const uint16_t *q, int64_t q_row, int64_t q_head,
                              const uint16_t *k, const uint16_t *v, int64_t kv_row, int64_t kv_head,
                              const int32_t *slots, const int32_t *lens, float scale,
                              uint16_t *out, int64_t out_row, int threads) {
    if (kv_heads <= 0 || heads % kv_heads || d % 32 || d > MAXD || heads / kv_heads > MAXG) return -1;
    const int G = (int)(heads / kv_heads), nc = (int)(d / 32);
    /* (token, kv head) pairs shared out over the OpenMP team: the library links the libgomp torch
       already loaded (the same soname), so this reuses the team torch's own parallel regions use
       on this thread instead of starting threads that would fight its spinning workers */
#pragma omp parallel for schedule(dynamic, 2) num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < n * kv_heads; i++) {
        const int64_t t = i / kv_heads, g = i % kv_heads;
        const int64_t L = lens[t];
        const uint16_t *qt = q + t * q_row;
        uint16_t *ot = out + t * out_row;
        const uint16_t *kb = k + (int64_t)slots[t] * kv_row + g * kv_head;
        const uint16_t *vb = v + (int64_t)slots[t] * kv_row + g * kv_head;
        attend_group(G, nc, qt + g * G * q_head, q_head, kb, vb, L, scale, ot + g * G * d);
    }
    return 0;
}
#else
int64_t decode_attention_bf16(void) { return -1; }
#endif
"""

_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fPIC", "-shared", "-fno-math-errno"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")


def _check(lib: ctypes.CDLL) -> None:
    fn = lib.decode_attention_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float, ptr, i64, ctypes.c_int]
    fn.restype = i64
    if not lib.decode_attention_fast():
        raise RuntimeError("the library was built without AVX512-BF16 (the kernel's dot-product instruction)")
    if lib.decode_attention_max_head_dim() != MAX_HEAD_DIM or lib.decode_attention_max_group() != MAX_GROUP:
        raise RuntimeError("the library's head size or group limits differ from this module's")


LIBRARY = native.Library("decode_attention", _SOURCE, _FLAGS, _CPU_FLAGS, _check, fallback="decode attention keeps torch's SDPA")


#: compile the library now (no CPU check: an image build host may differ); its path
build = LIBRARY.build
#: whether the kernel is built and loaded (builds it on the first call)
available = LIBRARY.available


def why_not() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked yet)."""
    return LIBRARY.why_not


def shape_fits(heads: int, kv_heads: int, d: int) -> bool:
    """Whether the kernel takes a model with these head counts and head size."""
    return d % 32 == 0 and d <= MAX_HEAD_DIM and kv_heads > 0 and heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP


def fits(q: torch.Tensor, k_buf: torch.Tensor) -> bool:
    """Whether a step with these query and cache tensors can take the kernel: bf16 CPU tensors,
    a head size that is a multiple of 32 up to ``MAX_HEAD_DIM``, at most ``MAX_GROUP`` query
    heads per kv head, a contiguous last dimension of q and contiguous buffers (what ``decode``
    requires), the switch on and the library loaded."""
    heads, d = q.shape[1], q.shape[2]
    kv_heads = k_buf.shape[1]
    return (DECODE_KERNEL["enabled"] and q.dtype == k_buf.dtype == torch.bfloat16 and q.device.type == k_buf.device.type == "cpu"
            and q.stride(2) == 1 and k_buf.is_contiguous() and shape_fits(heads, kv_heads, d)
            and available())


def decode(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, heads, d] (any row and head strides, d contiguous), k_buf/v_buf [rows,
    kv_heads, cap, d] contiguous, slots/lens int32 [n]: token t attends over positions
    [0, lens[t]) of row slots[t] -> [n, heads, d] bf16. The caller keeps slots and lens within
    the buffers (the cache's plan does): the C side trusts them."""
    n, heads, d = q.shape
    if not (q.stride(2) == 1 and k_buf.is_contiguous() and v_buf.is_contiguous() and k_buf.shape == v_buf.shape
            and k_buf.shape[3] == d and slots.dtype == lens.dtype == torch.int32 and slots.shape == lens.shape == (n,)):
        raise ValueError(f"decode attention: q {tuple(q.shape)} strides {q.stride()}, K/V {tuple(k_buf.shape)}, slots/lens {tuple(slots.shape)} {slots.dtype} do not fit the kernel")
    out = q.new_empty(n, heads, d)
    lib = LIBRARY.loaded()
    status = lib.decode_attention_bf16(n, heads, k_buf.shape[1], d, q.data_ptr(), q.stride(0), q.stride(1), k_buf.data_ptr(), v_buf.data_ptr(),
                                       k_buf.stride(0), k_buf.stride(1), slots.data_ptr(), lens.data_ptr(), scale, out.data_ptr(), out.stride(0), torch.get_num_threads())
    if status:
        raise ValueError(f"decode attention: the kernel refused heads {heads}, kv heads {k_buf.shape[1]}, head size {d}")
    return out


if __name__ == "__main__":  # `python -m loraplex.server.engine.attention_kernel`: build now (the CPU image does)
    print(build())
