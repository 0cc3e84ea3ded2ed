"""One autograd node per decoder layer while training LoRA on CPU (Llama-family layers).

Why it exists: with the LoRA branches fused (``lora_fused``), a training step on the embedded
base still ran over a hundred torch ops and autograd nodes per decoder layer: transformers'
RMSNorm (casts, square, mean, rsqrt, two multiplies), rotary (slices, negate, concatenate, four
multiplies and adds for q and k), eager attention (``repeat_kv`` copies, scale, mask add, fp32
softmax, cast), SiLU and the gate multiply, the residual adds, and a grad accumulation wherever
a tensor feeds several layers. Each costs a dispatch and a pass over memory whatever the dtype,
so they took as long in bf16 as in fp32 and held bf16's step at 1.7x fp32's while its matmuls run
3x faster (docs/training.md, "Where a step's time went").

Here the whole layer is one ``torch.autograd.Function`` with a hand-written backward over the
frozen base weights and the LoRA A/B weights (fp32 masters) of every projection that has one:

    h1  = rmsnorm(x) * w1                                       [N, C]
    qkv = h1 @ [Wq; Wk; Wv]^T + lora_q|k|v                      [N, (H + 2 KV) D]   one matmul
    q, k = rope(q), rope(k);  o = softmax(q k^T s + mask) v     GQA without repeat_kv copies
    x2  = x + o @ Wo^T + lora_o                                 [N, C]   the residual as addmm's input
    h2  = rmsnorm(x2) * w2
    gu  = h2 @ [Wg; Wu]^T + lora_g|u                            [N, 2 I]  one matmul
    y   = x2 + (silu(g) * u) @ Wd^T + lora_d                    [N, C]

A LoRA branch is ``+ (mask(in) @ A^T) @ (s B)^T`` with ``lora_dropout``'s mask drawn in the order
and from the generator that ``lora_fused`` draws it (q, k, v, o, gate, up, down), so for the same
seed the two paths drop the same elements. The branches of one input share one addmm through a
block-diagonal ``s B``. The frozen weights of q/k/v and of gate/up are copied once into one
matrix each, and the modules' weights become views of it (no second copy; state dicts unchanged).
Products run in the input's dtype (bf16 on a bf16 base; fp32 otherwise), the norm statistics and
softmax in fp32 as transformers does, and A/B gradients are returned in fp32. The passes between
the matmuls (the LoRA down-projections with their masks, RMSNorm, rotary, softmax, SiLU-gate,
forward and backward) are ``layer_kernels``' C kernels where they can be built, and the same
steps as torch ops otherwise.

``install`` swaps the class of each ``LlamaDecoderLayer`` whose layout it can run (no biases, SiLU,
``lora_fused``'s LoRA layer or none on each projection); its forward takes the node in training
mode on CPU without a cache, with frozen base weights and norms and ``lora_fused``'s conditions on
every LoRA, and the layer's own forward otherwise (eval, generation, gradient through the base,
peft's own LoRA layers). ``uninstall`` gives the layers their class back.

Owns the layer's forward/backward and the swap. Knows nothing of data, the Trainer or
publishing; the LoRA conditions are ``lora_fused``'s, the mask bits ``lora_dropout``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from loraplex.training import layer_kernels, lora_dropout
from loraplex.training.lora_fused import FusedLoraLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class _Lora:
    """One projection's LoRA for one call: fp32 master weights, scaling, dropout and its seed."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    p: float
    seed: int | None = None


class _Group:
    """Projections that read the same input (q/k/v, o, gate/up, down): one frozen matrix, the
    column range of each member, and the members' LoRA (None where a member has none)."""

    def __init__(self, weight: torch.Tensor, widths: list[int], loras: list[_Lora | None]) -> None:
        self.weight = weight                      # [sum(out), in], frozen
        self.cols = []                            # each member's output columns
        start = 0
        for w in widths:
            self.cols.append(slice(start, start + w))
            start += w
        self.loras = loras

    def draw(self) -> None:
        """Each LoRA's dropout seed, in member order (lora_fused's order)."""
        for lora in self.loras:
            if lora is not None and lora.p > 0:
                lora.seed = lora_dropout.draw_seed()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        # x [N, in] compute dtype; residual [N, out] or None -> (x W^T (+ residual) + LoRA [N, sum(out)], saved)
        dt = x.dtype
        w = self.weight if self.weight.dtype == dt else self.weight.to(dt)
        out = x @ w.t() if residual is None else torch.addmm(residual, x, w.t())
        live = [(i, l) for i, l in enumerate(self.loras) if l is not None]
        if not live:
            return out, ()
        ranks = [l.a.shape[0] for _, l in live]
        if layer_kernels.available() and layer_kernels.fits(x.shape[1], ranks):
            members = layer_kernels.Members([l.a for _, l in live], [l.seed for _, l in live], [l.p for _, l in live])
            hs, bits = layer_kernels.lora_down(x, members, dt)                  # [N, sum(r)], keep bits
            torch_side = bits
        else:  # the same steps as torch ops: masked copies of x kept for the backward
            members = None
            ds = [lora_dropout.apply_mask(x, l.p, l.seed, dt) if l.p > 0 else x for _, l in live]  # [N, in] each
            a_s = [l.a.to(dt) for _, l in live]                                  # [r, in] each
            hs = torch.cat([d @ a.t() for d, a in zip(ds, a_s)], dim=1)
            torch_side = (ds, a_s)
        if len(live) == len(self.loras):  # block-diagonal s B [sum(out), sum(r)]
            sb = torch.block_diag(*[l.b * l.scaling for _, l in live]).to(dt)
        else:
            sb = torch.zeros(out.shape[1], sum(ranks), dtype=dt)
            r0 = 0
            for (i, l), r in zip(live, ranks):
                sb[self.cols[i], r0:r0 + r] = (l.b * l.scaling).to(dt)
                r0 += r
        out.addmm_(hs, sb.t())
        return out, (x, members, torch_side, hs, sb)

    def backward(self, g: torch.Tensor, saved: tuple, need_x: bool) -> tuple[torch.Tensor | None, list]:
        # g [N, sum(out)] compute dtype -> (dx [N, in] or None, [(dA, dB) fp32 per live LoRA])
        dt = g.dtype
        w = self.weight if self.weight.dtype == dt else self.weight.to(dt)
        dx = g @ w if need_x else None                                           # [N, in]
        if not saved:
            return dx, []
        x, members, torch_side, hs, sb = saved
        live = [(i, l) for i, l in enumerate(self.loras) if l is not None]
        dh = g @ sb                                                              # [N, sum(r)]
        full = (hs.t() @ g).float()                                              # [sum(r), sum(out)]: one product
        d_bs, r0 = [], 0
        for i, l in live:
            r = l.a.shape[0]
            d_bs.append(full[r0:r0 + r, self.cols[i]].t().mul(l.scaling))           # [out, r], its diagonal block
            r0 += r
        if members is not None:
            dx_all, d_a_all = layer_kernels.lora_down_backward(x, members, dh, dx, torch_side)  # dx updated in place
            dx = dx_all if need_x else None
            d_as = list(torch.split(d_a_all, members.ranks, dim=0))
            return dx, list(zip(d_as, d_bs))
        ds, a_s = torch_side
        grads, r0 = [], 0
        for (i, l), d, a, d_b in zip(live, ds, a_s, d_bs):
            r = l.a.shape[0]
            dh_i = dh[:, r0:r0 + r]
            grads.append(((dh_i.t() @ d).float(), d_b))                         # dA [r, in]
            if need_x:
                if l.p > 0:
                    dx.add_(lora_dropout.apply_mask(dh_i @ a, l.p, l.seed, dt))
                else:
                    dx.addmm_(dh_i, a)
            r0 += r
        return dx, grads


@dataclass
class _Plan:
    """Everything one layer call needs besides tensors autograd tracks."""

    groups: tuple[_Group, _Group, _Group, _Group]  # qkv, o, gate/up, down
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps1: float
    eps2: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float


# ---------------------------------------------------------------- step functions (no autograd)

def _rms_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # x [N, C] -> h [N, C] in x's dtype, rstd [N, 1] fp32 (transformers' LlamaRMSNorm order of casts)
    if layer_kernels.available():
        return layer_kernels.rms_norm(x, w.to(x.dtype), eps)
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    h = (xf * rstd).to(x.dtype)
    return h.mul_(w if w.dtype == h.dtype else w.to(h.dtype)), rstd


def _rms_backward(dh: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor, add: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    # dh [N, C], x [N, C], rstd [N, 1], add [N, C] -> dx + add [N, C] of out_dtype (computed in fp32)
    if layer_kernels.available():
        return layer_kernels.rms_norm_backward(dh, x, w.to(x.dtype), rstd, add, out_dtype)
    g = (dh * (w if w.dtype == dh.dtype else w.to(dh.dtype))).float()
    xhat = x.float().mul_(rstd)
    dot = (g * xhat).mean(-1, keepdim=True)
    return g.sub_(xhat.mul_(dot)).mul_(rstd).add_(add).to(out_dtype)


def _silu_mul_backward(gu: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
    # gu [N, 2I] (gate | up), d_act [N, I] -> [N, 2I] (d gate | d up)
    if layer_kernels.available():
        return layer_kernels.silu_mul_backward(gu, d_act)
    inter = d_act.shape[1]
    gate, up = gu[:, :inter], gu[:, inter:]
    d_gu = torch.empty_like(gu)
    torch.mul(d_act, F.silu(gate), out=d_gu[:, inter:])
    d_gu[:, :inter] = torch.ops.aten.silu_backward(d_act * up, gate)
    return d_gu


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # t [B, n, T, D]; cos/sin [B|1, 1, T, D] -> t * cos + rotate_half(t) * sin, contiguous
    half = t.shape[-1] // 2
    out = (t * cos).contiguous()
    out[..., :half].addcmul_(t[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(t[..., :half], sin[..., half:])
    return out


def _rope_backward(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # the transpose of _rope: d t1 = g1 cos1 + g2 sin2, d t2 = g2 cos2 - g1 sin1
    half = g.shape[-1] // 2
    out = (g * cos).contiguous()
    out[..., :half].addcmul_(g[..., half:], sin[..., half:])
    out[..., half:].addcmul_(g[..., :half], sin[..., :half], value=-1.0)
    return out


def _additive_mask(mask: torch.Tensor | None, b: int, t: int, dtype: torch.dtype) -> torch.Tensor:
    """transformers' layer mask as an additive [B|1, 1, T, T] tensor of ``dtype``: eager's float
    mask as is, sdpa's boolean (True = attend) turned into 0 / dtype-min, None = causal."""
    if mask is None:
        keep = torch.ones(t, t, dtype=torch.bool).tril_()[None, None]
    elif mask.dtype == torch.bool:
        keep = mask
    else:
        return mask if mask.dtype == dtype else mask.to(dtype)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)


def _attention_forward(qkv: torch.Tensor, mask: torch.Tensor, dead: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, plan: "_Plan", b: int, t: int) -> tuple[torch.Tensor, tuple]:
    # qkv [B T, (H + 2 KV) D]; mask additive [B|1, 1, T, T]; cos/sin [B|1, T, D] -> (attn [B T, H D], saved)
    nh, kv, hd = plan.heads, plan.kv_heads, plan.head_dim
    grp = nh // kv
    kernels = layer_kernels.available() and t <= layer_kernels.MAX_SEQ
    if kernels:
        q, k, v = layer_kernels.rope_split(qkv, cos, sin, b, t, nh, kv, hd)   # [B, H, T, D], [B, KV, T, D] x 2
    else:
        heads = qkv.view(b, t, nh + 2 * kv, hd).transpose(1, 2)                # [B, H + 2 KV, T, D]
        q = _rope(heads[:, :nh], cos.unsqueeze(1), sin.unsqueeze(1))
        k = _rope(heads[:, nh:nh + kv], cos.unsqueeze(1), sin.unsqueeze(1))
        v = heads[:, nh + kv:].contiguous()
    q3 = q.view(b * kv, grp * t, hd)                                           # the G heads of one kv head stacked
    k3, v3 = k.view(b * kv, t, hd), v.view(b * kv, t, hd)
    scores = torch.bmm(q3, k3.transpose(1, 2)).view(b, kv, grp, t, t)          # [B, KV, G, T, T]
    if kernels:
        probs, p_c = layer_kernels.softmax_forward(scores, mask, plan.scale)   # fp32, and the compute dtype
    else:
        scores.mul_(plan.scale).add_(mask.unsqueeze(2))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)             # fp32, as eager
        p_c = probs.to(qkv.dtype)
    if dead is not None:  # rows with no key: zero attention (sdpa's answer), and zero gradient through them
        rows = dead.view(dead.shape[0], 1, 1, t, 1)
        probs.masked_fill_(rows, 0.0)
        if p_c is not probs:
            p_c.masked_fill_(rows, 0.0)
    p_c = p_c.view(b * kv, grp * t, t)
    attn = torch.bmm(p_c, v3)                                                  # [B KV, G T, D]
    attn = attn.view(b, nh, t, hd).transpose(1, 2).reshape(b * t, nh * hd)
    return attn, (q, k, v, probs, p_c, cos, sin, kernels)


def _attention_backward(d_attn: torch.Tensor, saved: tuple, plan: "_Plan", b: int, t: int) -> torch.Tensor:
    # d_attn [B T, H D] -> d_qkv [B T, (H + 2 KV) D]
    q, k, v, probs, p_c, cos, sin, kernels = saved
    nh, kv, hd = plan.heads, plan.kv_heads, plan.head_dim
    grp = nh // kv
    dt = d_attn.dtype
    d_o = d_attn.view(b, t, nh, hd).transpose(1, 2).reshape(b * kv, grp * t, hd)
    q3, k3, v3 = q.view(b * kv, grp * t, hd), k.view(b * kv, t, hd), v.view(b * kv, t, hd)
    d_v = torch.bmm(p_c.transpose(1, 2), d_o)                                  # [B KV, T, D]
    d_p = torch.bmm(d_o, v3.transpose(1, 2))                                   # [B KV, G T, T]
    if kernels:
        d_s3 = layer_kernels.softmax_backward(d_p, probs, plan.scale)
    else:
        d_pf = d_p.float().view(probs.shape)
        d_s3 = d_pf.sub_((d_pf * probs).sum(-1, keepdim=True)).mul_(probs).mul_(plan.scale).to(dt).view(b * kv, grp * t, t)
    d_q = torch.bmm(d_s3, k3).view(b, nh, t, hd)                               # [B, H, T, D]
    d_k = torch.bmm(d_s3.transpose(1, 2), q3).view(b, kv, t, hd)               # [B, KV, T, D]
    d_v = d_v.view(b, kv, t, hd)
    if kernels:
        return layer_kernels.rope_join_backward(d_q, d_k, d_v, cos, sin)
    cos4, sin4 = cos.unsqueeze(1), sin.unsqueeze(1)
    d_qkv = torch.empty(b, t, nh + 2 * kv, hd, dtype=dt)
    d_qkv[:, :, :nh] = _rope_backward(d_q, cos4, sin4).transpose(1, 2)
    d_qkv[:, :, nh:nh + kv] = _rope_backward(d_k, cos4, sin4).transpose(1, 2)
    d_qkv[:, :, nh + kv:] = d_v.transpose(1, 2)
    return d_qkv.view(b * t, -1)


class _Slot:
    """Where a saved tensor goes back into the saved structure."""


def _pack(obj: Any, tensors: list[torch.Tensor]) -> Any:
    # nested tuples/lists of tensors and other values -> the same shape with tensors as _Slot
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot
    if isinstance(obj, (tuple, list)):
        return type(obj)(_pack(o, tensors) for o in obj)
    return obj


def _unpack(layout: Any, tensors: Any) -> Any:
    if layout is _Slot:
        return next(tensors)
    if isinstance(layout, (tuple, list)):
        return type(layout)(_unpack(o, tensors) for o in layout)
    return layout


class LayerNode(torch.autograd.Function):
    """A Llama decoder layer, forward and backward, as one node (see the module docstring)."""

    @staticmethod
    def forward(ctx, plan: _Plan, x: torch.Tensor, mask: torch.Tensor, dead: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, *lora_weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # x [B, T, C] compute dtype; mask additive [B|1, 1, T, T]; dead [B|1, 1, T] bool: query rows
        # that attend to nothing (sdpa's masks give them zero output) or None; cos/sin [B|1, T, D]
        bsz, t, c = x.shape
        n = bsz * t
        qkv_g, o_g, gu_g, d_g = plan.groups
        for group in plan.groups:
            group.draw()
        xs = x.reshape(n, c).contiguous()
        h1, rstd1 = _rms_forward(xs, plan.ln1, plan.eps1)                          # [N, C]
        qkv, s_qkv = qkv_g.forward(h1, None)                                       # [N, (H + 2 KV) D]
        attn, s_attn = _attention_forward(qkv, mask, dead, cos, sin, plan, bsz, t)  # [N, H D]
        x2, s_o = o_g.forward(attn, xs)                                            # [N, C]
        h2, rstd2 = _rms_forward(x2, plan.ln2, plan.eps2)
        gu, s_gu = gu_g.forward(h2, None)                                          # [N, 2 I]
        inter = gu.shape[1] // 2
        act = layer_kernels.silu_mul(gu) if layer_kernels.available() else F.silu(gu[:, :inter]).mul_(gu[:, inter:])  # [N, I]
        y, s_d = d_g.forward(act, x2)                                              # [N, C]
        ctx.plan = plan
        # tensors through save_for_backward (so non-reentrant checkpointing can drop and recompute
        # them), the rest of the nested structure beside them
        tensors: list[torch.Tensor] = []
        ctx.layout = _pack((xs, rstd1, h1, s_qkv, s_attn, s_o, x2, rstd2, h2, s_gu, gu, act, s_d), tensors)
        ctx.save_for_backward(*tensors)
        return y.view(bsz, t, c)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        plan: _Plan = ctx.plan
        (xs, rstd1, h1, s_qkv, s_attn, s_o, x2, rstd2, h2, s_gu, gu, act, s_d) = _unpack(ctx.layout, iter(ctx.saved_tensors))
        qkv_g, o_g, gu_g, d_g = plan.groups
        bsz, t, c = dy.shape
        n, dt = bsz * t, xs.dtype
        dy = dy.reshape(n, c).to(dt)
        # MLP
        d_act, g_d = d_g.backward(dy, s_d, True)                                   # [N, I]
        d_gu = _silu_mul_backward(gu, d_act)                                       # [N, 2 I]
        d_h2, g_gu = gu_g.backward(d_gu, s_gu, True)                               # [N, C]
        dx2 = _rms_backward(d_h2, x2, rstd2, plan.ln2, dy, dt)                     # [N, C]
        # attention
        d_attn, g_o = o_g.backward(dx2, s_o, True)                               # [N, H D]
        d_qkv = _attention_backward(d_attn, s_attn, plan, bsz, t)                 # [N, (H + 2 KV) D]
        d_h1, g_qkv = qkv_g.backward(d_qkv.view(n, -1), s_qkv, ctx.needs_input_grad[1])
        dx = None
        if ctx.needs_input_grad[1]:
            dx = _rms_backward(d_h1, xs, rstd1, plan.ln1, dx2, dt).view(bsz, t, c)
        lora_grads: list[torch.Tensor | None] = []
        for grads in (g_qkv, g_o, g_gu, g_d):
            for d_a, d_b in grads:
                lora_grads += [d_a, d_b]
        return (None, dx, None, None, None, None, *lora_grads)


# ---------------------------------------------------------------- the layer swap

def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.base_layer if isinstance(module, FusedLoraLinear) else module


def _plain(module: torch.nn.Module) -> bool:
    """A projection the node can run: a bias-free nn.Linear, bare or under FusedLoraLinear."""
    base = _base(module)
    return type(base) is torch.nn.Linear and base.bias is None and (module is base or isinstance(module, FusedLoraLinear))


def _layout_ok(layer: torch.nn.Module) -> str | None:
    """None when the node can run this layer's layout, else why not."""
    attn, mlp, cfg = layer.self_attn, layer.mlp, layer.self_attn.config
    if getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
        return f"activation {getattr(cfg, 'hidden_act', None)!r} (the node does SiLU)"
    if getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    for name in PROJECTIONS:
        owner = attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp
        if not _plain(getattr(owner, name)):
            return f"{name} is not a bias-free Linear (or LoRA over one)"
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % kv or attn.head_dim % 2:
        return "head layout"
    return None


class FusedDecoderLayer(torch.nn.Module):
    """Mixin forward for a Llama decoder layer: the ``LayerNode`` where it can, the layer's own
    forward otherwise. ``install`` makes a subclass of the layer's class with it."""

    _fused_weights: dict[str, torch.Tensor]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = None if args else self._plan(hidden_states, kwargs)
        if plan is None:
            return super().forward(hidden_states, *args, **kwargs)
        cos, sin = kwargs["position_embeddings"]
        bsz, t, _ = hidden_states.shape
        dt = hidden_states.dtype
        given = kwargs.get("attention_mask")
        mask = _additive_mask(given, bsz, t, dt)
        dead = None
        if given is not None and given.dtype == torch.bool:
            dead = ~given.any(-1)  # [B|1, 1, T]
            dead = dead if bool(dead.any()) else None
        loras = [w for group in plan.groups for lora in group.loras if lora is not None for w in (lora.a, lora.b)]
        return LayerNode.apply(plan, hidden_states, mask, dead, cos.to(dt), sin.to(dt), *loras)

    def _plan(self, x: torch.Tensor, kwargs: dict) -> _Plan | None:
        """What one node call needs, or None where the layer's own forward must run."""
        if not self.training or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 3:
            return None
        if torch.is_autocast_enabled("cpu"):
            return None  # autocast over an fp32 base: the node computes in its input's dtype only
        if kwargs.get("cache", kwargs.get("past_key_values")) is not None or kwargs.get("position_embeddings") is None:
            return None
        mask = kwargs.get("attention_mask")
        t = x.shape[1]
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (t, t)):
            return None  # a flex BlockMask, a mask per head, or keys beyond this call's tokens
        attn, mlp = self.self_attn, self.mlp
        norms = (self.input_layernorm, self.post_attention_layernorm)
        if any(p.requires_grad for m in norms for p in m.parameters()):
            return None
        members = [getattr(attn, n) for n in PROJECTIONS[:4]] + [getattr(mlp, n) for n in PROJECTIONS[4:]]
        loras: list[_Lora | None] = []
        for module in members:
            base = _base(module)
            if base.weight.requires_grad:
                return None
            if module is base:
                loras.append(None)
                continue
            if not isinstance(module, FusedLoraLinear):
                return None  # peft's own LoRA layer (--lora_branch peft): its forward, not the node
            name = module._fused_adapter(x, {})
            if name is None:
                return None
            drop = module.lora_dropout[name]
            p = float(drop.p) if isinstance(drop, torch.nn.Dropout) else 0.0
            if p > 0 and not lora_dropout.available():
                return None  # the branch nodes draw a torch mask instead; the node's masks need the kernel's bits
            loras.append(_Lora(module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]), p))
        weights = [_base(m).weight for m in members]
        groups = (
            _Group(self._joined("qkv", weights[0:3]), [w.shape[0] for w in weights[0:3]], loras[0:3]),
            _Group(weights[3], [weights[3].shape[0]], loras[3:4]),
            _Group(self._joined("gate_up", weights[4:6]), [w.shape[0] for w in weights[4:6]], loras[4:6]),
            _Group(weights[6], [weights[6].shape[0]], loras[6:7]),
        )
        cfg = attn.config
        return _Plan(groups, self.input_layernorm.weight, self.post_attention_layernorm.weight,
                     float(self.input_layernorm.variance_epsilon), float(self.post_attention_layernorm.variance_epsilon),
                     cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, float(attn.scaling))

    def _joined(self, key: str, weights: list[torch.Tensor]) -> torch.Tensor:
        """One frozen [sum(out), in] matrix whose row blocks are ``weights``' storage: built once,
        the modules' weights then made views of it; rebuilt if a weight was replaced since."""
        joined = self._fused_weights.get(key)
        if joined is not None and joined.dtype == weights[0].dtype:
            row, ok = 0, True
            for w in weights:
                ok = ok and w.data_ptr() == joined[row].data_ptr() and w.shape[1] == joined.shape[1]
                row += w.shape[0]
            if ok:
                return joined.detach()
        with torch.no_grad():
            joined = torch.cat([w.detach() for w in weights], dim=0)
            row = 0
            for w in weights:
                w.data = joined[row:row + w.shape[0]]
                row += w.shape[0]
        self._fused_weights[key] = joined
        return joined


def install(model: torch.nn.Module) -> str:
    """Swap every Llama decoder layer of ``model`` whose layout the node runs for a fused one;
    returns what was done, in words (recorded in the training report)."""
    layers = [m for m in model.modules() if type(m) is LlamaDecoderLayer or isinstance(m, FusedDecoderLayer)]
    if any(p.device.type != "cpu" for layer in layers for p in layer.parameters()):
        return "each layer's own forward (not on CPU)"
    why = {}
    swapped = 0
    for layer in layers:
        reason = _layout_ok(layer)
        if reason:
            why[reason] = why.get(reason, 0) + 1
            continue
        if not isinstance(layer, FusedDecoderLayer):  # swapped already on an earlier adapter of a --config run
            layer.__class__ = FusedLlamaDecoderLayer
            layer._fused_weights = {}
        swapped += 1
    if not layers:
        return "each layer's own forward (no Llama decoder layers)"
    kernels = "C kernels" if layer_kernels.available() else f"torch ops ({layer_kernels.why_not()})"
    text = f"fused decoder layer on {swapped} of {len(layers)} layers ({kernels})"
    if why:
        text += " (others: " + "; ".join(f"{n} x {r}" for r, n in why.items()) + ")"
    return text


def uninstall(model: torch.nn.Module) -> int:
    """Give every fused layer of ``model`` its own class back (a later adapter of a ``--config``
    run that asks for another ``--lora_branch``); the joined weights stay, as views. Returns how
    many layers were restored."""
    restored = 0
    for layer in model.modules():
        if isinstance(layer, FusedDecoderLayer):
            layer.__class__ = next(c for c in type(layer).__mro__[1:] if not issubclass(c, FusedDecoderLayer))
            restored += 1
    return restored


class FusedLlamaDecoderLayer(FusedDecoderLayer, LlamaDecoderLayer):
    """transformers' Llama decoder layer with the node's forward (a module-level class, so that a
    model holding it pickles)."""
