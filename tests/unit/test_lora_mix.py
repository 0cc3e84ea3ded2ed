"""Per-token adapter slots in ``MultiLoraLinear`` (server/engine/lora.py): tokens of one step may
each use a different adapter, the bare base, or a weighted mix of adapters, and every token's
output equals the reference computed here straight from the raw A/B tensors:
``x W^T + sum_i w_i * scale_i * (x A_i^T) B_i^T``."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import lora
from loraplex.server.engine.lora import LoraBatchContext, MultiLoraLinear
from loraplex.server.store.validation import LoraModuleWeights as W  # A [r, in], B [out, r], scale

IN, OUT = 16, 12




def _setup(dtype=torch.float32, ranks=(2, 4, 3)):
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT, bias=True).to(dtype)
    context = LoraBatchContext()
    layer = MultiLoraLinear(base, "proj", context, dtype=dtype)
    adapters = {}
    for slot, rank in enumerate(ranks, start=1):
        w = W(torch.randn(rank, IN), torch.randn(OUT, rank), scale=0.5 * slot)
        layer.write(slot, w)
        adapters[slot] = w
    return layer, base, adapters


def _reference(x, base, adapters, items):
    """x [N, in] fp32; items: per token an int slot or ((slot, weight), ...); from the raw tensors."""
    weight, bias = base.weight.float(), base.bias.float()
    rows = []
    for token, item in zip(x, items):
        y = token @ weight.T + bias
        for slot, w in ([(item, 1.0)] if isinstance(item, int) else item):
            if slot:
                ad = adapters[slot]
                y = y + w * ad.scale * ((token @ ad.a.T) @ ad.b.T)
        rows.append(y)
    return torch.stack(rows)


ITEMS = [
    1,
    0,
    ((1, 0.7), (2, 0.3)),
    2,
    ((2, -0.5), (3, 1.5), (1, 0.25)),
    3,
    ((3, 2.0),),
    ((1, 0.4), (1, 0.6)),  # a slot named twice sums its weights
    ((0, 5.0), (2, 1.0)),  # a pair on the base adds nothing
]


@pytest.mark.parametrize("copies", [1, 3])  # 9 tokens: bf16 LoRA runs in fp32 (few tokens); 27: in bf16
@pytest.mark.parametrize("block_rows", [64, 4])  # 4: the three adapters sit in three blocks
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_mixes_single_adapters_and_base_tokens_in_one_batch(dtype, tol, block_rows, copies, monkeypatch):
    monkeypatch.setattr(lora, "BLOCK_ROWS", block_rows)
    layer, base, adapters = _setup(dtype)
    assert len(layer.blocks) == (1 if block_rows == 64 else 3)
    items = ITEMS * copies
    assert (len(items) <= lora.SMALL_M_FP32) == (copies == 1)
    x = torch.randn(1, len(items), IN)
    layer.context.set_token_slots(items, "cpu")
    got = layer(x.to(dtype))[0].float()
    expect = _reference(x[0].to(dtype).float(), base, adapters, items)  # x rounded like the layer's input
    assert (got - expect).abs().max() <= tol * expect.abs().max(), (got - expect).abs().max()


def test_a_mix_differs_from_each_member_and_equals_their_weighted_sum():
    layer, base, adapters = _setup()
    x = torch.randn(1, 4, IN)

    def run(items):
        layer.context.set_token_slots(items, "cpu")
        return layer(x)[0]

    y0, y1, y2 = run([0] * 4), run([1] * 4), run([2] * 4)
    mixed = run([((1, 0.7), (2, 0.3))] * 4)  # every token the same mix (no single-adapter shortcut)
    torch.testing.assert_close(mixed, y0 + 0.7 * (y1 - y0) + 0.3 * (y2 - y0), rtol=1e-5, atol=1e-5)
    assert (mixed - y1).abs().max() > 1e-2 and (mixed - y2).abs().max() > 1e-2


@pytest.mark.parametrize("tokens", [4, 40])  # the fp32 small-batch path and the bf16 one
def test_single_adapter_steps_in_bf16(tokens):
    layer, base, adapters = _setup(torch.bfloat16)
    x = torch.randn(1, tokens, IN)
    layer.context.set_token_slots([2] * tokens, "cpu")
    assert layer.context.single
    got = layer(x.bfloat16())[0].float()
    expect = _reference(x[0].bfloat16().float(), base, adapters, [2] * tokens)
    assert (got - expect).abs().max() <= 3e-2 * expect.abs().max()


def test_a_one_member_mix_at_weight_one_is_the_single_adapter_path():
    layer, _, _ = _setup()
    context = layer.context
    context.set_token_slots([((2, 1.0),), 2], "cpu")
    assert context.single and context.used == (2,)
    context.set_token_slots([((2, 0.5),), 2], "cpu")
    assert not context.single and context.token_weights.tolist() == [[0.5, 0.0], [1.0, 0.0]]
    context.set_token_slots([0, ((0, 1.0),)], "cpu")
    assert context.used == () and not context.any_adapter


def test_a_layer_not_targeted_by_a_mix_member_applies_the_others():
    layer, base, adapters = _setup()
    layer.clear(2)  # this layer's module is not targeted by adapter 2
    x = torch.randn(1, 2, IN)
    layer.context.set_token_slots([((1, 0.7), (2, 0.3)), ((2, 1.0), (3, 0.5))], "cpu")
    got = layer(x)[0]
    a1, a3 = adapters[1], adapters[3]
    expect = base(x)[0].detach()
    expect = expect + torch.stack([0.7 * a1.scale * (x[0, 0] @ a1.a.T @ a1.b.T), 0.5 * a3.scale * (x[0, 1] @ a3.a.T @ a3.b.T)])
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_a_group_adds_b_rows_by_one_gemm_only_where_it_pays_and_fits():
    """``LoraGroup._diag_pays``: gate/up with 8 rank-8 adapters at 64 tokens takes the one
    block-diagonal GEMM (measured faster here); at 256 tokens its zero blocks cost more than the
    call it saves; and with 64 rank-8 adapters in a 17-token step, where the cost model alone
    would take it, the copy (6 MiB for this layer) is refused, so a step using many adapters
    cannot grow memory by a block-diagonal copy per layer."""
    ctx = LoraBatchContext()
    gate, up = (MultiLoraLinear(torch.nn.Linear(576, 1536, bias=False).to(torch.bfloat16), n, ctx, dtype=torch.bfloat16) for n in ("gate_proj", "up_proj"))
    group = lora.LoraGroup([gate, up])
    spans = ((0, 1536), (1536, 3072))

    def members(rows):  # (block, lo, hi, index, r0, r1) per member, as LoraGroup._members builds them
        return ((0, 0, rows, None, 0, rows), (0, 0, rows, None, rows, 2 * rows))

    assert group._diag_pays(64, members(64), spans)
    assert not group._diag_pays(256, members(64), spans)
    assert not group._diag_pays(17, members(512), spans)  # 1024 x 3072 bf16: over DIAG_MAX_BYTES
    assert not group._diag_pays(64, (members(64)[0], None), spans)  # one member: nothing to save


def test_a_group_drops_its_working_copies_with_a_cleared_slot_and_rebuilds_them():
    """A mixed bf16 step of 32 tokens builds a group's working copies (A rows, block-diagonal B);
    clearing a member's slot (an unload) drops them at once, so the unloaded adapter's rows do
    not stay in memory; the next mixed step rebuilds them from the stored rows, and both steps
    equal the sum computed here from the raw tensors. A lone-stream step drops the mixed copies."""
    torch.manual_seed(1)
    ctx = LoraBatchContext()
    bases = [torch.nn.Linear(IN, OUT, bias=False).to(torch.bfloat16) for _ in range(2)]
    members = [MultiLoraLinear(base, f"p{i}", ctx, dtype=torch.bfloat16) for i, base in enumerate(bases)]
    group = lora.LoraGroup(members)
    spans = ((0, OUT), (OUT, 2 * OUT))
    adapters = {slot: [W(torch.randn(2, IN), torch.randn(OUT, 2), 0.5) for _ in members] for slot in (1, 2)}
    for slot, ws in adapters.items():
        for member, w in zip(members, ws):
            member.write(slot, w)
    x = torch.randn(32, IN).to(torch.bfloat16)

    def step(slots):
        ctx.set_token_slots(slots, "cpu")
        y = torch.zeros(32, 2 * OUT, dtype=torch.bfloat16)
        group.add_lora(x, y, spans)
        expect = torch.zeros(32, 2 * OUT)
        for i, slot in enumerate(slots):
            for m, (lo, hi) in enumerate(spans):
                if slot in adapters:
                    w = adapters[slot][m]
                    expect[i, lo:hi] = w.scale * ((x[i].float() @ w.a.T) @ w.b.T)
        torch.testing.assert_close(y.float(), expect, atol=0.1, rtol=0.05)

    step([1, 2] * 16)
    assert group._cache is not None and group._diag is not None
    members[1].clear(2)  # the unload of slot 2 reaches the group
    assert group._cache is None and group._diag is None
    adapters[2][1] = W(torch.zeros(2, IN), torch.zeros(OUT, 2), 0.0)  # member 0 still holds slot 2, member 1 no longer
    step([1, 2] * 16)
    assert group._cache is not None
    ctx.set_token_slots([1] * 4, "cpu")
    group.add_lora(x[:4], torch.zeros(4, 2 * OUT, dtype=torch.bfloat16), spans)  # a lone stream, few tokens
    assert group._cache is None and group._diag is None
