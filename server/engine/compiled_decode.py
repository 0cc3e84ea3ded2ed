"""A single stream's decode step compiled whole by ``torch.compile`` (inductor, C++ wrapper).

One row decoding alone costs ~1,300 small ops per token on the embedded base, and dispatching
them one by one from Python costs as much as reading the weights (docs/benchmarks.md, sixth
engine-v2 session). This module owns one pure function, the whole one-row step from the
embedded token to the last hidden state: per layer RMSNorm, the fused GEMMs on the int4 weights,
biases, one adapter's LoRA rows in fp32, rotary, the K/V write into the engine's cache buffers
and attention over the row's cache under a position mask; and its compiled form. Only a whole
step pays: compiling per layer, or around the engine's eager attention, left the guards and
wrapper calls of 30-60 compiled calls per token and measured no faster (docs/benchmarks.md).

The cache buffers are inputs with dynamic row and position counts, so one compile serves every
cache size; attention reads the row's whole capacity under a position mask (capacity only grows,
by doubling, so after one long request a later stream reads more K/V than it needs: measured
with capacities of 256; reading only a power-of-two prefix needs a second graph for the prefix
that is the whole buffer, and compiled more than 15 minutes per signature here, so it is not
done). A compile depends only on which
bias and LoRA inputs are present and their shapes (``signature``: the adapter's targets and ranks;
the bare base is one more). It takes minutes on two cores, so it never runs on the engine's
thread: the first step of a signature queues it and steps eagerly; a background thread
(``loraplex-decode-compile``) compiles it, warmed up on small scratch buffers, and later steps use
it. While any compile runs, every one-row step is eager (one process-wide lock: the stance below
is process-wide). Steps run under the ``fail_on_recompile`` stance, so an input unlike the
warm-up's raises instead of compiling on the engine thread; that signature then steps eagerly
for good. Past ``RECOMPILE_LIMIT`` signatures in a process, new ones stay eager.

Rounding differs from the eager step within bf16 noise (fused norms and activations). Nothing
here knows of requests, slots' owners or adapters' names.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from loraplex.server.engine import cpu_threads

log = logging.getLogger(__name__)

GROUP = 32  # the int4 kernel's group size (int4.py)
_OPTIONS = {"cpp_wrapper": True}
#: held by every step's call and every compile, across instances: the stance is process-wide,
#: and every instance's compiles share ``OneRowStep.run``'s compiled-code cache
_CALLING = threading.Lock()
#: compiled signatures kept per process (torch's default recompile limit is 8); past it a new
#: signature's compile fails and that signature steps eagerly
RECOMPILE_LIMIT = 64


def why_not_available() -> str | None:
    """None when this process can compile the step; else the reason, in words."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "this torch has no int4 CPU kernel"
    if not hasattr(torch.compiler, "set_stance"):
        return "this torch has no torch.compiler.set_stance"
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "no C++ compiler (g++) on PATH: inductor builds C++ kernels"
    return None


class OneRowStep:
    """``run(h, cos, sin, slot, pos, keys, values, layers) -> h`` for one decoding row.

    Shapes: h [1, H]; cos/sin [1, 1, d]; slot/pos [1] long; keys/values per layer
    [rows, kv_heads, cap, d]; ``layers`` per layer 22 tensors, in this order: in_norm, then
    q/k/v's (int4 packed, scales, bias or None, A or None, B or None), o's five, post_norm,
    gate/up's five, down's five (``LlamaStepForward.one_row_layer_inputs`` builds them)."""

    def __init__(self, *, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, scale: float, gate_up_spans: Sequence[tuple[int, int]]) -> None:
        self.hidden, self.heads, self.kv_heads, self.head_dim, self.eps, self.scale = hidden, heads, kv_heads, head_dim, eps, scale
        self.q_out, self.kv_out = heads * head_dim, kv_heads * head_dim
        self.gate_up_spans = tuple(gate_up_spans)
        self._compiled: dict[tuple, Callable] = {}
        self._wanted: list[tuple[tuple, tuple]] = []  # (signature, a warm-up's layer inputs)
        self._broken: set[tuple] = set()
        self._state = threading.Condition()
        self._compiler: threading.Thread | None = None

    # ------------------------------------------------------------ the math
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * F.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype)

    @staticmethod
    def _project(x, packed, scales, bias, a, b) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales)  # [1, out]
        if bias is not None:
            y = y + bias
        if a is not None:  # the adapter's rows in fp32, as the eager small-step path adds them
            y = (y.float() + F.linear(x.float(), a) @ b).to(y.dtype)
        return y

    def run(self, h, cos, sin, slot, pos, keys: list, values: list, layers: list):
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        half = d // 2
        for i, (in_norm, qp, qs, qbias, qa, qb, op, os_, obias, oa, ob, post_norm, gp, gs, gbias, ga, gb, dp, ds, dbias, da, db) in enumerate(layers):
            qkv = self._project(self._rms(h, in_norm), qp, qs, qbias, qa, qb)  # [1, q_out + 2 kv_out]
            qk = qkv[:, : self.q_out + self.kv_out].view(1, heads + kv_heads, d)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            k_buf, v_buf = keys[i], values[i]  # [rows, kv_heads, cap, d]
            k_buf[slot, :, pos] = qk[:, heads:]
            v_buf[slot, :, pos] = qkv[:, self.q_out + self.kv_out :].view(1, kv_heads, d)
            cap = k_buf.shape[2]
            mask = (torch.arange(cap, device=pos.device) <= pos)[None, None, None, :]  # [1, 1, 1, cap]
            attn = F.scaled_dot_product_attention(
                qk[:, :heads].reshape(1, kv_heads, heads // kv_heads, d),  # GQA folded, as the engine does
                k_buf.index_select(0, slot), v_buf.index_select(0, slot), attn_mask=mask, scale=self.scale,
            )  # [1, kv_heads, group, d]
            h = h + self._project(attn.reshape(1, self.q_out), op, os_, obias, oa, ob)
            gate_up = self._project(self._rms(h, post_norm), gp, gs, gbias, ga, gb)
            (g_lo, g_hi), (u_lo, u_hi) = self.gate_up_spans
            h = h + self._project(F.silu(gate_up[:, g_lo:g_hi]) * gate_up[:, u_lo:u_hi], dp, ds, dbias, da, db)
        return h

    # ------------------------------------------------------------ compiled form
    @staticmethod
    def signature(layers: list) -> tuple:
        """Which optional inputs are present and the LoRA ranks, per layer."""
        return tuple(tuple(None if t is None else tuple(t.shape) for t in layer) for layer in layers)

    def compiled(self, key: tuple) -> Callable | None:
        return self._compiled.get(key)

    def request(self, key: tuple, layers: list, dtype: torch.dtype, kv_like: torch.Tensor) -> None:
        """Queue a compile of ``key`` (nothing if done, queued or broken), warmed up on
        activations of ``dtype`` and cache buffers like ``kv_like`` (dtype, inference tensor or not)."""
        with self._state:
            if key in self._broken or key in self._compiled or any(k == key for k, _ in self._wanted):
                return
            self._wanted.append((key, (layers, dtype, kv_like.dtype, kv_like.is_inference())))
            if self._compiler is None:
                self._compiler = threading.Thread(target=self._compile_loop, name="loraplex-decode-compile", daemon=True)
                self._compiler.start()

    @contextlib.contextmanager
    def engine_calls(self) -> Iterator[bool]:
        """Around a step's call: False while a compile runs (step eagerly); else True, with
        recompiling refused (a failing guard raises)."""
        if not _CALLING.acquire(blocking=False):
            yield False
            return
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                yield True
        finally:
            _CALLING.release()

    def mark_broken(self, key: tuple) -> None:
        self._broken.add(key)
        self._compiled.pop(key, None)

    @property
    def ready(self) -> int:
        return len(self._compiled)

    def settle(self, timeout: float = 900.0) -> bool:
        """Wait until no compile is pending (tests, benchmarks); True when settled."""
        with self._state:
            return self._state.wait_for(lambda: self._compiler is None, timeout)

    def _warm_up(self, fn: Callable, layers: list, dtype: torch.dtype, kv_dtype: torch.dtype, kv_inference: bool) -> None:
        """One call on scratch inputs shaped like a step's, cache sizes marked dynamic."""
        n = len(layers)
        with torch.inference_mode(kv_inference):  # the guards check it: buffers made like the engine's
            keys = [torch.zeros(3, self.kv_heads, 17, self.head_dim, dtype=kv_dtype) for _ in range(n)]
            values = [torch.zeros(3, self.kv_heads, 17, self.head_dim, dtype=kv_dtype) for _ in range(n)]
        h = torch.zeros(1, self.hidden, dtype=dtype)
        cos = torch.ones(1, 1, self.head_dim, dtype=dtype)
        sin = torch.zeros(1, 1, self.head_dim, dtype=dtype)
        for buffer in keys + values:
            torch._dynamo.mark_dynamic(buffer, 0)
            torch._dynamo.mark_dynamic(buffer, 2)
        fn(h, cos, sin, torch.tensor([1]), torch.tensor([5]), keys, values, layers)

    def _compile_loop(self) -> None:
        # inductor sizes its kernels' OpenMP regions by this thread's count: the engine's
        cpu_threads.engine_thread()
        while True:
            with self._state:
                if not self._wanted:
                    self._compiler = None
                    self._state.notify_all()
                    return
                key, (layers, dtype, kv_dtype, kv_inference) = self._wanted[0]
            try:
                with _CALLING, torch.inference_mode():
                    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                    fn = torch.compile(self.run, fullgraph=True, options=_OPTIONS)
                    self._warm_up(fn, layers, dtype, kv_dtype, kv_inference)
                self._compiled[key] = fn
                log.info("compiled the one-row decode step (%d layers)", len(layers))
            except Exception:  # no compiler, an inductor error: this signature stays eager
                log.exception("compiling the one-row decode step failed; single streams stay eager")
                self._broken.add(key)
            with self._state:
                self._wanted = [(k, v) for k, v in self._wanted if k != key]
