"""The training LoRA branch (training/lora_fused.py) and its dropout mask (training/lora_dropout.py).

Independent references: Random123's published Philox4x32-10 known-answer vectors; the algorithm
written again here in plain Python (from the paper's round function, not from our C) to check which
word each element gets; peft's own ``lora.Linear`` forward; and float64 arithmetic for the branch
with the mask that plain-Python Philox gives. Drop rates are checked against binomial bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.training import lora_dropout, lora_fused

#: tests of the C mask itself; everything else also runs (and must pass) without it
needs_kernel = pytest.mark.skipif(not lora_dropout.available(), reason=f"no C kernel here: {lora_dropout.why_not()}")

M32 = 0xFFFFFFFF


def _philox_py(counter, key):
    """Philox4x32-10 in plain Python: ten rounds of two 32x32 -> 64 products, key bumped by the
    Weyl constants (Salmon et al., 'Parallel random numbers: as easy as 1, 2, 3', SC'11)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def _keep_py(n: int, seed: int, p: float) -> torch.Tensor:
    """The documented mask: element 64k + 16w + j takes word w of block 16k + j."""
    seed &= 2**64 - 1
    key = (seed & M32, seed >> 32)
    threshold = min(round((1 - p) * 2**32), 2**32 - 1)
    keep = []
    for i in range(n):
        k, r = divmod(i, 64)
        w, j = divmod(r, 16)
        block = 16 * k + j
        keep.append(_philox_py((block & M32, block >> 32, 0, 0), key)[w] < threshold)
    return torch.tensor(keep)


# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, expected output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@needs_kernel
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_the_generator_gives_the_published_philox_answers(counter, key, expected):
    assert lora_dropout.philox4x32(counter, key) == expected
    assert _philox_py(counter, key) == expected  # the Python reference below is the same algorithm


@needs_kernel
@pytest.mark.parametrize("seed", [0, 12345, -(2**63) + 977, 2**62 + 3])
def test_each_element_takes_its_documented_word_in_the_vector_body_and_the_tail(seed):
    n = 64 * 5 + 37  # five full 64-element chunks and a tail
    x = torch.arange(1, n + 1, dtype=torch.float32)
    y = lora_dropout.apply_mask(x, 0.5, seed, torch.float32)
    keep = _keep_py(n, seed, 0.5)
    assert torch.equal(y != 0, keep)
    assert torch.equal(y[keep], x[keep] * 2.0)


@needs_kernel
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_the_drop_rate_is_p_within_binomial_noise(p):
    n, rounds = 4_000_000, 5
    ones = torch.ones(n)
    dropped = sum(int((lora_dropout.apply_mask(ones, p, seed, torch.float32) == 0).sum()) for seed in range(rounds))
    sigma = math.sqrt(p * (1 - p) / (n * rounds))
    assert abs(dropped / (n * rounds) - p) < 5 * sigma


@needs_kernel
def test_masks_of_different_seeds_are_independent_and_the_same_seed_repeats():
    ones = torch.ones(1_000_000)
    a = lora_dropout.apply_mask(ones, 0.5, 1, torch.float32) != 0
    b = lora_dropout.apply_mask(ones, 0.5, 2, torch.float32) != 0
    assert torch.equal(a, lora_dropout.apply_mask(ones, 0.5, 1, torch.float32) != 0)
    both = (a & b).float().mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 1_000_000)  # P(keep in both) = 1/4 when independent


@needs_kernel
def test_the_mask_does_not_depend_on_the_thread_count():
    x = torch.randn(300_001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lora_dropout.apply_mask(x, 0.3, 99, torch.float32)
        torch.set_num_threads(2)
        two = lora_dropout.apply_mask(x, 0.3, 99, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_bf16_input_and_output_round_as_torch_does():
    n = 70_000 + 37  # a tail after the last 64-element chunk
    x = torch.randn(n) * 3
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3.0e38, 1e-40, 2.0**-126 * 1.5])
    x[:8] = specials  # in the vector body
    x[-8:] = specials  # in the scalar tail
    p = 1e-12  # keeps every element (p rounds to 2^-32): each output is x's own rounding
    fp32 = lora_dropout.apply_mask(x, p, 5, torch.float32)
    assert torch.equal(torch.isnan(fp32), torch.isnan(x))
    ours = lora_dropout.apply_mask(x, p, 5, torch.bfloat16)
    theirs = fp32.to(torch.bfloat16)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    finite = ~torch.isnan(theirs)
    assert torch.equal(ours[finite].view(torch.int16), theirs[finite].view(torch.int16))  # bit for bit
    xb = x.to(torch.bfloat16)
    from_bf16 = lora_dropout.apply_mask(xb, 0.1, 5, torch.float32)
    keep = lora_dropout.apply_mask(torch.ones_like(x), 0.1, 5, torch.float32) != 0
    expected = torch.where(keep, xb.float() * torch.tensor(1 / 0.9, dtype=torch.float32), torch.zeros(()))
    torch.testing.assert_close(from_bf16, expected, rtol=0, atol=0, equal_nan=True)


def test_bad_probabilities_and_tensors_are_refused():
    with pytest.raises(ValueError, match="dropout probability must be in"):
        lora_dropout.keep_threshold(1.0)
    with pytest.raises(ValueError, match="fp32/bf16 CPU tensors"):
        lora_dropout.apply_mask(torch.ones(4, dtype=torch.float16), 0.1, 1, torch.float32)


# --- the branch -------------------------------------------------------------------------------

def _lora_layer(dtype: torch.dtype, p: float, *, r: int = 4, seed: int = 0, fused: bool = True, **config):
    """A one-layer peft model: Linear(24 -> 40) in ``dtype`` under fp32 LoRA (random A and B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(24, 40, bias=True))
    net.to(dtype)
    model = get_peft_model(net, LoraConfig(r=r, lora_alpha=8, lora_dropout=p, target_modules=["proj"], **config))
    layer = model.base_model.model.proj
    for name in layer.lora_A:  # LoRA weights stay fp32 (peft's default on a bf16 base)
        layer.lora_A[name].float()
        layer.lora_B[name].float()
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.5)
    if fused:
        assert "fused LoRA branch on 1 layers" in lora_fused.install(model)
    model.train()
    return model, layer


def _reference(layer, x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """The branch in float64 from the layer's own weights: W x + b + s B A (keep * x / (1 - p))."""
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    xd = x.double()
    d = xd if keep is None else xd * keep.double() / (1 - p)
    return xd @ base.weight.double().t() + base.bias.double() + layer.scaling["default"] * (d @ a.t()) @ b.t()


def _grads(model, layer, x, g):
    for param in model.parameters():
        param.grad = None
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.backward(g)
    return out.detach(), x.grad, layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()


def test_without_dropout_the_fp32_branch_matches_peft_output_and_gradients():
    x = torch.randn(3, 5, 24)
    g = torch.randn(3, 5, 40)
    fused, layer = _lora_layer(torch.float32, 0.0)
    plain, _ = _lora_layer(torch.float32, 0.0, fused=False)
    assert type(layer) is lora_fused.FusedLoraLinear
    for ours, theirs in zip(_grads(fused, layer, x, g), _grads(plain, plain.base_model.model.proj, x, g)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_dropout_the_branch_equals_float64_arithmetic_with_the_philox_mask(dtype):
    p = 0.4
    model, layer = _lora_layer(dtype, p)
    x = torch.randn(2, 7, 24).to(dtype)
    g = torch.randn(2, 7, 40).to(dtype)
    torch.manual_seed(1234)
    seed = lora_dropout.draw_seed()  # the seed the layer's forward will draw after the same reseed
    keep = _keep_py(x.numel(), seed, p).view(14, 24)
    torch.manual_seed(1234)
    out, grad_x, grad_a, grad_b = _grads(model, layer, x, g)
    assert out.dtype == dtype and grad_x.dtype == dtype and grad_a.dtype == torch.float32

    xr = x.detach().reshape(14, 24).double().requires_grad_(True)
    a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    ref = xr @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double() + layer.scaling["default"] * ((xr * keep.double() / (1 - p)) @ a.t()) @ b.t()
    ref.backward(g.reshape(14, 40).double())
    # fp32: rounding only. bf16: x, d, h, grad_h and the copies of A and s B each round to 8 bits,
    # so each result is checked by its relative norm error (2^-8 = 0.4% per rounding)
    pairs = [(out.reshape(14, 40), ref.detach()), (grad_x.reshape(14, 24), xr.grad), (grad_a, a.grad), (grad_b, b.grad)]
    for ours, expected in pairs:
        if dtype == torch.float32:
            torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
        else:
            assert ((ours.double() - expected).norm() / expected.norm()).item() < 2e-2


@needs_kernel
def test_a_dropped_input_gets_no_lora_gradient():
    """The backward applies the forward's mask: with a zero base weight, only kept inputs get a gradient."""
    model, layer = _lora_layer(torch.float32, 0.5)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
    x, g = torch.randn(4, 24), torch.randn(4, 40)
    torch.manual_seed(7)
    seed = lora_dropout.draw_seed()
    keep = _keep_py(x.numel(), seed, 0.5).view(4, 24)
    torch.manual_seed(7)
    _, grad_x, _, _ = _grads(model, layer, x, g)
    assert torch.all(grad_x[~keep] == 0)
    assert torch.count_nonzero(grad_x[keep]) == int(keep.sum())


def test_the_bf16_branch_is_as_accurate_as_peft_on_the_same_bf16_base():
    """Against float64: our bf16 products are no worse than peft's fp32 branch plus 2 bf16 ulps of
    the output (both add onto the same bf16 base output)."""
    x = torch.randn(6, 24).to(torch.bfloat16)
    fused, layer = _lora_layer(torch.bfloat16, 0.0)
    plain, player = _lora_layer(torch.bfloat16, 0.0, fused=False)
    ref = _reference(layer, x, None, 0.0)
    ours = (fused(x).double() - ref).abs().max().item()
    theirs = (plain(x).double() - ref).abs().max().item()
    assert ours <= theirs + 2 * 2**-8 * ref.abs().max().item(), (ours, theirs)


def test_eval_mode_and_p_zero_use_no_mask():
    model, layer = _lora_layer(torch.float32, 0.5)
    model.eval()
    x = torch.randn(5, 24)
    torch.testing.assert_close(model(x).double(), _reference(layer, x, None, 0.5), rtol=1e-5, atol=1e-5)


def test_install_keeps_the_state_dict_and_unload_still_works():
    model, layer = _lora_layer(torch.float32, 0.1, fused=False)
    keys = sorted(model.state_dict())
    lora_fused.install(model)
    assert type(layer) is lora_fused.FusedLoraLinear
    assert sorted(model.state_dict()) == keys
    base = model.unload()
    assert type(base.proj) is torch.nn.Linear


def test_dora_and_merged_layers_take_peft_forward():
    x = torch.randn(4, 24)
    model, layer = _lora_layer(torch.float32, 0.0, use_dora=True)
    assert layer._fused_adapter(x, {}) is None  # a variant: peft's forward
    model, layer = _lora_layer(torch.float32, 0.0)
    assert layer._fused_adapter(x, {}) == "default"
    before = model(x).detach()
    layer.merge()
    assert layer._fused_adapter(x, {}) is None
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-4, atol=1e-4)


def test_without_the_kernel_a_torch_mask_is_drawn_and_reused_backwards(monkeypatch):
    """A = I and B = [I; 0] with a zero base: the output shows d = keep * x / (1 - p) itself, and the
    input gradient must be zero exactly where the forward dropped."""
    monkeypatch.setattr(lora_dropout, "available", lambda: False)
    model, layer = _lora_layer(torch.float32, 0.5, r=24)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(24))
        layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].weight[:24].copy_(torch.eye(24))
    x = torch.randn(50, 24)
    out, grad_x, _, _ = _grads(model, layer, x, torch.ones(50, 40))
    dropped = out[:, :24] == 0
    assert 0.3 < dropped.float().mean().item() < 0.7  # about half the inputs dropped
    torch.testing.assert_close(out[:, :24][~dropped], layer.scaling["default"] * x[~dropped] / 0.5)
    assert torch.equal(grad_x == 0, dropped)


def test_lora_bias_several_adapters_and_disabled_adapters_take_peft_forward():
    x = torch.randn(4, 24)
    model, layer = _lora_layer(torch.float32, 0.0, lora_bias=True)
    assert layer._fused_adapter(x, {}) is None
    plain, _ = _lora_layer(torch.float32, 0.0, fused=False, lora_bias=True)
    torch.testing.assert_close(model(x), plain(x))
    model, layer = _lora_layer(torch.float32, 0.0)
    with model.disable_adapter():
        assert layer._fused_adapter(x, {}) is None
        torch.testing.assert_close(model(x), layer.base_layer(x))
    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(r=2, target_modules=["proj"]))
    layer.set_adapter(["default", "second"])
    assert layer._fused_adapter(x, {}) is None
    assert layer._fused_adapter(x, {"alora_offsets": [1]}) is None


def test_gradient_checkpointing_recomputes_the_same_masks():
    """A tiny llama with LoRA dropout 0.5: the same seed gives the same gradients with and without
    checkpointing (which re-runs each layer's forward, restoring torch's generator first)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj", "down_proj"]))
        lora_fused.install(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids = torch.randint(0, 61, (2, 9))
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 12
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_under_autocast_on_an_fp32_base_the_branch_matches_peft():
    """The autocast runs (--bf16 true with qlora-free exact-weight runs): fp32 base and LoRA under
    torch.autocast; ours and peft's agree to bf16 precision and both keep fp32 input gradients."""
    x = torch.randn(2, 6, 24)
    g = torch.randn(2, 6, 40)
    fused, layer = _lora_layer(torch.float32, 0.0)
    plain, player = _lora_layer(torch.float32, 0.0, fused=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(fused, layer, x, g)
        theirs = _grads(plain, player, x, g)
    assert ours[0].dtype == theirs[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32
    for a, b in zip(ours, theirs):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 2e-2
