"""The fused decoder layer (training/layer_fused.py) and its C kernels (training/layer_kernels.py).

Independent references: peft's own LoRA forward over transformers' Llama layer (autograd of the
library's ops; with dropout 0 it must give the same loss and gradients), and the per-branch node
(training/lora_fused.py, itself checked against peft) for runs with dropout, whose masks the layer
must draw identically. The kernels are checked against torch ops and torch autograd. (Also the
Trainer subclass's per-step flops estimate, which the fused layer made worth counting once.)
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.training import layer_fused, layer_kernels, lora_dropout, lora_fused

needs_kernels = pytest.mark.skipif(not layer_kernels.available(), reason=f"no C kernels here: {layer_kernels.why_not()}")
needs_mask = pytest.mark.skipif(not lora_dropout.available(), reason=f"no C mask kernel here: {lora_dropout.why_not()}")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(*, attn="eager", dtype=torch.float32, targets=ALL, dropout=0.0, rank=4, layer=True, branch=True, **cfg):
    """A 2-layer random Llama (GQA 4/2 heads; 88 intermediate features: not a multiple of 16) with
    LoRA whose B is non-zero, optionally with the branch and layer nodes installed."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True, **cfg)
    config._attn_implementation = attn
    base = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    if branch:
        lora_fused.install(model)
    if layer:
        layer_fused.install(model)
    model.train()
    return model


def _batch(packed=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 21), generator=g)
    if packed:  # three examples per row, positions restarting, no attention mask
        pos = torch.cat([torch.arange(7)] * 3).repeat(3, 1)
        return {"input_ids": ids, "position_ids": pos, "labels": ids.clone()}
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, 15:] = 0  # right padding
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model, batch, seed=123):
    torch.manual_seed(seed)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _close(got, want, tol):
    loss_g, grads_g = got
    loss_w, grads_w = want
    assert grads_g.keys() == grads_w.keys() and len(grads_w) > 0
    assert abs(float(loss_g - loss_w)) <= tol * abs(float(loss_w)), (float(loss_g), float(loss_w))
    worst = max((_rel(grads_g[n], grads_w[n]), n) for n in grads_w)
    assert worst[0] <= tol, worst


def _uses_node(model, batch, monkeypatch) -> int:
    calls = []
    real = layer_fused.LayerNode.apply
    monkeypatch.setattr(layer_fused.LayerNode, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model(**batch, use_cache=False).loss.backward()
    monkeypatch.setattr(layer_fused.LayerNode, "apply", real)
    return len(calls)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_layer_node_gives_peft_loss_and_gradients_without_dropout(attn, monkeypatch):
    got = _model(attn=attn)
    assert _uses_node(got, _batch(), monkeypatch) == 2
    got.zero_grad()
    _close(_grads(got, _batch()), _grads(_model(attn=attn, layer=False, branch=False), _batch()), 2e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_are_masked_per_example_as_transformers_masks_them(attn):
    _close(_grads(_model(attn=attn), _batch(packed=True)), _grads(_model(attn=attn, layer=False, branch=False), _batch(packed=True)), 2e-5)


def test_lora_on_some_projections_and_another_rank():
    targets = ["q_proj", "v_proj", "down_proj"]
    _close(_grads(_model(targets=targets, rank=6), _batch()), _grads(_model(targets=targets, rank=6, layer=False, branch=False), _batch()), 2e-5)


@needs_mask
def test_with_dropout_the_layer_drops_what_the_branch_nodes_drop():
    """Same seed, same generator order (q, k, v, o, gate, up, down): the same masks, so the same
    loss and gradients as the per-branch node."""
    _close(_grads(_model(dropout=0.3), _batch()), _grads(_model(dropout=0.3, layer=False), _batch()), 2e-5)


@needs_mask
def test_the_torch_steps_match_the_kernels(monkeypatch):
    want = _grads(_model(dropout=0.3), _batch())
    monkeypatch.setattr(layer_kernels, "available", lambda: False)
    _close(_grads(_model(dropout=0.3), _batch()), want, 2e-5)


def test_without_the_mask_kernel_a_dropout_run_takes_the_layers_own_forward(monkeypatch):
    monkeypatch.setattr(lora_dropout, "available", lambda: False)
    model = _model(dropout=0.3)
    assert _uses_node(model, _batch(), monkeypatch) == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_bf16_gradients_are_as_close_to_fp32_as_the_branch_nodes_are():
    """No bf16 reference is exact, so both bf16 paths are measured against the fp32 gradients of
    the same weights: the layer's error must not exceed the per-branch path's by more than half."""
    ref = _grads(_model(layer=False, branch=False), _batch())
    layer = _grads(_model(dtype=torch.bfloat16), _batch())
    branch = _grads(_model(dtype=torch.bfloat16, layer=False), _batch())
    err_layer = max(_rel(layer[1][n], ref[1][n]) for n in ref[1])
    err_branch = max(_rel(branch[1][n], ref[1][n]) for n in ref[1])
    assert err_layer <= 1.5 * err_branch + 1e-3, (err_layer, err_branch)
    assert abs(float(layer[0] - ref[0])) <= 0.02 * float(ref[0])


@needs_mask
def test_gradient_checkpointing_recomputes_the_same_masks(monkeypatch):
    """Non-reentrant checkpointing (train-adapter's) drops what the node saved and runs the layer
    again in the backward: the node must run twice per layer and give the same gradients."""
    want = _grads(_model(dropout=0.3), _batch())
    model = _model(dropout=0.3)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert _uses_node(model, _batch(), monkeypatch) == 4  # 2 layers, each recomputed once
    model.zero_grad()
    _close(_grads(model, _batch()), want, 2e-5)


def test_under_autocast_the_layers_take_their_own_forward(monkeypatch):
    """--bf16 true over an fp32 base (int4-aware, PiSSA) trains under CPU autocast: the node
    computes in its input's dtype only, so the per-branch node runs there instead."""
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _uses_node(model, _batch(), monkeypatch) == 0
        model.zero_grad()
        got = _grads(model, _batch())
        want = _grads(_model(layer=False), _batch())
    _close(got, want, 1e-6)


def test_sdpa_left_padding_gives_rows_without_keys_zero_attention_as_sdpa_does():
    batch = _batch()
    mask = batch["attention_mask"].flip(1)  # left padding: the first rows of rows 1 and 2 see no key
    batch = {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": batch["input_ids"].masked_fill(mask == 0, -100)}
    _close(_grads(_model(attn="sdpa"), batch), _grads(_model(attn="sdpa", layer=False, branch=False), batch), 2e-5)


def test_a_strided_input_is_read_as_its_values():
    model, ref = _model(), _model(layer=False, branch=False)
    ids = _batch()["input_ids"]

    def run(m):
        wide = torch.cat([m.get_input_embeddings()(ids), torch.zeros(3, 21, 5)], -1)  # [B, T, C + 5]
        torch.manual_seed(123)
        out = m(inputs_embeds=wide[..., :64], labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    _close(run(model), run(ref), 2e-5)


def test_eval_and_a_kv_cache_take_the_layers_own_forward(monkeypatch):
    model = _model()
    ref = _model(layer=False)
    calls = []
    monkeypatch.setattr(layer_fused.LayerNode, "apply", lambda *a: calls.append(1))
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        model.eval(), ref.eval()
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
        model.train(), ref.train()
        assert torch.equal(model(**batch, use_cache=True).logits, ref(**batch, use_cache=True).logits)
    assert calls == []


def test_a_trainable_norm_takes_the_layers_own_forward(monkeypatch):
    model = _model()
    model.base_model.model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    assert _uses_node(model, _batch(), monkeypatch) == 1  # layer 1 still fused


def test_install_skips_layouts_it_cannot_run_and_says_why():
    model = _model(layer=False, attention_bias=True)
    text = layer_fused.install(model)
    assert text.startswith("fused decoder layer on 0 of 2 layers") and "q_proj is not a bias-free Linear" in text, text
    loss, grads = _grads(model, _batch())
    assert torch.isfinite(loss) and grads


def test_installing_again_counts_fused_layers_and_uninstall_gives_the_class_back(monkeypatch):
    """A --config run trains several adapters on one base: the second install finds the layers
    fused already; an adapter asking for another --lora_branch gets the layers' own forward."""
    model = _model()
    assert layer_fused.install(model).startswith("fused decoder layer on 2 of 2 layers")
    assert layer_fused.uninstall(model) == 2
    assert type(model.base_model.model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert _uses_node(model, _batch(), monkeypatch) == 0


def test_peft_own_lora_layers_take_the_layers_own_forward(monkeypatch):
    model = _model(branch=False)  # --lora_branch peft on layers an earlier adapter fused
    assert _uses_node(model, _batch(), monkeypatch) == 0
    model.zero_grad()
    _close(_grads(model, _batch()), _grads(_model(layer=False, branch=False), _batch()), 1e-6)


def test_joined_weights_are_views_and_merging_still_works():
    model = _model()
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "lora" not in k}
    _grads(model, _batch())
    layer = model.base_model.model.model.layers[0]
    joined = layer._fused_weights["qkv"]
    q, v = layer.self_attn.q_proj.base_layer.weight, layer.self_attn.v_proj.base_layer.weight
    assert q.data_ptr() == joined.data_ptr() and v.data_ptr() == joined[q.shape[0] + layer.self_attn.k_proj.base_layer.weight.shape[0]].data_ptr()
    after = {k: v for k, v in model.base_model.model.state_dict().items() if "lora" not in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    assert torch.allclose(merged, unmerged, atol=1e-4)


# ---------------------------------------------------------------- the kernels against torch

def _keep(x, p, seed):
    return lora_dropout.apply_mask(x, p, seed, torch.float32) if p > 0 else x.float()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,features,ranks,ps", [(37, 576, [8, 8, 8], [0.1, 0.1, 0.0]), (50, 100, [5, 16], [0.3, 0.05]), (3, 1536, [64], [0.5])])
def test_lora_down_and_its_backward_match_masked_matmuls(dtype, rows, features, ranks, ps):
    torch.manual_seed(0)
    x = torch.randn(rows, features).to(dtype)
    a = [torch.randn(r, features) * 0.1 for r in ranks]
    seeds = [lora_dropout.draw_seed() for _ in ranks]
    members = layer_kernels.Members(a, seeds, ps)
    h, bits = layer_kernels.lora_down(x, members, torch.float32)
    masked = [_keep(x, p, s) for p, s in zip(ps, seeds)]
    want_h = torch.cat([d @ ai.t() for d, ai in zip(masked, a)], 1)
    assert torch.allclose(h, want_h, rtol=1e-5, atol=1e-4)
    dh = torch.randn(rows, sum(ranks)).to(dtype)
    dx0 = torch.randn(rows, features).to(dtype)
    dx, da = layer_kernels.lora_down_backward(x, members, dh, dx0.clone(), bits)
    want_dx, want_da, c = dx0.float(), [], 0
    for d, ai, p, s in zip(masked, a, ps, seeds):
        g = dh[:, c:c + ai.shape[0]].float()
        c += ai.shape[0]
        want_dx = want_dx + _keep(g @ ai, p, s)
        want_da.append(g.t() @ d)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: dx is rounded once to bf16
    assert _rel(dx.float(), want_dx) <= tol
    assert _rel(da, torch.cat(want_da)) <= 1e-5
    again, da2 = layer_kernels.lora_down_backward(x, members, dh, dx0.clone(), None)  # bits generated again
    assert torch.equal(again, dx) and torch.equal(da2, da)


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_silu_gate_and_rms_norm_kernels_match_torch_autograd(dtype, tol):
    torch.manual_seed(0)
    gu, d = torch.randn(33, 2 * 88).to(dtype), torch.randn(33, 88).to(dtype)
    ref = gu.float().requires_grad_()
    out = torch.nn.functional.silu(ref[:, :88]) * ref[:, 88:]
    out.backward(d.float())
    assert _rel(layer_kernels.silu_mul(gu).float(), out.detach()) <= tol
    assert _rel(layer_kernels.silu_mul_backward(gu, d).float(), ref.grad) <= tol
    x, w = torch.randn(21, 72).to(dtype), (1 + 0.1 * torch.randn(72)).to(dtype)
    h, rstd = layer_kernels.rms_norm(x, w, 1e-5)
    xr = x.float().requires_grad_()
    want = w.float() * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5))
    dh, add = torch.randn(21, 72).to(dtype), torch.randn(21, 72).to(dtype)
    want.backward(dh.float())
    assert _rel(h.float(), want.detach()) <= tol
    dx = layer_kernels.rms_norm_backward(dh, x, w, rstd, add, torch.float32)
    assert _rel(dx - add.float(), xr.grad) <= tol


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rope_and_softmax_kernels_match_torch(dtype, tol):
    """rope_split / rope_join_backward against transformers' apply_rotary_pos_emb and its
    autograd; softmax against torch's (fp32) with the mask's masked keys at exactly 0 (no
    subnormals: they slow fp32 matmuls a hundredfold)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    b, t, h, kv, d = 2, 19, 4, 2, 16
    qkv = torch.randn(b * t, (h + 2 * kv) * d).to(dtype)
    angles = torch.arange(t)[:, None] * torch.rand(d // 2)[None]
    cos = torch.cat([angles.cos()] * 2, -1)[None].to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1)[None].to(dtype)  # [1, T, D]
    q, k, v = layer_kernels.rope_split(qkv, cos, sin, b, t, h, kv, d)
    heads = qkv.float().view(b, t, h + 2 * kv, d).transpose(1, 2).requires_grad_()
    rq, rk = apply_rotary_pos_emb(heads[:, :h], heads[:, h:h + kv], cos.float(), sin.float())
    assert _rel(q.float(), rq.detach()) <= tol and _rel(k.float(), rk.detach()) <= tol
    assert torch.equal(v.float(), heads[:, h + kv:].detach())
    gq, gk, gv = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
    torch.autograd.backward([rq, rk, heads[:, h + kv:]], [gq.float(), gk.float(), gv.float()])
    d_qkv = layer_kernels.rope_join_backward(gq, gk, gv, cos, sin)
    assert _rel(d_qkv.float(), heads.grad.transpose(1, 2).reshape(b * t, -1)) <= tol
    scores = torch.randn(b, kv, h // kv, t, t).to(dtype)
    mask = torch.zeros(b, 1, t, t).masked_fill_(torch.ones(t, t, dtype=torch.bool).triu(1), torch.finfo(dtype).min).to(dtype)
    probs, probs_c = layer_kernels.softmax_forward(scores, mask, 0.25)
    want = torch.softmax(scores.float() * 0.25 + mask.float().unsqueeze(2), -1)
    assert _rel(probs, want) <= 1e-5 and _rel(probs_c.float(), want) <= tol
    assert (probs[..., torch.ones(t, t, dtype=torch.bool).triu(1)] == 0).all()
    d_p = torch.randn(b * kv, (h // kv) * t, t).to(dtype)
    ref = (scores.float() * 0.25).requires_grad_()
    torch.softmax(ref + mask.float().unsqueeze(2), -1).backward(d_p.float().view(probs.shape))
    d_s = layer_kernels.softmax_backward(d_p, probs, 0.25)
    assert _rel(d_s.float().view(probs.shape), ref.grad * 0.25) <= tol


def test_the_trainer_counts_parameters_once_for_its_flops_estimate():
    """transformers' Trainer.floating_point_ops recounts every parameter each step; ours gives the
    same number from a count taken once."""
    from types import SimpleNamespace

    from transformers import Trainer

    from loraplex.training.trainer import _labelled_loss_trainer_class

    model = _model(layer=False, branch=False)
    ours, theirs = SimpleNamespace(model=model), SimpleNamespace(model=model)
    calls = []
    real = model.num_parameters
    model.num_parameters = lambda **kw: calls.append(kw) or real(**kw)
    cls = _labelled_loss_trainer_class()
    for rows in (2, 3, 5):
        inputs = {"input_ids": torch.zeros(rows, 7, dtype=torch.long)}
        assert cls.floating_point_ops(ours, inputs) == Trainer.floating_point_ops(theirs, inputs) > 0
    assert len(calls) == 1 + 3  # ours once, transformers' on every call
