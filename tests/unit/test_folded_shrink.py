"""The LoRA shrink folded into the base GEMM (``FoldedShrink``, server/engine/lora.py): the
resident adapters' A rows appended to a projection's prepacked bf16 weight, so one GEMM returns
the base output and every token's ``x A^T``. Each step's output is checked against the sum
computed here from the raw A/B tensors (``x W^T + sum_i w_i * scale_i * (x A_i^T) B_i^T``), and
the fold is used only while it is current and covers the step's slots."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import expand_kernel, lora
from loraplex.server.engine.lora import FoldedShrink, LoraBatchContext, MultiLoraLinear, pack_weight, packed_linear
from loraplex.server.store.validation import LoraModuleWeights as W  # A [r, in], B [out, r], scale

IN, OUTS = 48, (40, 24, 24)  # three members sharing one input, like q/k/v

pytestmark = pytest.mark.skipif(pack_weight(torch.zeros(2, 2, dtype=torch.bfloat16)) is None, reason="no oneDNN bf16 prepacking on this CPU build (the fold rides on it)")




def _group(ranks=(4, 8, 16), bias=False):
    torch.manual_seed(3)
    ctx = LoraBatchContext()
    bases = [torch.nn.Linear(IN, out, bias=bias).to(torch.bfloat16) for out in OUTS]
    members = [MultiLoraLinear(base, f"p{i}", ctx, dtype=torch.bfloat16) for i, base in enumerate(bases)]
    adapters: dict[int, list[W]] = {}
    for slot, rank in enumerate(ranks, start=1):
        adapters[slot] = [W(torch.randn(rank, IN) * 0.3, torch.randn(out, rank) * 0.3, 0.5 * slot) for out in OUTS]
        if slot == 2:  # an adapter that does not target the second member
            adapters[slot][1] = None
        for member, w in zip(members, adapters[slot]):
            if w is not None:
                member.write(slot, w)
    weight = torch.cat([base.weight.detach() for base in bases])  # [sum(out), in]
    spans, start = [], 0
    for out in OUTS:
        spans.append((start, start + out))
        start += out
    return ctx, bases, members, adapters, weight, tuple(spans)


def _reference(x, bases, adapters, items, spans):
    """x [N, in] (its bf16 values, in fp32); per token an int slot or ((slot, weight), ...)."""
    out = torch.cat([x.float() @ base.weight.detach().float().T + (0 if base.bias is None else base.bias.detach().float()) for base in bases], dim=1)
    for i, item in enumerate(items):
        for slot, weight in ([(item, 1.0)] if isinstance(item, int) else item):
            for m, (lo, hi) in enumerate(spans):
                w = adapters.get(slot, [None] * len(spans))[m]
                if slot and w is not None:
                    out[i, lo:hi] += weight * w.scale * ((x[i].float() @ w.a.T) @ w.b.T)
    return out


def _step(shrink: FoldedShrink, ctx, x, items):
    """One folded step: (handled, y [N, width]) from the fold's GEMM plus add_lora."""
    ctx.set_token_slots(items, "cpu")
    fold = shrink.fold  # the last build, current or not (the forward runs it either way)
    assert fold is not None
    width = fold.width
    full = packed_linear(x, fold.packed, fold.bias, width + sum(fold.rows))  # [N, width + R]
    y = full[:, :width]
    return shrink.add_lora(fold, full[:, width:], y, ctx), y


MIXED = [1, 0, 2, 3, ((1, 0.7), (3, 0.3)), 2, ((2, -0.5), (1, 1.5))] * 4 + [3, 1, 0, 2]  # 32 tokens


@pytest.mark.parametrize("expand", ["kernel", "b-diag", "b-per-member"])
@pytest.mark.parametrize("items", [MIXED, [2] * 32, [0, 3] * 16, [0] * 32], ids=["mixed", "single", "one-adapter-and-base", "base-only"])
def test_a_folded_step_equals_the_sum_from_the_raw_tensors(items, expand, monkeypatch):
    """The expand three ways: the C kernel (server/engine/expand_kernel.py), the masked GEMM over a
    block-diagonal B, and one masked GEMM per member."""
    if expand == "kernel" and not expand_kernel.available():
        pytest.skip(f"the expand kernel does not build here: {expand_kernel.why_not()}")
    monkeypatch.setitem(expand_kernel.EXPAND_KERNEL, "enabled", expand == "kernel")
    monkeypatch.setitem(lora.DIAG_B, "enabled", expand == "b-diag")
    ctx, bases, members, adapters, weight, spans = _group()
    shrink = FoldedShrink(weight, None, members, spans)
    assert shrink.refresh()
    assert shrink.fold.rows == (4 + 8 + 16, 4 + 16, 4 + 8 + 16)  # block-0 rows per member (slot 2 skips the second)
    x = torch.randn(32, IN).to(torch.bfloat16)
    handled, y = _step(shrink, ctx, x, items)
    assert handled
    assert shrink.kernel_uses == (1 if expand == "kernel" and any(items) else 0)
    expect = _reference(x, bases, adapters, items, spans)
    torch.testing.assert_close(y.float(), expect, atol=0.08, rtol=0.03)
    # not vacuous: the LoRA part is large against the tolerance
    assert float((expect - _reference(x, bases, {}, [0] * 32, spans)).abs().max()) > (1.0 if any(items) else -1)


def test_a_fold_over_projections_with_biases_adds_each_bias_once():
    """Qwen2's q/k/v carry biases: the folded GEMM's bias is the base bias, zero on the A rows."""
    ctx, bases, members, adapters, weight, spans = _group(bias=True)
    bias = torch.cat([base.bias.detach() for base in bases])
    with torch.no_grad():
        bias.normal_(0, 2.0)
        for base, (lo, hi) in zip(bases, spans):
            base.bias.copy_(bias[lo:hi])
    shrink = FoldedShrink(weight, bias, members, spans)
    shrink.refresh()
    x = torch.randn(32, IN).to(torch.bfloat16)
    handled, y = _step(shrink, ctx, x, MIXED)
    assert handled
    torch.testing.assert_close(y.float(), _reference(x, bases, adapters, MIXED, spans), atol=0.08, rtol=0.03)


def test_a_fold_is_used_only_while_current_and_only_for_slots_it_covers():
    ctx, bases, members, adapters, weight, spans = _group()
    shrink = FoldedShrink(weight, None, members, spans)
    shrink.refresh()
    x = torch.randn(32, IN).to(torch.bfloat16)
    # a write after the build (an install racing a forward): the fold is stale until refreshed
    adapters[4] = [W(torch.randn(8, IN) * 0.3, torch.randn(out, 8) * 0.3, 1.0) for out in OUTS]
    for member, w in zip(members, adapters[4]):
        member.write(4, w)
    assert shrink.current() is None
    handled, y = _step(shrink, ctx, x, [4, 1] * 16)
    assert not handled  # stale: the caller adds LoRA by the plain path ...
    torch.testing.assert_close(y.float(), _reference(x, bases, {}, [0] * 32, spans), atol=0.08, rtol=0.03)  # ... onto right base columns
    assert shrink.refresh() and shrink.current() is not None
    handled, y = _step(shrink, ctx, x, [4, 1] * 16)
    assert handled
    torch.testing.assert_close(y.float(), _reference(x, bases, adapters, [4, 1] * 16, spans), atol=0.08, rtol=0.03)
    # an adapter too big for the free rows of block 0 lands in a new block: not folded
    adapters[5] = [W(torch.randn(48, IN) * 0.3, torch.randn(out, 48) * 0.3, 1.0) for out in OUTS]
    for member, w in zip(members, adapters[5]):
        member.write(5, w)
    assert all(member.row_of[5][0] == 1 for member in members)
    shrink.refresh()
    handled, _ = _step(shrink, ctx, x, [5, 1] * 16)
    assert not handled  # the caller's plain path adds it
    handled, y = _step(shrink, ctx, x, [4, 1, 0, 3] * 8)
    assert handled
    torch.testing.assert_close(y.float(), _reference(x, bases, adapters, [4, 1, 0, 3] * 8, spans), atol=0.08, rtol=0.03)
    # unloads: the cleared rows are zero and masked; with nothing resident the fold goes
    for slot in (1, 2, 3, 4, 5):
        for member in members:
            member.clear(slot)
    assert shrink.current() is None and not shrink.refresh() and shrink.fold is None


def test_the_lean_forward_keeps_one_prepacked_copy_of_a_folded_weight(tiny_base, tmp_path):
    """While adapters are resident each projection's prepacked weight is the folded one (base rows
    and A rows) and the plain prepacked copy is gone; with the last adapter removed it is back."""
    from transformers import AutoModelForCausalLM

    from loraplex.server.basemodel import compute_fingerprint
    from loraplex.server.engine.engine import Engine, TorchAdapterPayload
    from loraplex.server.registry import BaseShapes, load_validated_adapter
    from tests.oracle import make_random_adapter

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.bfloat16).eval()
    shapes = BaseShapes.from_model(model, compute_fingerprint(tiny_base))
    engine = Engine(model, eos_token_ids=[2], max_batch_size=4)
    assert engine.forward_path == "lean"
    fused = engine.lean.layers[0].qkv
    assert fused.packed is not None and fused.shrink.fold is None
    folder = make_random_adapter(tiny_base, tmp_path / "a", seed=1)
    engine.add_adapter(TorchAdapterPayload(name="a", modules=load_validated_adapter(folder, "a", shapes, max_lora_rank=64).modules))
    assert engine.lean.settle()  # folded on a background thread
    fold = fused.shrink.current()
    assert fold is not None and fused.packed is None
    assert fold.rows == (4, 4, 4)  # the test adapter's rank on q, k and v
    engine.remove_adapter("a")
    assert engine.lean.settle()
    assert fused.shrink.fold is None and fused.packed is not None


@pytest.mark.parametrize("kernel_wanted", [False, True], ids=["gemm-expand", "kernel"])
def test_a_group_whose_first_member_no_adapter_targets_folds_and_adds_the_rest(kernel_wanted, monkeypatch):
    """Adapters targeting only k/v (or up/down): the first member holds no rows (no block at
    all); the refold and both expands must handle it (the block-diagonal B copy once assumed
    the first member's rows)."""
    if kernel_wanted and not expand_kernel.available():
        pytest.skip(f"the expand kernel does not build here: {expand_kernel.why_not()}")
    monkeypatch.setitem(lora.DIAG_B, "enabled", True)
    torch.manual_seed(4)
    ctx = LoraBatchContext()
    bases = [torch.nn.Linear(IN, out, bias=False).to(torch.bfloat16) for out in OUTS]
    members = [MultiLoraLinear(base, f"p{i}", ctx, dtype=torch.bfloat16) for i, base in enumerate(bases)]
    adapters = {slot: [None] + [W(torch.randn(8, IN) * 0.3, torch.randn(out, 8) * 0.3, 0.5) for out in OUTS[1:]] for slot in (1, 2)}
    for slot, ws in adapters.items():
        for member, w in zip(members, ws):
            if w is not None:
                member.write(slot, w)
    assert not members[0].blocks
    weight = torch.cat([base.weight.detach() for base in bases])
    spans = ((0, OUTS[0]), (OUTS[0], OUTS[0] + OUTS[1]), (OUTS[0] + OUTS[1], sum(OUTS)))
    shrink = FoldedShrink(weight, None, members, spans)
    shrink.kernel_wanted = kernel_wanted
    assert shrink.refresh()
    x = torch.randn(32, IN).to(torch.bfloat16)
    items = [1, 2, 0, ((1, 0.5), (2, 0.5))] * 8
    handled, y = _step(shrink, ctx, x, items)
    assert handled and shrink.kernel_uses == (1 if kernel_wanted else 0)
    torch.testing.assert_close(y.float(), _reference(x, bases, adapters, items, spans), atol=0.08, rtol=0.03)
