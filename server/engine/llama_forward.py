"""A lean forward for Llama-family decoders over the engine's flattened step.

The engine's step is ``N`` tokens of many sequences (``[N]`` ids, positions, KV slots, adapter
slots). Running it through transformers' module tree costs far more host time than the math on
this small model (thousands of tiny ops per token, most of them reshapes, casts and dispatch):
measured on the embedded base, one decode token took ~60 ms where its weights read in ~13 ms.
:class:`LlamaStepForward` computes the same function with the fewest ops, gpt-fast style:

- q/k/v and gate/up projections as ONE GEMM each over fused weights (prepacked by oneDNN for bf16
  on CPU); each wrapped projection then adds its LoRA delta into its column slice of the fused
  output (``MultiLoraLinear.add_lora``; in mixed steps a ``LoraGroup`` reads the group's A rows
  in one GEMM), so every adapter feature (mixes, blocks, hot loads) works unchanged; on the
  prepacked path the resident adapters' A rows are folded into the same GEMM
  (``lora.FoldedShrink``, refolded on a background thread after adapter changes) and mixed
  steps (and one-adapter steps past the small-step size) add LoRA from its extra columns;
- RMSNorm as ``F.rms_norm`` in fp32 (bit-identical to transformers' LlamaRMSNorm on bf16);
- rotary cos/sin looked up in a table built once with the model's own rotary module;
- attention through ``KvCache.attend_flat`` (in-place KV, [N, heads, d] in and out);
- the lm_head only at the positions the step keeps;
- with ``compile_decode``, a step of exactly one decoding row on the int4 path runs as one
  ``torch.compile``d function of the whole step (compiled_decode.py), once its background
  compile is ready; until then, and for every other step, the code below.

Eligible models (``why_not_supported``): the architectures whose decoder layer is exactly
Llama's (``LLAMA_LIKE``: Llama, Mistral without a sliding window, Qwen2 with its q/k/v biases),
static rotary embeddings, every projection a plain ``nn.Linear`` under its LoRA wrapper at the
engine's dtype.
Anything else (quantized bnb bases, dynamic rope, other architectures) runs transformers' forward.
This module knows nothing of requests, adapters' names or files; it reads the engine's
``StepPlan`` and the shared ``LoraBatchContext`` through the wrapped layers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.server.engine import cpu_threads, expand_kernel, pointwise_kernel, row_kernel
from loraplex.server.engine.compiled_decode import OneRowStep, why_not_available
from loraplex.server.engine.int4 import Int4Weight, exact_int4, int4_levels
from loraplex.server.engine import lora as lora_math
from loraplex.server.engine.lora import PACKED_LINEARS, Fold, FoldedShrink, LoraGroup, MultiLoraLinear, pack_weight, packed_linear

log = logging.getLogger(__name__)

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


#: model types whose decoder layer is Llama's: pre-norm RMSNorm, rotary q/k, silu-gated MLP
#: (Gemma scales its norms and embeddings, Qwen3 normalizes q/k, Phi-3 fuses its own q/k/v: not here)
LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2"})


def why_not_supported(model, dtype: torch.dtype) -> str | None:
    """None when :class:`LlamaStepForward` can run ``model`` (already wrapped by
    ``inject_multi_lora``); else the reason, in words."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_LIKE:
        return f"model type {model_type!r} is not one of {sorted(LLAMA_LIKE)}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", model_type == "mistral"):
        return "a sliding attention window"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if config is None or layers is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        return "not a decoder with model.layers / embed_tokens / norm"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or "dynamic" in str(getattr(rotary, "rope_type", "default")):
        return "no static rotary embedding"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not hasattr(layer, "input_layernorm") or not hasattr(layer, "post_attention_layernorm"):
            return "a layer without self_attn / mlp / the two norms"
        for parent, names in ((attn, _QKV + ("o_proj",)), (mlp, _GATE_UP + ("down_proj",))):
            for name in names:
                module = getattr(parent, name, None)
                if not isinstance(module, MultiLoraLinear):
                    return f"{name} is not wrapped for LoRA"
                if type(module.base_layer) is not nn.Linear:
                    return f"{name} is a {type(module.base_layer).__name__}, not a plain Linear"
                if module.base_layer.weight.dtype != dtype:
                    return f"{name} weights are {module.base_layer.weight.dtype}, the engine runs {dtype}"
    return None


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: measured ~160 MB of RSS on
    the embedded base after fusing); a no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class _Fused:
    """One GEMM over several projections sharing their input: weight [sum(out), in] (or its
    oneDNN-prepacked form), bias or None, and each projection's column span."""

    weight: torch.Tensor
    packed: torch.Tensor | None
    bias: torch.Tensor | None
    spans: tuple[tuple[int, int], ...]
    out_features: int
    int4: Int4Weight | None = None  # the weight's exact int4 form, for steps of at most int4_rows rows
    int4_rows: int = 0
    shrink: FoldedShrink | None = None  # the members' LoRA A rows folded into this GEMM (see lora.py)

    @classmethod
    def of(cls, modules: list[MultiLoraLinear]) -> "_Fused":
        if len(modules) == 1:
            weight = modules[0].base_layer.weight.detach()
        else:
            weight = torch.cat([m.base_layer.weight.detach() for m in modules], dim=0)  # [sum(out), in]
            start = 0
            for m in modules:  # the modules keep views into the fused weight: no second copy
                m.base_layer.weight = nn.Parameter(weight[start : start + m.out_features], requires_grad=False)
                start += m.out_features
        biases = [m.base_layer.bias for m in modules]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, modules)])
        spans, start = [], 0
        for m in modules:
            spans.append((start, start + m.out_features))
            start += m.out_features
        fused = cls(weight=weight, packed=pack_weight(weight), bias=bias, spans=tuple(spans), out_features=start)
        if fused.packed is not None:  # bf16 on CPU: the shrink can ride on the prepacked GEMM
            fused.shrink = FoldedShrink(weight, bias, modules, fused.spans)
        return fused

    def refresh_lora(self) -> None:
        """Re-fold the members' A rows after an adapter change (slot table lock held). While a
        fold exists its prepacked weight holds the base rows, so the plain one is dropped (one
        copy of the base weights); it is packed again when the fold goes."""
        if self.shrink is None:
            return
        if self.shrink.refresh():
            self.packed = None
        elif self.packed is None:
            self.packed = pack_weight(self.weight)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, Fold | None]:
        """``(y, fold)``: y [N, out] or, when ``fold`` is not None, [N, out + R] with the folded
        LoRA products in the last R columns."""
        if self.int4 is not None and x.shape[0] <= self.int4_rows:
            return self.int4(x, self.bias), None
        if PACKED_LINEARS["enabled"]:
            fold = self.shrink.fold if self.shrink is not None else None  # the last build: its base columns are always right
            if fold is not None:
                return packed_linear(x, fold.packed, fold.bias, fold.width + sum(fold.rows)), fold
            if self.packed is not None:
                return packed_linear(x, self.packed, self.bias, self.out_features), None
        return F.linear(x, self.weight, self.bias), None

    def add_lora(self, lora: "LoraGroup | MultiLoraLinear", x: torch.Tensor, out: torch.Tensor, fold: Fold | None) -> torch.Tensor:
        """The base output ``out`` [N, out(+R)] plus every member's LoRA, in place; returns the
        [N, out] view. Through the fold's extra columns when the fold is current and covers the
        step (mixed steps of any size, one-adapter steps past the small-step size), else through
        ``lora`` (which reads its rows itself)."""
        y = out[:, : self.out_features] if fold is not None else out
        ctx = lora.context
        # a lone adapter in a small step keeps its fp32 path (measured 7% faster at 16 rows); a
        # mixed step of any size takes the fold (10% faster at 10 rows, 16% at 16; the fp32
        # mixed path converts every block's rows on every call)
        if fold is not None and (x.shape[0] > lora_math.SMALL_M_FP32 or not ctx.single) and self.shrink.add_lora(fold, out[:, self.out_features :], y, ctx):
            return y
        if isinstance(lora, LoraGroup):
            lora.add_lora(x, y, self.spans)
        else:
            lora.add_lora(x, y)
        return y


@dataclass
class _Layer:
    in_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv: _Fused
    qkv_lora: LoraGroup
    o_proj: _Fused
    o_lora: MultiLoraLinear
    gate_up: _Fused
    gate_up_lora: LoraGroup
    down_proj: _Fused
    down_lora: MultiLoraLinear

    @property
    def fused(self) -> tuple[_Fused, ...]:
        return (self.qkv, self.o_proj, self.gate_up, self.down_proj)


class LlamaStepForward:
    """``forward(ids [N], positions [N], plan, keep [K]) -> logits [K, vocab]`` for a wrapped
    Llama-family model (see the module docstring)."""

    def __init__(self, model, *, max_len: int, dtype: torch.dtype, device, int4_rows: int = 0, compile_decode: bool = False, decode_row: str = "kernel", lora_expand: str = "kernel") -> None:
        reason = why_not_supported(model, dtype)
        if reason is not None:
            raise ValueError(f"the lean Llama forward cannot run this model: {reason}")
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.inter = config.intermediate_size
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.scale = self.head_dim**-0.5
        self.dtype = dtype
        self.embed = inner.embed_tokens
        self.norm = inner.norm.weight.detach()
        self.lm_head = model.get_output_embeddings()
        layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = tuple(getattr(attn, n) for n in _QKV)
            gate_up = tuple(getattr(mlp, n) for n in _GATE_UP)
            layers.append(
                _Layer(
                    in_norm=layer.input_layernorm.weight.detach(),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    qkv=_Fused.of(list(qkv)),
                    qkv_lora=LoraGroup(qkv),
                    o_proj=_Fused.of([attn.o_proj]),
                    o_lora=attn.o_proj,
                    gate_up=_Fused.of(list(gate_up)),
                    gate_up_lora=LoraGroup(gate_up),
                    down_proj=_Fused.of([mlp.down_proj]),
                    down_lora=mlp.down_proj,
                )
            )
            for m in qkv + gate_up + (attn.o_proj, mlp.down_proj):  # their base GEMM runs here now: drop the module's prepacked copy
                m.drop_packed()
        self.layers = layers
        self._refresh_state = threading.Condition()
        self._refresh_wanted = False
        self._refresher: threading.Thread | None = None
        self.int4_rows = 0
        if decode_row not in ("kernel", "torch"):
            raise ValueError(f"decode_row must be 'kernel' or 'torch', got {decode_row!r}")
        self.row_step: row_kernel.RowStep | None = None
        self.int4_reason, self.row_reason = self._use_int4(int4_rows, dtype, torch.device(device), decode_row == "kernel")
        self.one_row: OneRowStep | None = None
        self._one_row_inputs: tuple | None = None  # (key, per-layer inputs, signature), see _one_row_step
        self.compile_reason = self._use_compiled_decode(compile_decode)
        if lora_expand not in ("kernel", "gemm"):
            raise ValueError(f"lora_expand must be 'kernel' or 'gemm', got {lora_expand!r}")
        shrinks = [fused.shrink for layer in layers for fused in layer.fused if fused.shrink is not None]
        for shrink in shrinks:
            shrink.kernel_wanted = lora_expand == "kernel"
        if not shrinks:
            self.expand_reason = "not used (no folded shrink: fp32, or no oneDNN bf16 prepacking)"
        elif lora_expand == "gemm":
            self.expand_reason = "masked GEMM (--lora-expand gemm)"
        elif expand_kernel.available():
            self.expand_reason = f"C kernel (steps up to {expand_kernel.MAX_TOKENS} tokens)"
        else:
            self.expand_reason = f"masked GEMM ({expand_kernel.why_not()})"
        # residual + RMSNorm, SiLU * up and rotary as one C call each (bf16 on CPU; pointwise_kernel)
        self.pointwise = dtype == torch.bfloat16 and torch.device(device).type == "cpu" and pointwise_kernel.available()
        self.pointwise_reason = "C kernels" if self.pointwise else ("torch ops (the kernels run bf16 on CPU)" if dtype != torch.bfloat16 or torch.device(device).type != "cpu" else f"torch ops ({pointwise_kernel.why_not()})")
        _return_freed_memory()  # the replaced per-projection weights and the int4 check's temporaries
        # rotary cos/sin of every position, from the model's own rotary module: [max_len, d]
        positions = torch.arange(max_len, device=device)[None]
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)

    def refresh_lora(self, lock=None) -> None:
        """Re-fold the LoRA A rows of every projection whose members changed into its base GEMM
        (lora.FoldedShrink), now. Either the caller holds the slot table's lock, or ``lock`` is
        that lock and is taken per projection (an install or unload waits a few ms at most)."""
        for layer in self.layers:
            for fused in layer.fused:
                with lock if lock is not None else contextlib.nullcontext():
                    fused.refresh_lora()
        _return_freed_memory()  # the replaced prepacked weights

    def schedule_refresh(self, lock) -> None:
        """After the adapters changed (the slot table's hook): refold on a background thread
        holding ``lock`` (the slot table's), so neither the engine thread nor the installing
        thread waits ~250 ms (the lock is taken per projection, so a change waits a few ms at
        most); changes arriving meanwhile are folded by the same thread. Until it is done, steps
        add LoRA by the plain path (see FoldedShrink). Also drops the compiled one-row step's
        cached inputs, which hold the adapter's fp32 rows (rebuilt on the next one-row step)."""
        self._one_row_inputs = None
        with self._refresh_state:
            self._refresh_wanted = True
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_loop, args=(lock,), name="loraplex-lora-fold", daemon=True)
                self._refresher.start()

    def _refresh_loop(self, lock) -> None:
        cpu_threads.helper_thread()  # no second OpenMP team beside the engine's (cpu_threads.py)
        while True:
            with self._refresh_state:
                if not self._refresh_wanted:
                    self._refresher = None
                    self._refresh_state.notify_all()
                    return
                self._refresh_wanted = False
            try:
                self.refresh_lora(lock)
            except Exception:  # e.g. out of memory while repacking: the plain LoRA path keeps serving
                log.exception("folding the LoRA A rows into the base GEMMs failed; LoRA runs unfolded")

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until no refold is pending (tests, benchmarks); True when settled."""
        with self._refresh_state:
            return self._refresh_state.wait_for(lambda: self._refresher is None, timeout)

    def _use_int4(self, rows: int, dtype: torch.dtype, device: torch.device, row_wanted: bool) -> tuple[str, str]:
        """Pack every projection as int4 when the base's weights are exactly int4 (all or none),
        and, where asked and possible, the one-row C step over the same levels (row_kernel.py).
        Returns both reasons, in words."""
        if rows <= 0:
            return "off (int4_decode_rows 0)", "per op (it runs on the int4 decode GEMMs, which are off)"
        if dtype != torch.bfloat16 or device.type != "cpu":
            return f"off ({dtype} on {device.type}: the int4 kernel runs bf16 on CPU)", "per op (the int4 decode GEMMs are off)"
        row_reason = self._row_kernel_reason(row_wanted)
        forms, packed = [], []
        for layer in self.layers:
            rows_of_layer = []
            for fused in layer.fused:
                levels = int4_levels(fused.weight)
                form = exact_int4(fused.weight, levels) if levels is not None else None
                if form is None:
                    return "off (the base's weights are not int4-shaped: Q4_1 groups of 32)", "per op (the int4 decode GEMMs are off)"
                forms.append((fused, form))
                if row_reason is None:
                    rows_of_layer.append(row_kernel.Int4Rows.pack(*levels))
            packed.append(rows_of_layer)
        for fused, form in forms:
            fused.int4, fused.int4_rows = form, rows
        self.int4_rows = rows
        if row_reason is None:
            spans = self.layers[0].gate_up.spans
            row_layers = [row_kernel.RowLayer(layer.in_norm.contiguous(), layer.post_norm.contiguous(), tuple(rows_of_layer), tuple(f.bias for f in layer.fused))
                          for layer, rows_of_layer in zip(self.layers, packed)]
            self.row_step = row_kernel.RowStep(row_layers, hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                                               inter=self.inter, gate_lo=spans[0][0], up_lo=spans[1][0], eps=self.eps, scale=self.scale)
            row_reason = "C kernel (every layer in one call)"
        return f"on for steps of at most {rows} rows", row_reason

    def _row_kernel_reason(self, wanted: bool) -> str | None:
        """None when the one-row C step can run this model; else what runs instead, and why."""
        if not wanted:
            return "per op (--decode-row torch)"
        spans = self.layers[0].gate_up.spans
        if not row_kernel.shape_fits(self.hidden, self.heads, self.kv_heads, self.head_dim, self.inter) or spans[0][1] - spans[0][0] != self.inter:
            return "per op (the C step does not take this model's sizes)"
        if not row_kernel.available():
            return f"per op ({row_kernel.why_not()})"
        return None

    def _use_compiled_decode(self, wanted: bool) -> str:
        """The compiled one-row decode step (compiled_decode.py) where asked and possible."""
        if not wanted:
            return "off"
        if self.row_step is not None:
            return "off (the C one-row step runs those steps; --decode-row torch to compile instead)"
        if not self.int4_rows:
            return "off (it runs on the int4 decode GEMMs, which are off)"
        reason = why_not_available()
        if reason is not None:
            return f"off ({reason})"
        spans = self.layers[0].gate_up.spans
        self.one_row = OneRowStep(hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim, eps=self.eps, scale=self.scale, gate_up_spans=spans)
        return "on for steps of one decoding row (compiled in the background on first use)"

    def _adapter_rows(self, layer: _Layer, ctx) -> tuple:
        """Per projection group of ``layer``: the fp32 rows ``(A, B)`` of this step's one adapter
        (the eager small-step path's copies), or ``(None, None)``."""
        if not ctx.used:
            return ((None, None),) * 4
        found = (
            layer.qkv_lora.single_rows_f32(ctx, layer.qkv.spans),
            layer.o_lora.single_rows_f32(ctx),
            layer.gate_up_lora.single_rows_f32(ctx, layer.gate_up.spans),
            layer.down_lora.single_rows_f32(ctx),
        )
        return tuple(rows if rows is not None else (None, None) for rows in found)

    def one_row_layer_inputs(self, ctx) -> list[tuple]:
        """Per layer, the 22 inputs of ``OneRowStep.run`` after the activations (its docstring
        gives the order): norms, int4 weights, biases and this step's one adapter's fp32 rows
        (``ctx`` without adapters in use: none)."""
        layers = []
        for layer in self.layers:
            (qa, qb), (oa, ob), (ga, gb), (da, db) = self._adapter_rows(layer, ctx)
            qkv, o, gate_up, down = layer.fused
            layers.append((layer.in_norm, qkv.int4.packed, qkv.int4.scales_zeros, qkv.bias, qa, qb,
                           o.int4.packed, o.int4.scales_zeros, o.bias, oa, ob, layer.post_norm,
                           gate_up.int4.packed, gate_up.int4.scales_zeros, gate_up.bias, ga, gb,
                           down.int4.packed, down.int4.scales_zeros, down.bias, da, db))
        return layers

    def _one_row_step(self, ids: torch.Tensor, positions: torch.Tensor, plan, keep: torch.Tensor) -> torch.Tensor | None:
        """One decoding row through the compiled step; None where it does not apply or is not
        compiled yet (the caller steps eagerly)."""
        step = self.one_row
        ctx = self.layers[0].o_lora.context
        if (ctx.used and not ctx.single) or lora_math.SMALL_M_FP32 < 1 or not lora_math.GROUPED_LORA["enabled"]:
            return None  # mixes, or the A/B switches away from the small-step path it copies
        if any(f.int4 is None or f.int4_rows < 1 for layer in self.layers for f in layer.fused):
            return None
        cache = plan.cache
        keys, values = cache.keys, cache.values
        cache_key = (ctx.used, ctx.version, keys[0].is_inference())
        cached = self._one_row_inputs
        if cached is not None and cached[0] == cache_key:
            layers, signature = cached[1], cached[2]
        else:  # rebuilt when the adapters change (ctx.version bumps)
            layers = self.one_row_layer_inputs(ctx)
            signature = (step.signature(layers), keys[0].is_inference())
            self._one_row_inputs = (cache_key, layers, signature)
        fn = step.compiled(signature)
        if fn is None:
            step.request(signature, layers, self.dtype, keys[0])
            return None
        h = self.embed(ids)  # [1, H]
        cos = self.cos.index_select(0, positions)[:, None]  # [1, 1, d]
        sin = self.sin.index_select(0, positions)[:, None]
        with step.engine_calls() as ok:
            if not ok:
                return None
            try:
                h = fn(h, cos, sin, plan.token_slots, positions, keys, values, layers)
            except Exception:  # an input unlike the warm-up's (the stance refuses to recompile here)
                log.warning("the compiled one-row decode step refused its inputs; this signature runs eagerly", exc_info=True)
                step.mark_broken(signature)
                return None  # the eager step rewrites the same K/V positions
        h = h.index_select(0, keep)  # [K, H]
        return self.lm_head(self._rms(h, self.norm))  # [K, vocab]

    def _kernel_row_step(self, ids: torch.Tensor, positions: torch.Tensor, plan, keep: torch.Tensor) -> torch.Tensor | None:
        """One decoding row through the C step (row_kernel.py); None where it does not apply
        (the caller steps per op)."""
        ctx = self.layers[0].o_lora.context
        if (ctx.used and not ctx.single) or lora_math.SMALL_M_FP32 < 1 or not lora_math.GROUPED_LORA["enabled"]:
            return None  # mixes, or the A/B switches away from the small-step path whose rows it reads
        if self.layers[0].qkv.int4_rows < 1:  # set for every projection at once (_use_int4, the A/B tool's int4 switch)
            return None
        step = self.row_step
        key = (ctx.used, ctx.version)
        pos, slot = int(positions[0]), int(plan.token_slots[0])
        h = self.embed(ids).contiguous()  # [1, H], a new tensor: the step writes it
        cache = plan.cache
        try:
            if key != step.adapter_key:  # the adapter's fp32 rows, rebuilt when the adapters change
                step.set_adapter(key, [self._adapter_rows(layer, ctx) for layer in self.layers])
            step.step(h, self.cos[pos], self.sin[pos], cache.keys, cache.values, slot, pos)
        except ValueError:  # inputs it does not take (checked before anything is written): per op from now on
            log.warning("the one-row C step refused its inputs; single streams step per op from now on", exc_info=True)
            self.row_step = None
            self.row_reason = "per op (the C step refused a step's inputs: see the log)"
            return None
        h = h.index_select(0, keep)  # [K, H]
        return self.lm_head(self._rms(h, self.norm))  # [K, vocab]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm: normalize in fp32, cast back, then scale at the model's dtype
        return weight * F.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, h, d]; cos/sin [N, 1, d]: x*cos + rotate_half(x)*sin
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, plan, keep: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        if n == 1 and plan.num_decode == 1 and not plan.chunks:  # a stream decoding alone
            if self.row_step is not None and row_kernel.ROW_KERNEL["enabled"]:
                logits = self._kernel_row_step(ids, positions, plan, keep)
                if logits is not None:
                    return logits
            if self.one_row is not None:
                logits = self._one_row_step(ids, positions, plan, keep)
                if logits is not None:
                    return logits
        h = self.embed(ids)  # [N, H]
        cos = self.cos.index_select(0, positions)[:, None]  # [N, 1, d]
        sin = self.sin.index_select(0, positions)[:, None]
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        cache = plan.cache
        fast = self.pointwise and pointwise_kernel.POINTWISE_KERNEL["enabled"]
        down: torch.Tensor | None = None  # the previous layer's MLP output, not yet added to h
        for index, layer in enumerate(self.layers):
            if fast:  # h += down in place, then the norm: one call
                x = pointwise_kernel.add_rms(h, down, layer.in_norm, self.eps)  # [N, H]
            else:
                h = h if down is None else h + down
                x = self._rms(h, layer.in_norm)  # [N, H]
            qkv = layer.qkv.add_lora(layer.qkv_lora, x, *layer.qkv(x))  # [N, q_out + 2 kv_out]
            qk_in = qkv[:, : q_out + kv_out].view(n, self.heads + self.kv_heads, self.head_dim)  # q and k heads together
            qk = pointwise_kernel.rope(qk_in, cos, sin) if fast else self._rotate(qk_in, cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = qkv[:, q_out + kv_out :].view(n, self.kv_heads, self.head_dim)
            attn = cache.attend_flat(index, plan, q, k, v, self.scale)  # [N, heads, d]
            attn = attn.reshape(n, q_out)
            o = layer.o_proj.add_lora(layer.o_lora, attn, *layer.o_proj(attn))  # [N, H]
            if fast:
                x = pointwise_kernel.add_rms(h, o, layer.post_norm, self.eps)
            else:
                h = h + o
                x = self._rms(h, layer.post_norm)
            gate_up = layer.gate_up.add_lora(layer.gate_up_lora, x, *layer.gate_up(x))  # [N, 2 I]
            (g_lo, g_hi), (u_lo, u_hi) = layer.gate_up.spans
            if fast:
                act = pointwise_kernel.silu_mul(gate_up[:, g_lo:g_hi], gate_up[:, u_lo:u_hi])  # [N, I]
            else:
                act = F.silu(gate_up[:, g_lo:g_hi]) * gate_up[:, u_lo:u_hi]  # [N, I]
            down = layer.down_proj.add_lora(layer.down_lora, act, *layer.down_proj(act))  # [N, H]
        if down is not None:
            h = h + down
        h = h.index_select(0, keep)  # [K, H]
        return self.lm_head(self._rms(h, self.norm))  # [K, vocab]
