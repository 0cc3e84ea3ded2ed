"""The dropout mask on LoRA inputs while training, as one C pass per call on CPU.

Why it exists: peft puts an ``nn.Dropout`` on the input of every LoRA branch (210 of them on the
embedded base: 30 layers x 7 projections). On CPU each one fills a random tensor the size of its
input with ``bernoulli_``, divides it by the keep probability, and multiplies; the backward pass
multiplies again by the saved mask. That was the largest cost a bf16 step and an fp32 step shared
(0.39 s of a 1.38 s bf16 step on an AMX Xeon, docs/training.md).

What replaces it, per call:

- **The mask**: element ``i`` is kept when a 32-bit word of Philox4x32-10 (the counter-based
  generator torch uses for dropout on CUDA; Salmon et al., SC'11) is below
  ``round((1 - p) * 2**32)``, so the drop probability is ``p`` to within 2**-32. The key is a fresh
  64-bit seed drawn from torch's CPU generator on every call, so ``--seed`` still makes a run
  repeatable and ``torch.utils.checkpoint`` (which restores that generator) recomputes the same
  mask. Word ``w`` of block ``16 k + j`` is element ``64 k + 16 w + j``: sixteen blocks per vector
  step, the same words whatever the thread count.
- **The pass**: ``y = keep ? x * 1 / (1 - p) : 0`` in one read and one write, from bf16 or fp32
  to bf16 or fp32 (bf16 rounded to nearest even).
- **The backward** (``lora_fused``) is the same pass over the incoming gradient with the same
  seed: nothing is kept but the seed, where peft's dropout keeps an fp32 mask per call.

Elements are shared out over torch's OpenMP team (gcc's libgomp, as torch's CPU wheels), built
and loaded by ``loraplex.server.native``. Where the library is unavailable (no compiler, no
AVX-512, an untrusted kernel folder), ``lora_fused`` draws a torch ``bernoulli_`` mask instead
and says so.

Owns the kernel's source and calls. Knows nothing of LoRA layers, peft, data or the Trainer:
flat tensors, a probability and a seed.
"""

from __future__ import annotations

import ctypes

import torch

from loraplex.server import native

#: Philox4x32-10 (scalar and 16 blocks per AVX-512 step) and bf16/fp32 loads and stores: shared
#: with ``layer_kernels``, whose masks must be these bits
COMMON_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define PM0 0xD2511F53u
#define PM1 0xCD9E8D57u
#define PW0 0x9E3779B9u
#define PW1 0xBB67AE85u
#define PAR_MIN 65536

/* Philox4x32-10, scalar: one block of four words (the published algorithm, for the tail and tests) */
void philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)PM0 * c0, p1 = (uint64_t)PM1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0; c1 = (uint32_t)p1; c2 = n2; c3 = (uint32_t)p0;
        k0 += PW0; k1 += PW1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* the high and low 32 bits of 16 unsigned 32 x 32 products, from two 64-bit multiplies (the
   integer multiplier is the bottleneck: a separate mullo would double its work) */
static inline void mul16(__m512i a, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

/* Philox4x32-10 on 16 blocks at once: counters (c0, c1, 0, 0), the same key */
static inline void philox16(__m512i c0, __m512i c1, uint32_t k0, uint32_t k1, __m512i out[4]) {
    const __m512i m0 = _mm512_set1_epi32((int)PM0), m1 = _mm512_set1_epi32((int)PM1);
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    for (int r = 0; r < 10; r++) {
        __m512i lo0, hi0, lo1, hi1;
        mul16(c0, m0, &hi0, &lo0);
        mul16(c2, m1, &hi1, &lo1);
        __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32((int)k0));
        __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32((int)k1));
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
        k0 += PW0; k1 += PW1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* 16 elements from j (fewer at the end: a tail mask) */
static inline __mmask16 tail16(int64_t j, int64_t len) {
    int64_t left = len - j;
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* the elements of m from i, fp32 (flag 0) or bf16 (flag 1), as fp32 */
static inline __m512 loadm(const void *x, int bf16, int64_t i, __mmask16 m) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)x + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)x + i);
}

static inline __m512 load16(const void *x, int bf16, int64_t i) { return loadm(x, bf16, i, 0xFFFF); }

static inline float load1(const void *x, int bf16, int64_t i) {
    if (bf16) { uint32_t b = (uint32_t)((const uint16_t *)x)[i] << 16; float f; memcpy(&f, &b, 4); return f; }
    return ((const float *)x)[i];
}

/* fp32 -> bf16 rounding to nearest even, as torch's .to(torch.bfloat16) (NaN stays NaN) */
static inline uint16_t round1(float v) {
    uint32_t b; memcpy(&b, &v, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

/* the elements of m to i, fp32 or bf16 (rounded to nearest even as round1, NaN stays NaN) */
static inline void storem(void *y, int bf16, int64_t i, __m512 v, __mmask16 m) {
    if (!bf16) { _mm512_mask_storeu_ps((float *)y + i, m, v); return; }
    __m512i b = _mm512_castps_si512(v);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
    r = _mm512_mask_or_epi32(r, nan, b, _mm512_set1_epi32(0x400000));
    _mm256_mask_storeu_epi16((uint16_t *)y + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

static inline void store16(void *y, int bf16, int64_t i, __m512 v) { storem(y, bf16, i, v, 0xFFFF); }

static inline void store1(void *y, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)y)[i] = round1(v);
    else ((float *)y)[i] = v;
}
"""

_MASK_SOURCE = r"""

/* y[i] = keep(i) ? x[i] * scale : 0 over n elements; keep(i): element i's Philox word < threshold.
   x and y are fp32 (flag 0) or bf16 (flag 1) and may be the same buffer. */
void keep_mask_apply(const void *x, int x_bf16, void *y, int y_bf16, int64_t n, uint64_t seed, uint32_t threshold, float scale, int threads) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const int64_t chunks = n / 64;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i thr = _mm512_set1_epi32((int)threshold);
    const __m512 vs = _mm512_set1_ps(scale);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PAR_MIN)
    for (int64_t k = 0; k < chunks; k++) {
        const uint64_t b0 = (uint64_t)k * 16;
        __m512i w[4];
        philox16(_mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)b0), lane), _mm512_set1_epi32((int)(uint32_t)(b0 >> 32)), k0, k1, w);
        for (int q = 0; q < 4; q++) {
            const int64_t i = k * 64 + q * 16;
            store16(y, y_bf16, i, _mm512_maskz_mul_ps(_mm512_cmplt_epu32_mask(w[q], thr), load16(x, x_bf16, i), vs));
        }
    }
    const uint32_t key[2] = {k0, k1};
    for (int64_t i = chunks * 64; i < n; i++) {
        const int64_t r = i % 64;
        const uint64_t block = (uint64_t)(i / 64) * 16 + (uint64_t)(r % 16);
        const uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), 0, 0};
        uint32_t out[4];
        philox4x32(ctr, key, out);
        store1(y, y_bf16, i, out[r / 16] < threshold ? load1(x, x_bf16, i) * scale : 0.0f);
    }
}
"""

FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fPIC", "-shared", "-fno-math-errno"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _check(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.keep_mask_apply.argtypes = [ptr, i32, ptr, i32, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, i32]
    lib.keep_mask_apply.restype = None
    lib.philox4x32.argtypes = [ctypes.POINTER(ctypes.c_uint32)] * 3
    lib.philox4x32.restype = None


_SOURCE = COMMON_SOURCE + _MASK_SOURCE
LIBRARY = native.Library("lora_dropout", _SOURCE, FLAGS, CPU_FLAGS, _check, fallback="LoRA dropout masks come from torch's bernoulli_")

#: compile the library now (no CPU check: an image build host may differ); its path
build = LIBRARY.build
#: whether the kernel is built and loaded (builds it on the first call)
available = LIBRARY.available


def why_not() -> str | None:
    return LIBRARY.why_not


def keep_threshold(p: float) -> int:
    """The 32-bit threshold a word must be below for its element to be kept (drop probability p)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    return min(round((1.0 - p) * 2**32), 2**32 - 1)


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block from the library (for known-answer tests)."""
    ctr, k, out = (ctypes.c_uint32 * 4)(*counter), (ctypes.c_uint32 * 2)(*key), (ctypes.c_uint32 * 4)()
    LIBRARY.loaded().philox4x32(ctr, k, out)
    return tuple(out)  # type: ignore[return-value]


def apply_mask(x: torch.Tensor, p: float, seed: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``keep(seed) * x / (1 - p)`` as a new contiguous tensor of ``out_dtype`` (fp32 or bf16 CPU
    tensors; x is made contiguous first)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or out_dtype not in _DTYPES:
        raise ValueError(f"the LoRA dropout kernel takes fp32/bf16 CPU tensors, got {x.dtype} on {x.device} -> {out_dtype}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype)
    LIBRARY.loaded().keep_mask_apply(x.data_ptr(), _DTYPES[x.dtype], out.data_ptr(), _DTYPES[out_dtype], x.numel(),
                                     seed & (2**64 - 1), keep_threshold(p), 1.0 / (1.0 - p), torch.get_num_threads())
    return out


def draw_seed() -> int:
    """A 64-bit key from torch's CPU generator (so ``set_seed`` and checkpointing govern it), as a
    signed int64 (what autograd and the profiler can hold); ``apply_mask`` takes its bits."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


if __name__ == "__main__":  # `python -m loraplex.training.lora_dropout`: build now (the CPU image does)
    print(build())
