"""C kernels of the fused decoder layer (``layer_fused``) while training on CPU.

Why they exist: once a decoder layer is one autograd node, what is left besides the base's
matmuls is passes over [tokens, features] tensors, each a torch call with its own allocation:
per LoRA branch the dropout mask (a masked copy of the input, kept for the backward), two or
three skinny matmuls against A, and an add of the branch's input gradient onto the base's; SiLU,
the gate multiply and their backward; RMSNorm's casts and reductions; rotary's slices and
concatenations; the softmax's scale, mask add, casts and backward. They cost as much in bf16
as in fp32, so they set how close bf16's step comes to its matmuls' 3x (docs/training.md).

Kernels, each one pass over its rows, shared out over torch's OpenMP team:

- ``lora_down``: for the LoRA branches reading one input (q/k/v, gate/up, o, down),
  ``h[:, member] = (keep_m * x / (1 - p_m)) @ A_m^T``: the masks generated on the fly from the
  members' seeds with exactly ``lora_dropout``'s bits (element ``n * in + j`` of the input), the
  input read once, nothing stored but ``h`` (fp32 accumulation; A is the fp32 master weight).
- ``lora_down_backward``: from ``dh = dL/dh``, ``dx += sum_m keep_m * (dh_m @ A_m) / (1 - p_m)``
  into the base's input gradient, and ``dA_m = dh_m^T (keep_m * x / (1 - p_m))`` (per-thread fp32
  partial sums, then reduced), the masks regenerated from the seeds.
- ``silu_mul`` / ``silu_mul_backward``: ``act = silu(g) * u`` over the joined [N, 2I] gate/up
  output, and ``(dg, du)`` from ``d act``, in one pass each.
- ``rms_norm`` / ``rms_norm_backward``: ``h = w * x / rms(x)`` (statistics in fp32, as transformers)
  with ``rstd`` kept, and ``dx = rstd (w dh - xhat mean(w dh xhat)) + add`` with an optional
  residual gradient added in the same pass.
- ``rope_move``: the joined q/k/v output split into heads with q and k rotated, and, backwards,
  the rotated-back gradients joined again.
- ``softmax_forward`` / ``softmax_backward``: ``softmax(scores * scale + mask)`` in fp32 per row
  (written in fp32 for the backward and in the compute dtype for ``p v``; exp gives exact 0 where
  it would be subnormal), and ``p (dp - sum(dp p)) scale``.

bf16 or fp32 in and out (bf16 rounded to nearest even); fp32 arithmetic inside. Built and
loaded by ``loraplex.server.native`` like ``lora_dropout``; unavailable (no compiler, no AVX-512,
an untrusted folder) means ``layer_fused`` runs the same steps as torch ops.

Owns the kernels' source and calls. Knows nothing of layers, peft or models: contiguous tensors,
seeds, probabilities and ranks.
"""

from __future__ import annotations

import ctypes

import torch

from loraplex.server import native
from loraplex.training import lora_dropout

MAX_RANK = 64          # per LoRA member; larger ranks run as torch matmuls
MAX_SUM_RANK = 192     # of the members of one call
MAX_FEATURES = 16384   # input features (the row's mask words live on the stack)
MAX_MEMBERS = 4

_KERNELS = r"""
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#define MAXM 4
#define MAXW 257   /* 64-bit mask words of one row: MAX_FEATURES / 64 + 1 */
#define MAXR 64

/* the 64 keep bits of chunk c (elements 64c .. 64c + 63) under key (k0, k1) */
static inline uint64_t chunk_bits(uint64_t c, uint32_t k0, uint32_t k1, __m512i thr) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const uint64_t b0 = c * 16;
    __m512i w[4];
    philox16(_mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)b0), lane), _mm512_set1_epi32((int)(uint32_t)(b0 >> 32)), k0, k1, w);
    return (uint64_t)_mm512_cmplt_epu32_mask(w[0], thr) | ((uint64_t)_mm512_cmplt_epu32_mask(w[1], thr) << 16)
         | ((uint64_t)_mm512_cmplt_epu32_mask(w[2], thr) << 32) | ((uint64_t)_mm512_cmplt_epu32_mask(w[3], thr) << 48);
}

/* bits[w] bit b = keep(flat0 + 64 w + b), for the len elements from flat0; all ones when masked == 0 */
static void row_bits(uint64_t flat0, int64_t len, int masked, uint64_t seed, uint32_t threshold, uint64_t *bits) {
    const int64_t words = (len + 63) / 64;
    if (!masked) { for (int64_t w = 0; w < words; w++) bits[w] = ~0ull; return; }
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const __m512i thr = _mm512_set1_epi32((int)threshold);
    const uint64_t c0 = flat0 / 64;
    const int off = (int)(flat0 % 64);
    uint64_t cur = chunk_bits(c0, k0, k1, thr);
    for (int64_t w = 0; w < words; w++) {
        if (off == 0) { bits[w] = cur; if (w + 1 < words) cur = chunk_bits(c0 + w + 1, k0, k1, thr); continue; }
        uint64_t next = chunk_bits(c0 + w + 1, k0, k1, thr);
        bits[w] = (cur >> off) | (next << (64 - off));
        cur = next;
    }
}

/* v rounded to bf16 (nearest even), kept as fp32 (finite values) */
static inline __m512 rnd16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
    return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline __m512 keep16(__m512 v, const uint64_t *bits, int64_t j, float scale) {
    __mmask16 k = (__mmask16)(bits[j / 64] >> (j % 64));
    return _mm512_maskz_mul_ps(k, v, _mm512_set1_ps(scale));
}

/* h[n, off_m + i] = sum_j keep_m(n, j) x[n, j] scale_m A_m[i, j]  for every member m and row n */
void lora_down(const void *x, int x_bf16, int64_t n, int64_t in, int members,
               const float *const *a, const int *rank, const uint64_t *seed, const uint32_t *thr, const float *scale, const int *masked,
               void *h, int h_bf16, int64_t h_cols, uint64_t *keep_out, int threads) {
    const int64_t words = (in + 63) / 64;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (int64_t row = 0; row < n; row++) {
        uint64_t local[MAXW];
        float out[MAXR];
        int64_t col = 0;
        for (int m = 0; m < members; m++) {
            /* the row's keep bits, kept for the backward when asked: [member][row][word] */
            uint64_t *bits = keep_out ? keep_out + ((int64_t)m * n + row) * words : local;
            row_bits((uint64_t)row * (uint64_t)in, in, masked[m], seed[m], thr[m], bits);
            for (int i0 = 0; i0 < rank[m]; i0 += 8) {
                const float *ar[8];  /* rows past the rank repeat the last one; their sums are dropped */
                for (int i = 0; i < 8; i++) ar[i] = a[m] + (int64_t)(i0 + i < rank[m] ? i0 + i : rank[m] - 1) * in;
                __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
                for (int64_t j = 0; j < in; j += 16) {
                    const __mmask16 t = tail16(j, in);
                    const __m512 xv = keep16(loadm(x, x_bf16, row * in + j, t), bits, j, scale[m]);
                    c0 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(t, ar[0] + j), c0);
                    c1 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(t, ar[1] + j), c1);
                    c2 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(t, ar[2] + j), c2);
                    c3 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(t, ar[3] + j), c3);
                    c4 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(t, ar[4] + j), c4);
                    c5 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(t, ar[5] + j), c5);
                    c6 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(t, ar[6] + j), c6);
                    c7 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(t, ar[7] + j), c7);
                }
                const float sums[8] = {_mm512_reduce_add_ps(c0), _mm512_reduce_add_ps(c1), _mm512_reduce_add_ps(c2), _mm512_reduce_add_ps(c3),
                                       _mm512_reduce_add_ps(c4), _mm512_reduce_add_ps(c5), _mm512_reduce_add_ps(c6), _mm512_reduce_add_ps(c7)};
                for (int i = 0; i < 8 && i0 + i < rank[m]; i++) out[i0 + i] = sums[i];
            }
            for (int i = 0; i < rank[m]; i++) {
                if (h_bf16) ((uint16_t *)h)[row * h_cols + col + i] = round1(out[i]);
                else ((float *)h)[row * h_cols + col + i] = out[i];
            }
            col += rank[m];
        }
    }
}

/* dx[n, j] += sum_m keep_m(n, j) scale_m sum_i dh[n, off_m + i] A_m[i, j];
   da[off_m + i, j] = sum_n dh[n, off_m + i] keep_m(n, j) scale_m x[n, j]   (da: [sum r, in] fp32)
   Shared out by columns, 16 at a time: for one column block every dA vector stays in a register
   over all rows (no partial sums to reduce), dx is summed over the members in an fp32 column
   buffer and rounded once. keep_in: lora_down's keep_out of the same call (or NULL: the bits are
   generated again from the seeds first). Returns 0, or -1 when its buffers could not be allocated. */
int lora_down_backward(const void *x, int x_bf16, int64_t n, int64_t in, int members,
                        const float *const *a, const int *rank, const uint64_t *seed, const uint32_t *thr, const float *scale, const int *masked,
                        const void *dh, int dh_bf16, int64_t dh_cols, void *dx, int dx_bf16, int add_dx, float *da,
                        const uint64_t *keep_in, int threads) {
    const int64_t words = (in + 63) / 64, blocks = (in + 15) / 16;
    uint64_t *made = NULL;
    if (!keep_in) {
        made = (uint64_t *)malloc((size_t)members * (size_t)n * (size_t)words * 8);
        if (!made) return -1;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
        for (int m = 0; m < members; m++)
            for (int64_t row = 0; row < n; row++)
                row_bits((uint64_t)row * (uint64_t)in, in, masked[m], seed[m], thr[m], made + ((int64_t)m * n + row) * words);
        keep_in = made;
    }
    float *g = (float *)malloc((size_t)n * (size_t)dh_cols * sizeof(float));  /* dh as fp32 */
    if (!g) { free(made); return -1; }
    int failed = 0;
    for (int64_t e = 0; e < n * dh_cols; e++) g[e] = load1(dh, dh_bf16, e);
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
    {
        float *col = (float *)malloc((size_t)n * 16 * sizeof(float));  /* this block's dx, fp32 */
        if (!col) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t jb = 0; jb < blocks; jb++) {
            if (!col) continue;
            const int64_t j = jb * 16;
            const __mmask16 t = tail16(j, in);
            for (int64_t row = 0; row < n; row++)
                _mm512_storeu_ps(col + row * 16, add_dx ? loadm(dx, dx_bf16, row * in + j, t) : _mm512_setzero_ps());
            int c0 = 0;
            for (int m = 0; m < members; m++) {
                const uint64_t *bits = keep_in + (int64_t)m * n * words;
                for (int i0 = 0; i0 < rank[m]; i0 += 8, c0 += 8) {
                    const int nr = rank[m] - i0 < 8 ? rank[m] - i0 : 8;
                    __m512 av[8], acc[8];
                    for (int i = 0; i < 8; i++) {
                        av[i] = i < nr ? _mm512_maskz_loadu_ps(t, a[m] + (int64_t)(i0 + i) * in + j) : _mm512_setzero_ps();
                        acc[i] = _mm512_setzero_ps();
                    }
                    for (int64_t row = 0; row < n; row++) {
                        const float *gr = g + row * dh_cols + c0;
                        const __m512 xm = keep16(loadm(x, x_bf16, row * in + j, t), bits + row * words, j, scale[m]);
                        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
                        for (int i = 0; i < 8; i += 2) {
                            const __m512 g0 = _mm512_set1_ps(i < nr ? gr[i] : 0.0f), g1 = _mm512_set1_ps(i + 1 < nr ? gr[i + 1] : 0.0f);
                            s0 = _mm512_fmadd_ps(g0, av[i], s0);
                            s1 = _mm512_fmadd_ps(g1, av[i + 1], s1);
                            acc[i] = _mm512_fmadd_ps(g0, xm, acc[i]);
                            acc[i + 1] = _mm512_fmadd_ps(g1, xm, acc[i + 1]);
                        }
                        float *cr = col + row * 16;
                        _mm512_storeu_ps(cr, _mm512_add_ps(_mm512_loadu_ps(cr), keep16(_mm512_add_ps(s0, s1), bits + row * words, j, scale[m])));
                    }
                    for (int i = 0; i < nr; i++) _mm512_mask_storeu_ps(da + (int64_t)(c0 + i) * in + j, t, acc[i]);
                }
                c0 += rank[m] - ((rank[m] + 7) / 8) * 8;  /* back to the member's true width */
            }
            for (int64_t row = 0; row < n; row++) storem(dx, dx_bf16, row * in + j, _mm512_loadu_ps(col + row * 16), t);
        }
        free(col);
    }
    free(g);
    free(made);
    return failed ? -1 : 0;
}

/* a vectorised exp (Cephes-style: 2^k e^r, |r| <= ln2/2, degree-6 polynomial; ~1 ulp); 0 below
   -87.33, where e^x would be subnormal (subnormal fp32 operands make the matmuls after it crawl) */
static inline __m512 exp16(__m512 x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_GE_OQ);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.33f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, k));
}

/* 1 / (1 + e^-g): a 14-bit reciprocal estimate and one Newton step (~23 bits) instead of a divide */
static inline __m512 sigmoid16(__m512 g) {
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

/* act[n, j] = silu(gu[n, j]) * gu[n, inter + j]   (gu: [n, 2 inter]) */
void silu_mul(const void *gu, void *act, int bf16, int64_t n, int64_t inter, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (int64_t row = 0; row < n; row++)
        for (int64_t j = 0; j < inter; j += 16) {
            const __mmask16 t = tail16(j, inter);
            const __m512 g = loadm(gu, bf16, row * 2 * inter + j, t), u = loadm(gu, bf16, row * 2 * inter + inter + j, t);
            __m512 s = _mm512_mul_ps(g, sigmoid16(g));
            if (bf16) s = rnd16(s);  /* the activation's own output is rounded before the multiply */
            storem(act, bf16, row * inter + j, _mm512_mul_ps(s, u), t);
        }
}

/* dgu[n, j] = d[n, j] u sig(g) (1 + g (1 - sig(g))),  dgu[n, inter + j] = d[n, j] silu(g) */
void silu_mul_backward(const void *gu, const void *d, void *dgu, int bf16, int64_t n, int64_t inter, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (int64_t row = 0; row < n; row++)
        for (int64_t j = 0; j < inter; j += 16) {
            const __mmask16 t = tail16(j, inter);
            const __m512 g = loadm(gu, bf16, row * 2 * inter + j, t), u = loadm(gu, bf16, row * 2 * inter + inter + j, t);
            const __m512 dv = loadm(d, bf16, row * inter + j, t), s = sigmoid16(g);
            const __m512 one = _mm512_set1_ps(1.0f);
            const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
            storem(dgu, bf16, row * 2 * inter + j, _mm512_mul_ps(_mm512_mul_ps(dv, u), dsilu), t);
            storem(dgu, bf16, row * 2 * inter + inter + j, _mm512_mul_ps(dv, _mm512_mul_ps(g, s)), t);
        }
}

/* h = w * to_dtype(x * rstd), rstd[n] = 1 / sqrt(mean(x^2) + eps) (fp32), as transformers' RMSNorm */
void rms_norm(const void *x, const void *w, void *h, float *rstd, int bf16, int64_t n, int64_t c, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (int64_t row = 0; row < n; row++) {
        __m512 ss = _mm512_setzero_ps();
        for (int64_t j = 0; j < c; j += 16) {
            const __m512 v = loadm(x, bf16, row * c + j, tail16(j, c));
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)c + eps);
        rstd[row] = r;
        for (int64_t j = 0; j < c; j += 16) {
            const __mmask16 t = tail16(j, c);
            __m512 v = _mm512_mul_ps(loadm(x, bf16, row * c + j, t), _mm512_set1_ps(r));
            if (bf16) v = rnd16(v);  /* x * rstd is cast to bf16 before the weight multiply, as the module does */
            storem(h, bf16, row * c + j, _mm512_mul_ps(v, loadm(w, bf16, j, t)), t);
        }
    }
}

/* out = rstd (g - xhat mean(g xhat)) + add,  g = to_fp32(dh * w),  xhat = x rstd */
void rms_norm_backward(const void *dh, const void *x, const void *w, const float *rstd, const void *add, int add_bf16,
                       void *out, int out_bf16, int bf16, int64_t n, int64_t c, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (int64_t row = 0; row < n; row++) {
        const __m512 r = _mm512_set1_ps(rstd[row]);
        __m512 dot = _mm512_setzero_ps();
        for (int64_t j = 0; j < c; j += 16) {
            const __mmask16 t = tail16(j, c);
            __m512 g = _mm512_mul_ps(loadm(dh, bf16, row * c + j, t), loadm(w, bf16, j, t));
            if (bf16) g = rnd16(g);
            dot = _mm512_fmadd_ps(g, _mm512_mul_ps(loadm(x, bf16, row * c + j, t), r), dot);
        }
        const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / (float)c);
        for (int64_t j = 0; j < c; j += 16) {
            const __mmask16 t = tail16(j, c);
            __m512 g = _mm512_mul_ps(loadm(dh, bf16, row * c + j, t), loadm(w, bf16, j, t));
            if (bf16) g = rnd16(g);
            const __m512 xhat = _mm512_mul_ps(loadm(x, bf16, row * c + j, t), r);
            __m512 v = _mm512_mul_ps(r, _mm512_fnmadd_ps(xhat, mean, g));
            if (add) v = _mm512_add_ps(v, loadm(add, add_bf16, row * c + j, t));
            storem(out, out_bf16, row * c + j, v, t);
        }
    }
}
/* Forward (backward = 0): q [B, H, T, D], k / v [B, KV, T, D] from the joined qkv [B T, (H + 2 KV) D],
   q and k rotated (t cos + rotate_half(t) sin; cos / sin [Bc, T, D] with Bc = B or 1), v copied.
   Backward (1): the transpose, the joined gradient from dq, dk, dv. */
void rope_move(void *joined, void *q, void *k, void *v, const void *cos, const void *sin, int64_t bc, int bf16,
               int64_t b, int64_t t, int64_t h, int64_t kv, int64_t d, int backward, int threads) {
    const int64_t heads = h + 2 * kv, half = d / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t bi = 0; bi < b; bi++)
        for (int64_t ti = 0; ti < t; ti++) {
            const int64_t row = (bi * t + ti) * heads * d, cs = ((bc == 1 ? 0 : bi) * t + ti) * d;
            for (int64_t hi = 0; hi < heads; hi++) {
                void *part; int64_t at;
                if (hi < h) { part = q; at = ((bi * h + hi) * t + ti) * d; }
                else if (hi < h + kv) { part = k; at = ((bi * kv + hi - h) * t + ti) * d; }
                else { part = v; at = ((bi * kv + hi - h - kv) * t + ti) * d; }
                const void *src = backward ? part : joined;
                void *dst = backward ? joined : part;
                const int64_t from = backward ? at : row + hi * d, to = backward ? row + hi * d : at;
                for (int64_t j = 0; j < half; j += 16) {
                    const __mmask16 m = tail16(j, half);
                    const __m512 x1 = loadm(src, bf16, from + j, m), x2 = loadm(src, bf16, from + half + j, m);
                    if (hi >= h + kv) { storem(dst, bf16, to + j, x1, m); storem(dst, bf16, to + half + j, x2, m); continue; }
                    const __m512 c1 = loadm(cos, bf16, cs + j, m), c2 = loadm(cos, bf16, cs + half + j, m);
                    const __m512 s1 = loadm(sin, bf16, cs + j, m), s2 = loadm(sin, bf16, cs + half + j, m);
                    const __m512 m1 = _mm512_mul_ps(x1, c1), m2 = _mm512_mul_ps(x2, c2);
                    storem(dst, bf16, to + j, backward ? _mm512_fmadd_ps(x2, s2, m1) : _mm512_fnmadd_ps(x2, s1, m1), m);
                    storem(dst, bf16, to + half + j, backward ? _mm512_fnmadd_ps(x1, s1, m2) : _mm512_fmadd_ps(x1, s2, m2), m);
                }
            }
        }
}

/* probs = softmax(scores * scale + mask) over the last axis, in fp32: scores [B, KV, G, T, T] (as
   [B KV G T] rows of T), mask [Bm, 1, T, T] additive (Bm = B or 1); written as fp32 (probs) and,
   when probs_c is not NULL, in the compute dtype */
void softmax_forward(const void *scores, const void *mask, int64_t bm, float scale, float *probs, void *probs_c, int bf16,
                     int64_t b, int64_t groups, int64_t t, int threads) {
    const int64_t rows = b * groups * t;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t bi = r / (groups * t), i = r % t;
        const int64_t mrow = ((bm == 1 ? 0 : bi) * t + i) * t;
        float row[1024];
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < t; j += 16) {
            const __mmask16 m = tail16(j, t);
            const __m512 v = _mm512_fmadd_ps(loadm(scores, bf16, r * t + j, m), _mm512_set1_ps(scale), loadm(mask, bf16, mrow + j, m));
            _mm512_mask_storeu_ps(row + j, m, v);
            mx = _mm512_mask_max_ps(mx, m, mx, v);
        }
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < t; j += 16) {
            const __mmask16 m = tail16(j, t);
            const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), top)));
            _mm512_mask_storeu_ps(row + j, m, e);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t j = 0; j < t; j += 16) {
            const __mmask16 m = tail16(j, t);
            const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), inv);
            _mm512_mask_storeu_ps(probs + r * t + j, m, p);
            if (probs_c) storem(probs_c, bf16, r * t + j, p, m);
        }
    }
}

/* d_s = probs * (d_p - sum(d_p * probs)) * scale per row of T (d_p, d_s in the compute dtype) */
void softmax_backward(const void *dp, const float *probs, float scale, void *ds, int bf16, int64_t rows, int64_t t, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t j = 0; j < t; j += 16) {
            const __mmask16 m = tail16(j, t);
            dot = _mm512_fmadd_ps(loadm(dp, bf16, r * t + j, m), _mm512_maskz_loadu_ps(m, probs + r * t + j), dot);
        }
        const __m512 s = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
        for (int64_t j = 0; j < t; j += 16) {
            const __mmask16 m = tail16(j, t);
            const __m512 p = _mm512_maskz_loadu_ps(m, probs + r * t + j);
            storem(ds, bf16, r * t + j, _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(loadm(dp, bf16, r * t + j, m), s)), _mm512_set1_ps(scale)), m);
        }
    }
}
"""

_SOURCE = lora_dropout.COMMON_SOURCE + _KERNELS
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _check(lib: ctypes.CDLL) -> None:
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.lora_down.argtypes = [ptr, i32, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, ptr, i32]
    lib.lora_down_backward.argtypes = [ptr, i32, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, ptr, i32, i32, ptr, ptr, i32]
    lib.silu_mul.argtypes = [ptr, ptr, i32, i64, i64, i32]
    lib.silu_mul_backward.argtypes = [ptr, ptr, ptr, i32, i64, i64, i32]
    lib.rms_norm.argtypes = [ptr, ptr, ptr, ptr, i32, i64, i64, f32, i32]
    lib.rms_norm_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i32, ptr, i32, i32, i64, i64, i32]
    lib.rope_move.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i32, i64, i64, i64, i64, i64, i32, i32]
    lib.softmax_forward.argtypes = [ptr, ptr, i64, f32, ptr, ptr, i32, i64, i64, i64, i32]
    lib.softmax_backward.argtypes = [ptr, ptr, f32, ptr, i32, i64, i64, i32]
    lib.lora_down_backward.restype = i32
    for fn in (lib.lora_down, lib.silu_mul, lib.silu_mul_backward, lib.rms_norm, lib.rms_norm_backward,
               lib.rope_move, lib.softmax_forward, lib.softmax_backward):
        fn.restype = None


LIBRARY = native.Library("layer_kernels", _SOURCE, lora_dropout.FLAGS, lora_dropout.CPU_FLAGS, _check,
                         fallback="the fused decoder layer runs its steps as torch ops")
build = LIBRARY.build
available = LIBRARY.available


def why_not() -> str | None:
    return LIBRARY.why_not


class Members:
    """The LoRA members of one ``lora_down`` call, as the C arrays it takes."""

    def __init__(self, a: list[torch.Tensor], seeds: list[int | None], ps: list[float]) -> None:
        m = len(a)
        if not 0 < m <= MAX_MEMBERS:
            raise ValueError(f"1 to {MAX_MEMBERS} LoRA members per call, got {m}")
        self.a = [t.contiguous() for t in a]  # fp32 [r, in] each; kept alive for the call
        if any(t.dtype != torch.float32 for t in self.a):
            raise ValueError("the kernels take fp32 LoRA A weights")
        self.count = m
        self.ranks = [t.shape[0] for t in self.a]
        self.ptrs = (ctypes.c_void_p * m)(*[t.data_ptr() for t in self.a])
        self.rank_arr = (ctypes.c_int * m)(*self.ranks)
        self.seed_arr = (ctypes.c_uint64 * m)(*[(s or 0) & (2**64 - 1) for s in seeds])
        self.thr_arr = (ctypes.c_uint32 * m)(*[lora_dropout.keep_threshold(p) if p > 0 else 0 for p in ps])
        self.scale_arr = (ctypes.c_float * m)(*[1.0 / (1.0 - p) for p in ps])
        self.masked_arr = (ctypes.c_int * m)(*[1 if p > 0 else 0 for p in ps])
        self.any_masked = any(p > 0 for p in ps)


def fits(in_features: int, ranks: list[int]) -> bool:
    """Whether ``lora_down`` takes these shapes."""
    return in_features <= MAX_FEATURES and 0 < len(ranks) <= MAX_MEMBERS and max(ranks) <= MAX_RANK and sum(ranks) <= MAX_SUM_RANK


def lora_down(x: torch.Tensor, members: Members, out_dtype: torch.dtype, keep_bits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, in] -> ([N, sum r]: each member's masked input times its A^T (see the module docstring),
    the keep bits [members, N, ceil(in / 64)] int64 for ``lora_down_backward``, or None when not
    asked or when no member is masked)."""
    x = x.contiguous()
    n, in_f = x.shape
    h = torch.empty(n, sum(members.ranks), dtype=out_dtype)
    bits = torch.empty(members.count, n, (in_f + 63) // 64, dtype=torch.int64) if keep_bits and members.any_masked else None
    LIBRARY.loaded().lora_down(x.data_ptr(), _DTYPES[x.dtype], n, in_f, members.count, members.ptrs, members.rank_arr,
                               members.seed_arr, members.thr_arr, members.scale_arr, members.masked_arr,
                               h.data_ptr(), _DTYPES[out_dtype], h.shape[1], None if bits is None else bits.data_ptr(), torch.get_num_threads())
    return h, bits


def lora_down_backward(x: torch.Tensor, members: Members, dh: torch.Tensor, dx: torch.Tensor | None,
                       bits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx + sum of the members' masked dh_m @ A_m written into dx in place, or a new tensor of
    x's dtype when dx is None; dA [sum r, in] fp32). ``bits``: ``lora_down``'s keep bits of the same
    call, else they are generated again from the seeds."""
    x = x.contiguous()
    n, in_f = x.shape
    dh = dh.contiguous()
    add = dx is not None
    if dx is None:
        dx = torch.empty(n, in_f, dtype=x.dtype)
    da = torch.empty(sum(members.ranks), in_f, dtype=torch.float32)
    rc = LIBRARY.loaded().lora_down_backward(x.data_ptr(), _DTYPES[x.dtype], n, in_f, members.count, members.ptrs, members.rank_arr,
                                        members.seed_arr, members.thr_arr, members.scale_arr, members.masked_arr,
                                        dh.data_ptr(), _DTYPES[dh.dtype], dh.shape[1], dx.data_ptr(), _DTYPES[dx.dtype], int(add),
                                        da.data_ptr(), None if bits is None else bits.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"lora_down_backward could not allocate its buffers ({n} x {in_f})")
    return dx, da


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """[N, 2I] (gate | up) -> [N, I] silu(gate) * up."""
    gu = gu.contiguous()
    n, two = gu.shape
    act = torch.empty(n, two // 2, dtype=gu.dtype)
    LIBRARY.loaded().silu_mul(gu.data_ptr(), act.data_ptr(), _DTYPES[gu.dtype], n, two // 2, torch.get_num_threads())
    return act


def silu_mul_backward(gu: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
    """[N, 2I], [N, I] -> [N, 2I] (d gate | d up)."""
    gu = gu.contiguous()
    n, two = gu.shape
    d_act = d_act.contiguous()
    dgu = torch.empty_like(gu)
    LIBRARY.loaded().silu_mul_backward(gu.data_ptr(), d_act.data_ptr(), dgu.data_ptr(), _DTYPES[gu.dtype], n, two // 2, torch.get_num_threads())
    return dgu


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C] -> (h [N, C] of x's dtype, rstd [N, 1] fp32); w of x's dtype."""
    x = x.contiguous()
    n, c = x.shape
    h = torch.empty_like(x)
    rstd = torch.empty(n, 1, dtype=torch.float32)
    LIBRARY.loaded().rms_norm(x.data_ptr(), w.contiguous().data_ptr(), h.data_ptr(), rstd.data_ptr(), _DTYPES[x.dtype], n, c, eps, torch.get_num_threads())
    return h, rstd


def rms_norm_backward(dh: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, add: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """dx (+ add) of ``out_dtype``; dh, x, w of one dtype, all [N, C] contiguous."""
    n, c = x.shape
    dh, x = dh.contiguous(), x.contiguous()
    out = torch.empty(n, c, dtype=out_dtype)
    add = None if add is None else add.contiguous()
    add_ptr, add_bf16 = (None, 0) if add is None else (add.data_ptr(), _DTYPES[add.dtype])
    LIBRARY.loaded().rms_norm_backward(dh.data_ptr(), x.data_ptr(), w.contiguous().data_ptr(), rstd.data_ptr(), add_ptr, add_bf16,
                                       out.data_ptr(), _DTYPES[out_dtype], _DTYPES[x.dtype], n, c, torch.get_num_threads())
    return out


MAX_SEQ = 1024  # softmax rows live on the stack; longer sequences run as torch ops


def rope_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, b: int, t: int, h: int, kv: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B T, (H + 2 KV) D] -> (q [B, H, T, D] and k [B, KV, T, D] rotated, v [B, KV, T, D]);
    cos / sin [B or 1, T, D] of qkv's dtype."""
    dt = qkv.dtype
    qkv = qkv.contiguous()
    q, k, v = torch.empty(b, h, t, d, dtype=dt), torch.empty(b, kv, t, d, dtype=dt), torch.empty(b, kv, t, d, dtype=dt)
    cos, sin = cos.contiguous(), sin.contiguous()
    LIBRARY.loaded().rope_move(qkv.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                               cos.shape[0], _DTYPES[dt], b, t, h, kv, d, 0, torch.get_num_threads())
    return q, k, v


def rope_join_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of ``rope_split``: [B T, (H + 2 KV) D] from dq [B, H, T, D], dk / dv [B, KV, T, D]."""
    b, h, t, d = dq.shape
    kv = dk.shape[1]
    dq, dk, dv, cos, sin = dq.contiguous(), dk.contiguous(), dv.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty(b * t, (h + 2 * kv) * d, dtype=dq.dtype)
    LIBRARY.loaded().rope_move(out.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                               cos.shape[0], _DTYPES[dq.dtype], b, t, h, kv, d, 1, torch.get_num_threads())
    return out


def softmax_forward(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, KV, G, T, T], additive mask [B or 1, 1, T, T] (both of the compute dtype) ->
    (probs fp32, probs in the compute dtype: the same tensor when that is fp32)."""
    b, kv, g, t, _ = scores.shape
    scores, mask = scores.contiguous(), mask.contiguous()
    probs = torch.empty(scores.shape, dtype=torch.float32)
    probs_c = probs if scores.dtype == torch.float32 else torch.empty(scores.shape, dtype=scores.dtype)
    LIBRARY.loaded().softmax_forward(scores.data_ptr(), mask.data_ptr(), mask.shape[0], scale, probs.data_ptr(),
                                     None if probs_c is probs else probs_c.data_ptr(), _DTYPES[scores.dtype], b, kv * g, t, torch.get_num_threads())
    return probs, probs_c


def softmax_backward(d_p: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    """d_s = probs (d_p - rowsum(d_p probs)) scale, of d_p's dtype and shape."""
    d_p = d_p.contiguous()
    t = d_p.shape[-1]
    out = torch.empty(d_p.shape, dtype=d_p.dtype)
    LIBRARY.loaded().softmax_backward(d_p.data_ptr(), probs.data_ptr(), scale, out.data_ptr(), _DTYPES[d_p.dtype], d_p.numel() // t, t, torch.get_num_threads())
    return out


if __name__ == "__main__":  # `python -m loraplex.training.layer_kernels`: build now (the CPU image does)
    print(build())
