"""int4 weight-only GEMMs for small decode steps (server/engine/int4.py): recognised only on
weights that are exactly Q4_1-shaped (as the embedded GGUF base's are), checked against F.linear
on the dequantized weights, and the engine's tokens with them against peft at bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.engine.int4 import GROUP, available, exact_int4
from tests.oracle import check_greedy_within, greedy_request, make_random_adapter, reference_logits, run_engine

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no int4 weight-only CPU kernel")


def q4_1(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``weight`` [out, in] requantized as GGUF's Q4_1 does (per 32 inputs: fp16 scale and min,
    levels 0..15) and dequantized: a weight that IS int4, as the embedded base's are."""
    out, inp = weight.shape
    w = weight.float().view(out, inp // GROUP, GROUP)
    low = w.amin(-1, keepdim=True).half().float()
    scale = ((w.amax(-1, keepdim=True) - low) / 15).half().float()
    q = ((w - low) / scale).round().clamp(0, 15)
    return (q * scale + low).view(out, inp)


def test_an_int4_shaped_weight_is_recognised_and_its_gemm_matches_f_linear():
    torch.manual_seed(0)
    weight = q4_1(torch.randn(96, 128) * 0.05).bfloat16()
    form = exact_int4(weight)
    assert form is not None and form.out_features == 96
    x = torch.randn(3, 128).bfloat16()
    ref = F.linear(x.float(), weight.float())  # [3, 96] fp32 on the same (bf16) weights
    got = form(x).float()
    # bf16 output and bf16 scales: within a few bf16 ulps of the output's scale
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_weights_that_are_not_int4_are_refused():
    torch.manual_seed(0)
    assert exact_int4(torch.randn(64, 128).bfloat16()) is None  # a random (trained / fp16) weight
    assert exact_int4(q4_1(torch.randn(64, 128))[:, :100].contiguous().bfloat16()) is None  # 100 inputs: not groups of 32


@pytest.fixture(scope="module")
def int4_base(tiny_base, tmp_path_factory):
    """The tiny test Llama with every projection requantized to Q4_1 (embeddings untouched)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                module.weight.copy_(q4_1(module.weight * 8))  # projections that dominate the residual stream: an error in them shows
    folder = tmp_path_factory.mktemp("int4-base")
    model.save_pretrained(str(folder), safe_serialization=True)
    for f in tiny_base.iterdir():
        if f.name.startswith("token") or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_the_engine_decodes_small_steps_with_int4_weights_within_bf16_noise_of_peft(int4_base, tmp_path):
    from tests.unit.test_llama_forward import _engine

    adapter = make_random_adapter(int4_base, tmp_path / "a", seed=21)
    engine = _engine(int4_base, {"a": adapter}, dtype=torch.bfloat16, int4_decode_rows=4)
    assert engine.lean.int4_reason.startswith("on"), engine.lean.int4_reason
    assert engine.lean.layers[0].qkv.int4 is not None
    calls = []
    int4_type = type(engine.lean.layers[0].qkv.int4)
    original = int4_type.__call__
    int4_type.__call__ = lambda self, x, bias=None: (calls.append(x.shape[0]), original(self, x, bias))[1]
    try:
        prompts = [[1, 520, 3000, 44, 17], [1, 9, 8, 7, 6, 5]]
        requests = [greedy_request("0", prompts[0], "a", 12), greedy_request("1", prompts[1], None, 12)]
        run_engine(engine, {0: [r for r, _ in requests]})
    finally:
        int4_type.__call__ = original
    assert calls and max(calls) <= 4  # decode steps of 2 rows went through int4; the 11-token prefill did not
    ties = steps = 0
    for prompt, adapter_dir, (_, sink) in zip(prompts, [adapter, None], requests):
        bf16 = reference_logits(int4_base, adapter_dir, prompt + sink.tokens, dtype=torch.bfloat16)
        noise = float((bf16 - reference_logits(int4_base, adapter_dir, prompt + sink.tokens)).abs().max())
        ties += check_greedy_within(bf16, len(prompt), sink.tokens, tol=max(2 * noise, 1e-3))
        steps += len(sink.tokens)
    assert steps - ties >= steps // 4


def test_int4_stays_off_where_it_must(tiny_base, int4_base):
    from tests.unit.test_llama_forward import _engine

    assert _engine(tiny_base, {}, dtype=torch.bfloat16).lean.int4_reason.startswith("off (the base's weights are not int4")
    assert _engine(int4_base, {}, dtype=torch.bfloat16, int4_decode_rows=0).lean.int4_reason.startswith("off (int4_decode_rows 0")
    assert _engine(int4_base, {}, dtype=torch.float32).lean.int4_reason.startswith("off (torch.float32")
