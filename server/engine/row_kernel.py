"""A single stream's decode step on an int4 base as ONE C call for all layers (bf16, CPU).

Why it exists: one row decoding alone is about 25 small ops a layer, 750 a token on the embedded
base, and each costs its dispatch (a few us from Python) and, for the int4 GEMMs and the
element-wise ops, an OpenMP region. At one row that overhead, not the arithmetic or the weight
reads, set the stream's speed: 10-14 ms a token where its int4 weights read in about 2 ms
(docs/benchmarks.md, ninth engine-v2 session). The compiled step (compiled_decode.py) removes
part of it at the price of minutes of compiling; this does the whole step in C instead.

What one call computes, per layer, the same function as the eager one-row step on the int4 path
(``LlamaStepForward``, with ``OneRowStep.run`` as its plain statement): RMSNorm (the bf16
roundings of transformers' LlamaRMSNorm), the fused q/k/v projection, rotary on q and k, the
K/V write at the row's (slot, position), attention over positions ``[0, position]`` of the row
(``attention_kernel``'s per-(token, kv head) code), o, RMSNorm, gate/up, SiLU * up, down, and the
two residual adds; one adapter's LoRA rows (the bf16 rows the slot table holds; products summed in fp32) are added
to each projection. The final norm and the lm_head stay in torch.

The projections read the base's exact Q4_1 levels (``int4.int4_levels``) in a layout of our own,
outer-product style (one output row per vector lane, as torch's int4 kernel does): per block of
16 output rows, group of 32 inputs and pair of inputs, 16 bytes, one per row, holding the pair's
two levels. Each row's pair becomes two bf16 numbers ``128 + q`` (exact: bf16 holds integers up
to 256) with three integer ops, and AVX512-BF16's ``vdpbf16ps`` multiplies them with the broadcast
pair of activations and adds both products in fp32: 32 multiply-adds an instruction, no
horizontal sums. The scale ``d`` and the offset ``m - 128 d`` (fp32, as the GGUF holds them) are
applied per group: ``w . x = d (128 + q) . x + (m - 128 d) sum(x)``. Each projection's output
is summed in fp32 (int4 product, LoRA, bias) and rounded to bf16 once, where the eager path
rounds after the int4 product and again after each add: outputs agree within bf16 rounding, not
bit for bit (tests/unit/test_row_kernel.py measures both against float64).

Threads: one OpenMP region for the whole call on torch's team (the library links the libgomp
torch loaded, like the other kernels), output rows of each projection shared out with ``omp
for``, the small serial parts (norms, rotary, the K/V write) on one thread between barriers.

Owns the kernel's source, the weight layout and the call. Knows nothing of requests, adapters'
names or the cache's bookkeeping: weights, one row's slot and position, and KV buffers.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from loraplex.server import native
from loraplex.server.engine import attention_kernel, csimd

#: the switch tools/engine_bench.py and tools/paired_steps.py flip for A/B runs
ROW_KERNEL = {"enabled": True}

GROUP = 32  # Q4_1's group of inputs
BLOCK = 16  # output rows per block of the layout

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

int row_fast(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#define MAXD 256
#define MAXG 8
#define BLK 64

/* one projection: [out, in] int4 levels in blocks, per-group scale and offset, optional bf16
   bias and bf16 LoRA rows (a [rank, in]; b, [rank, out], stored per block of 16 outputs);
   out % 16 == 0, in % 32 == 0 */
typedef struct {
    const uint8_t *nib;   /* [out / 16][in / 32][16 input pairs][16 rows]: byte = q[2p] | q[2p + 1] << 4 */
    const float *scale;   /* [out / 16][in / 32][16 rows] */
    const float *offset;  /* [out / 16][in / 32][16 rows]: m - 128 * scale */
    const uint16_t *bias; /* [out] or NULL */
    const uint16_t *a;    /* [rank][in] bf16, or NULL */
    const uint16_t *b;    /* [out / 16][rank][16 rows] bf16: a block's rows of B follow each other */
    int64_t out, in, rank;
} proj_t;

typedef struct {
    const uint16_t *in_norm, *post_norm; /* [hidden] bf16 */
    proj_t qkv, o, gate_up, down;
} layer_t;

int64_t row_layer_size(void) { return (int64_t)sizeof(layer_t); }

#if defined(__AVX512BF16__)
#include <immintrin.h>

static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 round_bf16(__m512 v) { /* to bf16, nearest even, and back to fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
static inline void store16(uint16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }

""" + csimd.EXP16 + attention_kernel.ATTEND_ONE + r"""

/* h += delta (rounded to bf16; none when delta is NULL), then out = bf16(w * bf16(h / rms)) and
   sums[g] = the sum of out's group g of 32 (fp32). n % 32 == 0. */
static void add_rms_row(int64_t n, uint16_t *h, const uint16_t *delta, const uint16_t *w, float eps, uint16_t *out, float *sums) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t c = 0; c < n; c += 16) {
        __m512 x = load16(h + c);
        if (delta) {
            x = round_bf16(_mm512_add_ps(x, load16(delta + c)));
            store16(h + c, x);
        }
        ss = _mm512_fmadd_ps(x, x, ss);
    }
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)n + eps));
    for (int64_t c = 0; c < n; c += 32) {
        const __m512 y0 = round_bf16(_mm512_mul_ps(load16(w + c), round_bf16(_mm512_mul_ps(load16(h + c), r))));
        const __m512 y1 = round_bf16(_mm512_mul_ps(load16(w + c + 16), round_bf16(_mm512_mul_ps(load16(h + c + 16), r))));
        store16(out + c, y0);
        store16(out + c + 16, y1);
        sums[c / 32] = _mm512_reduce_add_ps(_mm512_add_ps(y0, y1));
    }
}

/* u[k] = a[k] . x for the projection's LoRA rows, in fp32 (a few thousand multiply-adds: one
   thread, inside the phase before, saves a barrier) */
static void lora_shrink(const proj_t *p, const uint16_t *x, float *u) {
    if (!p->a) return;
    for (int64_t k = 0; k < p->rank; k++) {
        const uint16_t *ak = p->a + k * p->in;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < p->in; c += 16) acc = _mm512_fmadd_ps(load16(ak + c), load16(x + c), acc);
        u[k] = _mm512_reduce_add_ps(acc);
    }
}

/* y = bf16(W x + bias + b^T u): blocks of 16 output rows shared over the team, one output row
   per vector lane. Per block, group and pair of inputs (2p, 2p + 1), one byte per row holds the
   pair's two levels; spread into the two bf16 halves of the row's lane as 128 + q (one shift, one
   OR, one ternary-logic op), they meet the pair (x[2p], x[2p + 1]), broadcast, in one vdpbf16ps:
   32 multiply-adds. Four accumulators keep four chains of the instruction's latency in flight. */
static void gemv_int4(const proj_t *p, const uint16_t *x, const float *sums, const float *u, uint16_t *y) {
    const int64_t groups = p->in / 32, blocks = p->out / 16, out = p->out;
    const uint32_t *xp = (const uint32_t *)x; /* input pairs */
    const __m512i keep = _mm512_set1_epi32(0x000F000F), bias128 = _mm512_set1_epi32(0x43004300); /* bf16 128.0 twice */
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        __m512 r = _mm512_setzero_ps();
        const uint8_t *nb = p->nib + blk * groups * 256;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *ng = nb + g * 256;
            _mm_prefetch((const char *)(ng + 1024), _MM_HINT_T0);
            __m512 c[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int q = 0; q < 16; q++) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ng + 16 * q)));
                /* lane: low half 0x4300 | (byte & 15), high half 0x4300 | (byte >> 4) */
                const __m512i w = _mm512_ternarylogic_epi32(_mm512_or_si512(v, _mm512_slli_epi32(v, 12)), keep, bias128, 0xEA); /* (a & b) | c */
                c[q & 3] = _mm512_dpbf16_ps(c[q & 3], (__m512bh)w, (__m512bh)_mm512_set1_epi32((int)xp[g * 16 + q]));
            }
            const __m512 dot = _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3])); /* sum of (128 + q) x */
            r = _mm512_fmadd_ps(dot, _mm512_loadu_ps(p->scale + (blk * groups + g) * 16), r);
            r = _mm512_fmadd_ps(_mm512_loadu_ps(p->offset + (blk * groups + g) * 16), _mm512_set1_ps(sums[g]), r);
        }
        if (p->a)
            for (int64_t k = 0; k < p->rank; k++) r = _mm512_fmadd_ps(_mm512_set1_ps(u[k]), load16(p->b + (blk * p->rank + k) * 16), r);
        if (p->bias) r = _mm512_add_ps(r, load16(p->bias + blk * 16));
        store16(y + blk * 16, r);
    }
}

/* rotary on n heads of size d at x (in place, contiguous): the three roundings of
   x * cos + rotate_half(x) * sin on bf16 */
static void rope_row(int64_t n, int64_t d, uint16_t *x, const uint16_t *cos, const uint16_t *sin) {
    const int64_t half = d / 2;
    for (int64_t hd = 0; hd < n; hd++) {
        uint16_t *xh = x + hd * d;
        for (int64_t c = 0; c < half; c += 16) {
            const __m512 lo = load16(xh + c), hi = load16(xh + half + c);
            const __m512 a0 = round_bf16(_mm512_mul_ps(lo, load16(cos + c)));
            const __m512 b0 = round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), load16(sin + c)));
            const __m512 a1 = round_bf16(_mm512_mul_ps(hi, load16(cos + half + c)));
            const __m512 b1 = round_bf16(_mm512_mul_ps(lo, load16(sin + half + c)));
            store16(xh + c, _mm512_add_ps(a0, b0));
            store16(xh + half + c, _mm512_add_ps(a1, b1));
        }
    }
}

/* The whole one-row step. h [hidden] bf16: the embedded token in, the last layer's output out
   (before the final norm). cos/sin [d] bf16: this position's. K/V buffers per layer at kbufs[l],
   vbufs[l] ([rows, kv_heads, cap, d] contiguous: row stride kv_row, head stride kv_head); the
   row's K/V are written at (slot, pos) and attention reads positions [0, pos]. gate/up: columns
   [gate_lo, gate_lo + inter) and [up_lo, up_lo + inter) of the gate_up output. Returns 0, or -1
   for shapes it does not take (nothing written). */
int64_t row_step_bf16(int64_t n_layers, const layer_t *layers, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d,
                      int64_t inter, int64_t gate_lo, int64_t up_lo, float eps, float scale, uint16_t *h,
                      const uint16_t *cos, const uint16_t *sin, uint16_t *const *kbufs, uint16_t *const *vbufs,
                      int64_t kv_row, int64_t kv_head, int64_t slot, int64_t pos, int64_t max_rank, int threads) {
    if (kv_heads <= 0 || heads % kv_heads || d % 32 || d > MAXD || heads / kv_heads > MAXG || hidden % 32 || inter % 32) return -1;
    const int G = (int)(heads / kv_heads), nc = (int)(d / 32);
    const int64_t q_out = heads * d, kv_out = kv_heads * d, L = pos + 1;
    const int64_t widest = 2 * inter > q_out + 2 * kv_out ? 2 * inter : q_out + 2 * kv_out;
    int64_t longest = inter > hidden ? inter : hidden; /* the longest projection input */
    if (q_out > longest) longest = q_out;
    uint16_t *x = malloc(sizeof(uint16_t) * longest);
    uint16_t *proj = malloc(sizeof(uint16_t) * widest);
    uint16_t *att = malloc(sizeof(uint16_t) * q_out);
    uint16_t *delta = malloc(sizeof(uint16_t) * hidden);
    float *sums = malloc(sizeof(float) * (longest / 32));
    float *u = malloc(sizeof(float) * (max_rank > 0 ? max_rank : 1));
    if (!x || !proj || !att || !delta || !sums || !u) {
        free(x); free(proj); free(att); free(delta); free(sums); free(u);
        return -2;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        for (int64_t l = 0; l < n_layers; l++) {
            const layer_t *ly = layers + l;
            uint16_t *kb = kbufs[l] + slot * kv_row, *vb = vbufs[l] + slot * kv_row; /* this row's K/V */
#pragma omp single
            {
                add_rms_row(hidden, h, l ? delta : NULL, ly->in_norm, eps, x, sums);
                lora_shrink(&ly->qkv, x, u);
            }
            gemv_int4(&ly->qkv, x, sums, u, proj);           /* [q_out + 2 kv_out] */
#pragma omp single
            {
                rope_row(heads + kv_heads, d, proj, cos, sin); /* q and k heads are adjacent */
                for (int64_t g = 0; g < kv_heads; g++) {
                    memcpy(kb + g * kv_head + pos * d, proj + q_out + g * d, sizeof(uint16_t) * d);
                    memcpy(vb + g * kv_head + pos * d, proj + q_out + kv_out + g * d, sizeof(uint16_t) * d);
                }
            }
#pragma omp for schedule(static, 1)
            for (int64_t g = 0; g < kv_heads; g++) {                 /* attention, then the group sums of its output */
                const int64_t lo = g * G * d, hi = (g + 1) * G * d;
                attend_group(G, nc, proj + lo, d, kbufs[l] + slot * kv_row + g * kv_head, vbufs[l] + slot * kv_row + g * kv_head, L, scale, att + lo); /* head stride d */
                for (int64_t c = lo; c < hi; c += 32) sums[c / 32] = _mm512_reduce_add_ps(_mm512_add_ps(load16(att + c), load16(att + c + 16)));
            }
            if (ly->o.a) { /* the same for every thread */
#pragma omp single
                lora_shrink(&ly->o, att, u);
            }
            gemv_int4(&ly->o, att, sums, u, delta);           /* [hidden], added at the next norm */
#pragma omp single
            {
                add_rms_row(hidden, h, delta, ly->post_norm, eps, x, sums);
                lora_shrink(&ly->gate_up, x, u);
            }
            gemv_int4(&ly->gate_up, x, sums, u, proj);       /* [2 inter] */
#pragma omp for schedule(static)
            for (int64_t c = 0; c < inter; c += 32) {         /* x = bf16(bf16(silu(gate)) * up), group sums */
                __m512 y[2];
                for (int k = 0; k < 2; k++) {
                    const __m512 gv = load16(proj + gate_lo + c + 16 * k);
                    const __m512 s = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
                    y[k] = round_bf16(_mm512_mul_ps(s, load16(proj + up_lo + c + 16 * k)));
                    store16(x + c + 16 * k, y[k]);
                }
                sums[c / 32] = _mm512_reduce_add_ps(_mm512_add_ps(y[0], y[1]));
            }
            if (ly->down.a) {
#pragma omp single
                lora_shrink(&ly->down, x, u);
            }
            gemv_int4(&ly->down, x, sums, u, delta);          /* [hidden], added at the next norm */
        }
#pragma omp single
        for (int64_t c = 0; c < hidden; c += 16) store16(h + c, _mm512_add_ps(load16(h + c), load16(delta + c)));
    }
    free(x); free(proj); free(att); free(delta); free(sums); free(u);
    return 0;
}
#else
int64_t row_step_bf16(void) { return -1; }
#endif
"""

_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fPIC", "-shared", "-fno-math-errno"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")


class _Proj(ctypes.Structure):
    _fields_ = [("nib", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("out", ctypes.c_int64), ("inp", ctypes.c_int64), ("rank", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj)]


def _check(lib: ctypes.CDLL) -> None:
    if not lib.row_fast():
        raise RuntimeError("the library was built without AVX512-BF16")
    lib.row_layer_size.restype = ctypes.c_int64
    if lib.row_layer_size() != ctypes.sizeof(_Layer):
        raise RuntimeError("the library's layer struct differs from this module's")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.row_step_bf16
    fn.argtypes = [i64, ptr, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_float, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
    fn.restype = i64


LIBRARY = native.Library("decode_row", _SOURCE, _FLAGS, _CPU_FLAGS, _check, fallback="one-row decode steps keep the per-op path")

#: compile the library now (no CPU check: an image build host may differ); its path
build = LIBRARY.build
#: whether the kernel is built and loaded (builds it on the first call)
available = LIBRARY.available


def why_not() -> str | None:
    return LIBRARY.why_not


def shape_fits(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> bool:
    """Whether the kernel takes a model of these sizes (its projections' widths are checked
    when they are packed)."""
    return (hidden % GROUP == 0 and inter % GROUP == 0 and attention_kernel.shape_fits(heads, kv_heads, head_dim)
            and ((heads + 2 * kv_heads) * head_dim) % BLOCK == 0 and hidden % BLOCK == 0)


@dataclass(frozen=True)
class Int4Rows:
    """One projection's Q4_1 levels in the kernel's layout (see the module docstring)."""

    nib: torch.Tensor     # [out / 16, in / 32, 16 input pairs, 16 rows] uint8
    scale: torch.Tensor   # [out / 16, in / 32, 16 rows] fp32 (a block's scales follow each other, as its levels do)
    offset: torch.Tensor  # [out / 16, in / 32, 16 rows] fp32: m - 128 * scale
    out_features: int
    in_features: int

    @classmethod
    def pack(cls, levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> "Int4Rows":
        """levels [out, in] in 0..15, scale and low [out, in / 32] (w = scale * q + low)."""
        out, inp = levels.shape
        if out % BLOCK or inp % GROUP:
            raise ValueError(f"row kernel: a [{out}, {inp}] projection is not in blocks of {BLOCK} rows x {GROUP} inputs")
        q = levels.to(torch.uint8).view(out // BLOCK, BLOCK, inp // GROUP, GROUP // 2, 2).permute(0, 2, 3, 1, 4)  # [blocks, groups, pairs, rows, 2]
        nib = (q[..., 0] | (q[..., 1] << 4)).contiguous()  # per row: the pair's first level low, second high
        def per_block(t: torch.Tensor) -> torch.Tensor:  # [out, groups] -> [blocks, groups, 16]
            return t.view(out // BLOCK, BLOCK, inp // GROUP).permute(0, 2, 1).contiguous()

        scale32 = scale.float()
        return cls(nib=nib, scale=per_block(scale32), offset=per_block(low.float() - 128.0 * scale32), out_features=out, in_features=inp)


@dataclass
class RowLayer:
    """One decoder layer's inputs to the kernel: norms (bf16 [hidden]), the four projections and
    their biases (bf16 or None)."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    projections: tuple[Int4Rows, Int4Rows, Int4Rows, Int4Rows]  # q/k/v, o, gate/up, down
    biases: tuple[torch.Tensor | None, ...]


class RowStep:
    """``step(h, cos, sin, keys, values, slot, pos, adapter_rows)``: the whole one-row step of
    ``layers`` in one call (see the module docstring)."""

    def __init__(self, layers: list[RowLayer], *, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                 gate_lo: int, up_lo: int, eps: float, scale: float) -> None:
        if not shape_fits(hidden, heads, kv_heads, head_dim, inter):
            raise ValueError(f"row kernel: hidden {hidden}, heads {heads}/{kv_heads}, head size {head_dim}, intermediate {inter} do not fit")
        q_out, kv_out = heads * head_dim, kv_heads * head_dim
        sizes = ((q_out + 2 * kv_out, hidden), (hidden, q_out), (2 * inter, hidden), (hidden, inter))  # what the C step reads and writes
        for layer in layers:
            found = tuple((p.out_features, p.in_features) for p in layer.projections)
            if found != sizes:
                raise ValueError(f"row kernel: projections (out, in) {found}, the model's sizes need {sizes}")
        if sorted((gate_lo, up_lo)) != [0, inter]:
            raise ValueError(f"row kernel: gate at column {gate_lo} and up at {up_lo} do not split a [{2 * inter}] gate/up output")
        self.layers = layers
        self.dims = (hidden, heads, kv_heads, head_dim, inter, gate_lo, up_lo)
        self.eps, self.scale = float(eps), float(scale)
        self._table = (_Layer * len(layers))()
        for entry, layer in zip(self._table, layers):
            entry.in_norm, entry.post_norm = self._bf16(layer.in_norm, hidden), self._bf16(layer.post_norm, hidden)
            for name, rows, bias in zip(("qkv", "o", "gate_up", "down"), layer.projections, layer.biases):
                proj = getattr(entry, name)
                proj.nib, proj.scale, proj.offset = rows.nib.data_ptr(), rows.scale.data_ptr(), rows.offset.data_ptr()
                proj.bias = None if bias is None else self._bf16(bias, rows.out_features)
                proj.out, proj.inp, proj.rank = rows.out_features, rows.in_features, 0
        self.adapter_key: object = None
        self._adapter_refs: list = []
        self._max_rank = 0
        self._kv_key: tuple | None = None
        self._kv_arrays: tuple | None = None
        self.calls = 0

    @staticmethod
    def _bf16(t: torch.Tensor, n: int) -> int:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"row kernel: expected a contiguous bf16 CPU vector of {n}, got {tuple(t.shape)} {t.dtype}")
        return t.data_ptr()

    def set_adapter(self, key: object, rows: list[tuple]) -> None:
        """This step's adapter: per layer, per projection (q/k/v, o, gate/up, down), its rows
        ``(A [r, in], B [r, out])`` or ``(None, None)``, kept at bf16 (the engine stores LoRA rows
        at bf16, so its fp32 copies convert exactly; the products are summed in fp32). ``key`` names the set: the same key
        again changes nothing."""
        if key == self.adapter_key:
            return
        if len(rows) != len(self.layers):
            raise ValueError(f"row kernel: LoRA rows for {len(rows)} layers, the step has {len(self.layers)}")
        checked: list[tuple[int, str, torch.Tensor | None, torch.Tensor | None]] = []
        for index, (layer_rows, layer) in enumerate(zip(rows, self.layers)):  # every shape first: a refusal changes nothing
            for name, (a, b), packed in zip(("qkv", "o", "gate_up", "down"), layer_rows, layer.projections):
                if a is not None:
                    # bf16: the engine keeps LoRA rows at bf16 (these are exact copies); others round once
                    a, b = a.to(torch.bfloat16).contiguous(), b.to(torch.bfloat16).contiguous()
                    if a.dim() != 2 or a.shape[1] != packed.in_features or b.shape != (a.shape[0], packed.out_features):
                        raise ValueError(f"row kernel: LoRA rows A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a [{packed.out_features}, {packed.in_features}] projection")
                checked.append((index, name, a, b))
        self.adapter_key = None  # until the table is whole again
        refs: list = []
        max_rank = 0
        for index, name, a, b in checked:
            proj = getattr(self._table[index], name)
            if a is None:
                proj.a = proj.b = None
                proj.rank = 0
                continue
            rank = a.shape[0]
            b = b.view(rank, b.shape[1] // BLOCK, BLOCK).transpose(0, 1).contiguous()  # [out / 16, rank, 16]: each block's rows together
            refs += [a, b]
            proj.a, proj.b, proj.rank = a.data_ptr(), b.data_ptr(), rank
            max_rank = max(max_rank, a.shape[0])
        self._adapter_refs, self._max_rank, self.adapter_key = refs, max_rank, key

    def _kv(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple:
        key = tuple(t.data_ptr() for t in keys) + tuple(t.data_ptr() for t in values)
        if key != self._kv_key:
            for t in (*keys, *values):
                if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"row kernel: K/V buffers must be contiguous bf16 on CPU, got {t.dtype} {tuple(t.shape)}")
            n = len(keys)
            self._kv_arrays = ((ctypes.c_void_p * n)(*key[:n]), (ctypes.c_void_p * n)(*key[n:]))
            self._kv_key = key
        return self._kv_arrays

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], slot: int, pos: int) -> torch.Tensor:
        """h [1, hidden] bf16 (overwritten: the embedded token in, the last layer's output out);
        cos/sin [d] bf16 at ``pos``; keys/values per layer [rows, kv_heads, cap, d]. The row's
        K/V are written at (slot, pos); the caller reserved them (the cache's plan)."""
        hidden, heads, kv_heads, d, inter, gate_lo, up_lo = self.dims
        k0 = keys[0]
        if (h.shape != (1, hidden) or not h.is_contiguous() or h.dtype != torch.bfloat16 or cos.shape != (d,) or sin.shape != (d,)
                or cos.dtype != torch.bfloat16 or sin.dtype != torch.bfloat16 or not cos.is_contiguous() or not sin.is_contiguous()
                or len(keys) != len(self.layers) or len(values) != len(keys) or k0.shape[1] != kv_heads or k0.shape[3] != d
                or not 0 <= slot < k0.shape[0] or not 0 <= pos < k0.shape[2]):
            raise ValueError(f"row kernel: h {tuple(h.shape)}, cos {tuple(cos.shape)}, K/V {tuple(k0.shape)}, slot {slot}, position {pos} do not fit")
        kbufs, vbufs = self._kv(keys, values)
        status = LIBRARY.loaded().row_step_bf16(
            len(self.layers), ctypes.addressof(self._table), hidden, heads, kv_heads, d, inter, gate_lo, up_lo, self.eps, self.scale,
            h.data_ptr(), cos.data_ptr(), sin.data_ptr(), kbufs, vbufs, k0.stride(0), k0.stride(1), slot, pos, self._max_rank,
            torch.get_num_threads())
        if status:
            raise RuntimeError(f"row kernel: the C step failed with status {status}")
        self.calls += 1
        return h


if __name__ == "__main__":  # `python -m loraplex.server.engine.row_kernel`: build now (the CPU image does)
    print(build())
