"""The LoRA expand of a bf16 CPU step as one small C kernel (a CPU BGMV).

Why it exists: the folded shrink (lora.py) leaves each projection's LoRA as ``y += (u * mask)
@ B``, u being every token's products with every resident adapter's A rows ([N, R]) and B the
stacked expand rows ([R, out]). Done with torch that is a mask multiply and 5 oneDNN bf16 GEMMs
per layer, and on this CPU a bf16 GEMM call costs 45-65 us before it does any work (a
[64, 64] x [64, 64] product: 51 us; the same in fp32: 13 us), so the expands of a 64-row mixed
decode step took about 25 ms for a few MFLOP. Here each token reads only its own slots' rows
(the gather of SGMV/BGMV), their products are summed in fp32 onto the bf16 output with one
rounding, and one call covers a whole projection group (q/k/v, gate/up) with no mask.

How: AVX512-BF16's ``vdpbf16ps`` multiplies a pair of bf16 coefficients by a pair of bf16 B
rows into fp32 lanes, so B is kept pair-interleaved (``interleave_pairs``), and 16 independent
accumulators (256 columns) hide the instruction's latency; tokens whose (slot, weight) segments
are identical run in groups of ``GROUP`` sharing each B load. The coefficient of row j is
``bf16(w * u[t, j])`` computed in fp32 (the masked GEMM rounds ``w`` to bf16 first: the same for
w = 1, a rounding apart for mixes).

The library is built and loaded by ``native`` (gcc, about a second, explicit ISA flags checked
against /proc/cpuinfo). ``available()`` is False, with the reason logged once, when the CPU
lacks the instructions, there is neither a library nor a compiler, the build fails or the
folder is not trusted; callers then keep the GEMM path.

Owns the kernel's source, its plan of a projection group (``ExpandPlan``) and a step's token
table (``TokenSegments``). Knows nothing of adapters, slots' meaning or models: tables of rows
and three matrices.
"""

from __future__ import annotations

import ctypes

import torch

from loraplex.server import native


#: the switch tools/engine_bench.py and tools/paired_steps.py flip for A/B runs
EXPAND_KERNEL = {"enabled": True, "parallel": True}

#: steps of at least this many tokens share their token groups out over torch's OpenMP team;
#: decode steps (64 rows) measured no faster that way, 512-token prefill steps were
PARALLEL_TOKENS = 128

#: steps with more tokens than this keep the GEMM: 512-token prefill steps measured faster with
#: the kernel on this 2-core CPU even on one thread (docs/benchmarks.md, seventh engine-v2
#: session), and faster again on torch's OpenMP team (eighth); larger steps were not measured
MAX_TOKENS = 1024

#: tokens per group sharing B loads, and row pairs gathered per token and member at a time: the
#: C side's MAXGROUP and MAXPAIRS (checked at load). One slot's rows must fit one gather, so a
#: plan refuses a slot spanning more pairs (a rank above 510 at any start, 512 at an even one)
GROUP = 4
MAX_PAIRS = 256

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* B is stored pair-interleaved: rows 2p and 2p+1 of the [R, out] expand matrix become row p of
   [P, out, 2] (P = ceil(R / 2); a missing last row is zero), the layout of AVX512-BF16's
   dot-product instruction, which multiplies a pair of bf16 coefficients by a pair of bf16 rows
   and adds both products into fp32 lanes. Strides in elements. */

int lora_expand_fast(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void store16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}
static inline uint16_t f32_bf16(float f) {
    __m128 v = _mm_set_ss(f);
    return (uint16_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(v));
}
static inline float bf16_f32(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }

#define MAXPAIRS 256
#define MAXGROUP 4

/* NT tokens sharing their B rows, 64 columns: each pair of B rows is loaded once and used by
   every token's 4 accumulators (NT * 4 independent accumulators hide the instruction latency;
   sharing the loads cuts the L2 reads the kernel is bound by when tokens repeat an adapter). */
#define BLOCKT(NAME, NT)                                                                          \
static inline void NAME(uint16_t *const *yr, uint32_t (*coef)[MAXPAIRS], const uint16_t *const *pairs, int np, int64_t o) { \
    __m512 a[NT][4];                                                                              \
    for (int g = 0; g < NT; g++)                                                                  \
        for (int i = 0; i < 4; i++) a[g][i] = load16(yr[g] + o + 16 * i);                         \
    for (int k = 0; k < np; k++) {                                                                \
        const uint16_t *r = pairs[k] + 2 * o;                                                     \
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(r), b1 = (__m512bh)_mm512_loadu_si512(r + 32); \
        __m512bh b2 = (__m512bh)_mm512_loadu_si512(r + 64), b3 = (__m512bh)_mm512_loadu_si512(r + 96); \
        for (int g = 0; g < NT; g++) {                                                            \
            __m512bh c = (__m512bh)_mm512_set1_epi32((int)coef[g][k]);                            \
            a[g][0] = _mm512_dpbf16_ps(a[g][0], c, b0);                                           \
            a[g][1] = _mm512_dpbf16_ps(a[g][1], c, b1);                                           \
            a[g][2] = _mm512_dpbf16_ps(a[g][2], c, b2);                                           \
            a[g][3] = _mm512_dpbf16_ps(a[g][3], c, b3);                                           \
        }                                                                                         \
    }                                                                                             \
    for (int g = 0; g < NT; g++)                                                                  \
        for (int i = 0; i < 4; i++) store16(yr[g] + o + 16 * i, a[g][i]);                         \
}
BLOCKT(block_t1, 1)
BLOCKT(block_t2, 2)
BLOCKT(block_t3, 3)
BLOCKT(block_t4, 4)

/* One token, 256 columns with 16 accumulators (a token alone: nothing to share the loads with). */
static inline void block16(uint16_t *yr, const uint32_t *coef, const uint16_t *const *pairs, int np, int64_t o) {
    __m512 a[16];
    for (int i = 0; i < 16; i++) a[i] = load16(yr + o + 16 * i);
    for (int k = 0; k < np; k++) {
        __m512bh c = (__m512bh)_mm512_set1_epi32((int)coef[k]);
        const uint16_t *r = pairs[k] + 2 * o;
        for (int i = 0; i < 16; i++) a[i] = _mm512_dpbf16_ps(a[i], c, (__m512bh)_mm512_loadu_si512(r + 32 * i));
    }
    for (int i = 0; i < 16; i++) store16(yr + o + 16 * i, a[i]);
}

/* One member of a projection group: its output columns, its columns of u, its B (pair-
   interleaved, row stride bs) and per slot its first row and rank there (rank 0: no rows). */
typedef struct {
    int64_t out, y_col, u_col;
    const uint16_t *b2; int64_t bs;
    const int32_t *start, *rank; int64_t nslots;
} member_t;

static inline void prefetch_rows(const member_t *m, const int32_t *tok_ptr, const int32_t *tok_slot, int32_t t) {
    for (int32_t s = tok_ptr[t]; s < tok_ptr[t + 1]; s++) {
        int32_t slot = tok_slot[s];
        if (slot < 0 || slot >= m->nslots || m->rank[slot] <= 0) continue;
        int32_t p0 = m->start[slot] >> 1, p1 = (m->start[slot] + m->rank[slot] + 1) >> 1;
        for (int32_t p = p0; p < p1; p++) {
            const char *row = (const char *)(m->b2 + (int64_t)p * m->bs);
            for (int64_t off = 0; off < 4 * m->out; off += 64) _mm_prefetch(row + off, _MM_HINT_T1);
        }
    }
}

/* For every token t and member m, y[t, m.y_col : + m.out] += sum over t's segments s
   (tok_ptr[t] <= s < tok_ptr[t+1]) of bf16(tok_w[s] * u[t, m.u_col + m.start[slot] + j]) *
   B_m[m.start[slot] + j, :] for j < m.rank[slot], slot = tok_slot[s]; the products summed in
   fp32 with y's value and rounded to bf16 once.
   Tokens come in groups (grp_tok[grp_ptr[i] .. grp_ptr[i+1]), at most MAXGROUP) whose segments
   are identical, so a group reads each B row once; any grouping gives the same result.
   threads > 1 shares the groups out over the calling thread's OpenMP team (see the loop).
   Strides in elements. */
int lora_expand_max_group(void) { return MAXGROUP; }
int lora_expand_max_pairs(void) { return MAXPAIRS; }

int64_t lora_expand_bf16(int64_t n, uint16_t *y, int64_t ys, const uint16_t *u, int64_t us,
                      const int32_t *tok_ptr, const int32_t *tok_slot, const float *tok_w,
                      const int32_t *grp_ptr, const int32_t *grp_tok, int64_t ngroups,
                      const member_t *members, int64_t nmembers, int threads) {
    int64_t skipped = 0;  /* segments left out (returned: the caller raises) */
    /* groups shared out over the OpenMP team when the caller asks (each group writes only its
       own tokens' rows of y): the library links the libgomp torch already loaded (the same
       soname), so this reuses the team torch's parallel regions use on this thread */
#pragma omp parallel for schedule(dynamic, 2) reduction(+ : skipped) num_threads(threads) if (threads > 1)
    for (int64_t gi = 0; gi < ngroups; gi++) {
        static __thread uint32_t coef[MAXGROUP][MAXPAIRS];
        const uint16_t *pairs[MAXPAIRS];
        uint16_t *yr[MAXGROUP];
        const uint16_t *ur[MAXGROUP];
        int nt = grp_ptr[gi + 1] - grp_ptr[gi];
        if (nt <= 0) continue;
        if (nt > MAXGROUP) nt = MAXGROUP;  /* never built that way */
        const int32_t *toks = grp_tok + grp_ptr[gi];
        const int32_t t0 = toks[0];
        for (int64_t mi = 0; mi < nmembers; mi++) {
            const member_t *m = &members[mi];
            for (int g = 0; g < nt; g++) {
                ur[g] = u + (int64_t)toks[g] * us + m->u_col;
                yr[g] = y + (int64_t)toks[g] * ys + m->y_col;
            }
            if (gi + 1 < ngroups)  /* the next group's B rows toward L2 while this one computes */
                prefetch_rows(m, tok_ptr, tok_slot, grp_tok[grp_ptr[gi + 1]]);
            int32_t s = tok_ptr[t0], s1 = tok_ptr[t0 + 1];
            while (s < s1) {
                int np = 0;
                for (; s < s1; s++) {  /* gather the group's (coefficient pairs, B pair row) */
                    int32_t slot = tok_slot[s];
                    if (slot < 0 || slot >= m->nslots || m->rank[slot] <= 0) continue;
                    int32_t lo = m->start[slot], hi = m->start[slot] + m->rank[slot];
                    int32_t p0 = lo >> 1, p1 = (hi + 1) >> 1;
                    if (np + (p1 - p0) > MAXPAIRS) {
                        if (np) break;       /* the pairs so far first; this segment starts the next gather */
                        skipped++;           /* one slot alone too big: plans refuse it, so never */
                        continue;
                    }
                    for (int32_t p = p0; p < p1; p++) {
                        for (int g = 0; g < nt; g++) {
                            uint16_t c[2] = {0, 0};
                            for (int half = 0; half < 2; half++) {
                                int32_t j = 2 * p + half;
                                if (j >= lo && j < hi) c[half] = f32_bf16(tok_w[s] * bf16_f32(ur[g][j]));
                            }
                            coef[g][np] = (uint32_t)c[0] | ((uint32_t)c[1] << 16);
                        }
                        pairs[np] = m->b2 + (int64_t)p * m->bs;
                        np++;
                    }
                }
                if (np == 0) continue;
                const int64_t out = m->out;
                int64_t o = 0;
                if (nt == 1)
                    for (; o + 256 <= out; o += 256) block16(yr[0], coef[0], pairs, np, o);
                for (; o + 64 <= out; o += 64) {
                    switch (nt) {
                        case 1: block_t1(yr, coef, pairs, np, o); break;
                        case 2: block_t2(yr, coef, pairs, np, o); break;
                        case 3: block_t3(yr, coef, pairs, np, o); break;
                        default: block_t4(yr, coef, pairs, np, o); break;
                    }
                }
                for (int g = 0; g < nt; g++) {
                    int64_t oo = o;
                    for (; oo + 16 <= out; oo += 16) {
                        __m512 a0 = load16(yr[g] + oo);
                        for (int k = 0; k < np; k++)
                            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)coef[g][k]), (__m512bh)_mm512_loadu_si512(pairs[k] + 2 * oo));
                        store16(yr[g] + oo, a0);
                    }
                    for (; oo < out; oo++) {
                        float a = bf16_f32(yr[g][oo]);
                        for (int k = 0; k < np; k++)
                            a += bf16_f32((uint16_t)coef[g][k]) * bf16_f32(pairs[k][2 * oo]) + bf16_f32((uint16_t)(coef[g][k] >> 16)) * bf16_f32(pairs[k][2 * oo + 1]);
                        yr[g][oo] = f32_bf16(a);
                    }
                }
            }
        }
    }
    return skipped;
}
#else
int64_t lora_expand_bf16(void) { return -1; }
#endif
"""

#: explicit ISA flags (not -march=native), so a library built once (the CPU image builds it at
#: image build time) runs on any CPU with these extensions, which are checked at load
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fPIC", "-shared", "-fno-math-errno"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
_NAME = "lora_expand"

class _Member(ctypes.Structure):
    _fields_ = [("out", ctypes.c_int64), ("y_col", ctypes.c_int64), ("u_col", ctypes.c_int64),
                ("b2", ctypes.c_void_p), ("bs", ctypes.c_int64),
                ("start", ctypes.c_void_p), ("rank", ctypes.c_void_p), ("nslots", ctypes.c_int64)]


def _check(lib: ctypes.CDLL) -> None:
    fn = lib.lora_expand_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ctypes.POINTER(_Member), i64, ctypes.c_int]
    fn.restype = i64
    if not lib.lora_expand_fast():
        raise RuntimeError("the library was built without AVX512-BF16 (the kernel's dot-product instruction)")
    if lib.lora_expand_max_group() != GROUP or lib.lora_expand_max_pairs() != MAX_PAIRS:
        raise RuntimeError("the library's group or pair limits differ from this module's")


LIBRARY = native.Library(_NAME, _SOURCE, _FLAGS, _CPU_FLAGS, _check, fallback="mixed steps keep the oneDNN GEMM")


def build() -> str:
    """Compile the library (no CPU check: the image build host may differ); its path."""
    return LIBRARY.build()


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call; False when that
    fails, with the reason in ``why_not()`` and the log)."""
    return LIBRARY.available()


def why_not() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked yet)."""
    return LIBRARY.why_not


def usable(n_tokens: int) -> bool:
    """Whether a step of ``n_tokens`` should take an existing plan (a plan exists only where the
    kernel is available, for bf16 CPU tensors; ``ExpandPlan.run`` checks them again)."""
    return n_tokens <= MAX_TOKENS and EXPAND_KERNEL["enabled"]


def interleave_pairs(b: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of an expand matrix: b [R, out] -> [ceil(R / 2), 2 * out], rows 2p and
    2p + 1 interleaved element by element (a zero row appended when R is odd)."""
    rows, out = b.shape
    if rows % 2:
        b = torch.cat([b, b.new_zeros(1, out)])
    return b.reshape(-1, 2, out).transpose(1, 2).contiguous().reshape(-1, 2 * out)


class ExpandPlan:
    """The expand of one projection group (q/k/v, gate/up, or a lone projection), ready to call:
    per member its output columns ``[y_col, y_col + out)``, its columns of u from ``u_col``, its
    expand rows ``B [R_m, out]`` and per slot ``(first row, rank)`` there. Holds the pair-
    interleaved B copies and the tables, so their pointers stay valid while the plan lives.

    ``members``: ``(y_col, u_col, B, rows)`` with ``rows`` = {slot: (first, rank)}. Raises
    ValueError for a slot the kernel cannot take (more than ``MAX_PAIRS`` row pairs)."""

    def __init__(self, members: list[tuple[int, int, torch.Tensor, dict[int, tuple[int, int]]]]) -> None:
        self._keep: list[torch.Tensor] = []
        structs = []
        u_width = 0
        for y_col, u_col, b, rows in members:
            if not rows:
                continue
            if b.dtype != torch.bfloat16 or b.device.type != "cpu" or b.dim() != 2:
                raise ValueError(f"expand rows must be a 2-D bf16 CPU tensor, got {tuple(b.shape)} {b.dtype} on {b.device}")
            b2 = interleave_pairs(b)
            size = max(rows) + 1
            start = torch.zeros(size, dtype=torch.int32)
            rank = torch.zeros(size, dtype=torch.int32)
            for slot, (first, count) in rows.items():
                if not (slot >= 0 and first >= 0 and count >= 0 and first + count <= b.shape[0]):
                    raise ValueError(f"slot {slot}: rows {first}..{first + count} outside B's {b.shape[0]} rows")
                pairs = (first + count + 1) // 2 - first // 2
                if pairs > MAX_PAIRS:
                    raise ValueError(f"slot {slot}: rows {first}..{first + count} span {pairs} row pairs, above the kernel's {MAX_PAIRS}")
                start[slot], rank[slot] = first, count
            self._keep += [b2, start, rank]
            structs.append(_Member(b.shape[1], y_col, u_col, b2.data_ptr(), b2.stride(0), start.data_ptr(), rank.data_ptr(), size))
            u_width = max(u_width, u_col + b.shape[0])
        self.width = max((m.y_col + m.out for m in structs), default=0)  # y columns the plan writes
        self.u_width = u_width  # u columns it reads
        self._members = (_Member * max(len(structs), 1))(*structs)
        self._count = len(structs)

    def run(self, y: torch.Tensor, u: torch.Tensor, tokens: "TokenSegments") -> None:
        """``y[t, member columns] += sum_s bf16(w_s * u[t, rows_s]) @ B[rows_s]`` in place, for
        each token t, each member and each of t's segments s = (slot_s, w_s), rows_s that slot's
        rows in the member. y [N, >= width] and u [N, >= u_width] bf16 CPU tensors with unit
        column strides (row strides may be anything: both may be column slices of one output)."""
        lib = LIBRARY.loaded()
        n = y.shape[0]
        if not (y.dtype == u.dtype == torch.bfloat16 and y.stride(1) == 1 and u.stride(1) == 1 and u.shape[0] == n == tokens.n
                and y.shape[1] >= self.width and u.shape[1] >= self.u_width and y.device.type == u.device.type == "cpu"):
            raise ValueError(f"expand: y {tuple(y.shape)} {y.dtype} and u {tuple(u.shape)} {u.dtype} do not fit this plan ({tokens.n} tokens, width {self.width}, u width {self.u_width})")
        skipped = lib.lora_expand_bf16(n, y.data_ptr(), y.stride(0), u.data_ptr(), u.stride(0), *tokens.pointers, self._members, self._count, torch.get_num_threads() if n >= PARALLEL_TOKENS and EXPAND_KERNEL["parallel"] else 1)
        if skipped:
            raise RuntimeError(f"the expand kernel left out {skipped} segments (a slot past its pair buffer)")


class TokenSegments:
    """A step's token -> (slot, weight) segments in CSR form, the kernel's view of a batch:
    ``ptr`` int32 [N + 1], ``slot`` int32 [S], ``weight`` fp32 [S]; base tokens (slot 0) and
    zero weights have no segment. Tokens with identical segments are also listed in groups of
    at most ``GROUP`` (``grp_ptr``, ``grp_tok``), which the kernel runs together."""

    def __init__(self, rows: list[list[tuple[int, float]]]) -> None:
        ptr, slots, weights = [0], [], []
        same: dict[tuple, list[int]] = {}  # identical segments -> their tokens
        for t, row in enumerate(rows):
            kept = tuple((int(slot), float(weight)) for slot, weight in row if slot and weight)
            for slot, weight in kept:
                slots.append(slot)
                weights.append(weight)
            ptr.append(len(slots))
            if kept:
                same.setdefault(kept, []).append(t)
        grp_ptr, grp_tok = [0], []
        for tokens in same.values():
            for i in range(0, len(tokens), GROUP):
                grp_tok.extend(tokens[i : i + GROUP])
                grp_ptr.append(len(grp_tok))
        self.n = len(rows)
        self.ptr = torch.tensor(ptr, dtype=torch.int32)
        self.slot = torch.tensor(slots or [0], dtype=torch.int32)
        self.weight = torch.tensor(weights or [0.0], dtype=torch.float32)
        self.grp_ptr = torch.tensor(grp_ptr, dtype=torch.int32)
        self.grp_tok = torch.tensor(grp_tok or [0], dtype=torch.int32)
        #: the C call's table arguments: (ptr, slot, weight, grp_ptr, grp_tok) addresses and the group count
        self.pointers: tuple[int, int, int, int, int, int] = (
            self.ptr.data_ptr(), self.slot.data_ptr(), self.weight.data_ptr(),
            self.grp_ptr.data_ptr(), self.grp_tok.data_ptr(), len(grp_ptr) - 1,
        )


if __name__ == "__main__":  # `python -m loraplex.server.engine.expand_kernel`: build now (the CPU image does, with LORAPLEX_KERNEL_DIR set)
    print(build())
