"""One autograd node per LoRA branch while training on CPU: ``result + s * B(A(dropout(x)))``.

Why it exists: peft's ``lora.Linear.forward`` runs the branch as separate torch ops, each a full
pass over a [tokens, features] tensor: the dropout's random fill, divide and multiply, the cast of
the input to the LoRA weights' dtype, ``lora_B``'s output, its multiply by ``scaling``, the add
onto the base output (in fp32 when the base is bf16, then a cast back), and as many again
backwards. On the embedded base that is 210 branches a step, and on a bf16 base these passes
cost more than its AMX matmuls (docs/training.md, "Where a step's time went").

The node does the branch in the base output's dtype (the compute dtype), over the fp32 master
weights, in four passes forward and three backward:

    d   = keep(seed) * x / (1 - p)            [N, in]   lora_dropout's C kernel (or x when p = 0)
    h   = d @ A^T                              [N, r]
    out = result + h @ (s B)^T                 [N, out]  one addmm onto the base output
  backward, from g = dL/dout:
    dB  = s g^T h,  dh = g (s B),  dA = dh^T d,  dx = keep(seed) * (dh @ A) / (1 - p)

On a bf16 base the products take bf16 copies of A and s B and accumulate in fp32 (what autocast
does to these matmuls); the weights, their gradients and the optimizer stay fp32. On an fp32
base every step is fp32, as in peft. The mask is not stored: the backward recomputes it from the
seed. Where the C kernel is unavailable a ``bernoulli_`` mask is drawn and kept instead.

``install`` swaps the class of each plain ``lora.Linear`` on CPU for ``FusedLoraLinear`` (same
parameters, same state dict, so saving and peft's other methods are untouched); its forward
takes the node when exactly one adapter is active, unmerged, without a variant (DoRA), a LoRA
bias, per-row adapter names, dropout 1 or an autocast dtype other than bf16, and peft's own
forward otherwise. CUDA and quantized layers keep peft's. The backward is once-differentiable
(a second derivative raises). A NaN or inf input that the mask drops gives 0 in the branch
(torch's dropout gives NaN there); the base output still carries it.

Owns the branch's forward/backward and the layer swap. Knows nothing of data, the Trainer or
publishing; the mask kernel is ``lora_dropout``'s.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.tuners.lora.layer import Linear as LoraLinear
from torch.autograd.function import once_differentiable

from loraplex.training import lora_dropout


class _Mask:
    """The dropout of one call: the C kernel's seed, or a torch mask where it is unavailable."""

    def __init__(self, p: float, seed: int | None = None, keep: torch.Tensor | None = None) -> None:
        self.p, self.seed, self.keep = p, seed, keep

    @classmethod
    def draw(cls, p: float, like: torch.Tensor) -> "_Mask":
        if p == 0:
            return cls(0.0)
        if lora_dropout.available():
            return cls(p, seed=lora_dropout.draw_seed())
        return cls(p, keep=torch.empty(like.shape, dtype=like.dtype).bernoulli_(1.0 - p))

    def apply(self, t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.p == 0:
            return t.to(out_dtype)
        if self.seed is not None:
            return lora_dropout.apply_mask(t, self.p, self.seed, out_dtype)
        return (t * self.keep / (1.0 - self.p)).to(out_dtype)


class LoraBranch(torch.autograd.Function):
    """``result + s * (dropout_p(x) @ A^T) @ B^T`` on 2-D tensors, in result's dtype (0 <= p < 1)."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:  # type: ignore[override]
        # result [N, out] base output; x [N, in] the layer's input; lora_a [r, in], lora_b [out, r] fp32
        dtype = result.dtype
        mask = _Mask.draw(p, x)
        d = mask.apply(x, dtype)                     # [N, in]
        a = lora_a.to(dtype)                         # [r, in]
        sb = (lora_b * scaling).to(dtype)            # [out, r]
        h = d @ a.t()                                # [N, r]
        out = torch.addmm(result, h, sb.t())         # [N, out]
        kept = () if mask.keep is None else (mask.keep,)  # the torch fallback's mask, saved as autograd saves
        ctx.save_for_backward(d, h, a, sb, *kept)
        ctx.p, ctx.seed, ctx.scaling, ctx.x_dtype = mask.p, mask.seed, scaling, x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        d, h, a, sb, *kept = ctx.saved_tensors
        mask = _Mask(ctx.p, seed=ctx.seed, keep=kept[0] if kept else None)
        g = g.contiguous()                           # [N, out]
        grad_h = g @ sb                              # [N, r]
        grad_b = (g.t() @ h).float() * ctx.scaling if ctx.needs_input_grad[3] else None   # [out, r]
        grad_a = (grad_h.t() @ d).float() if ctx.needs_input_grad[2] else None             # [r, in]
        grad_x = mask.apply(grad_h @ a, ctx.x_dtype) if ctx.needs_input_grad[1] else None  # [N, in]
        return g, grad_x, grad_a, grad_b, None, None


class FusedLoraLinear(LoraLinear):
    """peft's ``lora.Linear`` whose forward runs the branch as one ``LoraBranch`` node where it can."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fused_adapter(x, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        for key in VARIANT_KWARG_KEYS:  # all None here (checked): peft drops them before the base layer too
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)  # [..., out]
        dropout = self.lora_dropout[name]
        p = dropout.p if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
        out = LoraBranch.apply(result.reshape(-1, result.shape[-1]), x.reshape(-1, x.shape[-1]),
                               self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]), float(p))
        return out.view(result.shape)

    def _fused_adapter(self, x: torch.Tensor, kwargs: dict) -> str | None:
        """The one adapter the node can run, or None for peft's forward."""
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return None
        if any(kwargs.get(key) is not None for key in VARIANT_KWARG_KEYS):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        dropout = self.lora_dropout[name]
        if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)) or getattr(dropout, "p", 0.0) >= 1.0:
            return None
        if self.lora_B[name].bias is not None or not isinstance(self.scaling[name], (int, float)):
            return None  # lora_bias=True, or a scaling the node does not take
        weight = self.lora_A[name].weight
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != torch.float32:
            return None
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None  # the node computes in fp32 or bf16 only
        return name


def install(model: torch.nn.Module) -> str:
    """Swap every plain CPU ``lora.Linear`` of ``model`` for ``FusedLoraLinear``; returns what runs,
    in words (recorded in the training report)."""
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    if not layers:
        return "peft's LoRA forward (no plain LoRA Linear layers)"
    if any(p.device.type != "cpu" for m in layers for p in m.parameters()):
        return "peft's LoRA forward (not on CPU)"
    for module in layers:
        module.__class__ = FusedLoraLinear
    mask = "Philox4x32-10 C kernel" if lora_dropout.available() else f"torch bernoulli_ ({lora_dropout.why_not()})"
    return f"fused LoRA branch on {len(layers)} layers, dropout mask: {mask}"
