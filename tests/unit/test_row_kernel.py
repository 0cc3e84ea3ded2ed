"""The one-row decode step in C (server/engine/row_kernel.py).

Against ``OneRowStep.run`` (compiled_decode.py: the one-row step written as plain torch ops, the
eager path's statement) on a tiny Llama whose projections are exactly Q4_1, with 32-wide heads
so the kernel takes it: with and without one adapter's LoRA rows, at positions inside, at the end
of and across the attention's 64-position blocks; the K/V it writes, and nothing else in the
buffers. Then the engine: a stream decoding alone runs the kernel (counted) and its greedy tokens
stay within bf16 noise of peft; mixes and ``decode_row="torch"`` keep the per-op path.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import row_kernel
from loraplex.server.engine.compiled_decode import OneRowStep
from tests.oracle import make_random_adapter, run_engine
from tests.unit.test_engine import _check_bf16_against_peft, _request
from tests.unit.test_engine_features import _req
from tests.unit.test_int4_decode import q4_1
from tests.unit.test_llama_forward import _engine

pytestmark = pytest.mark.skipif(not row_kernel.available(), reason=f"the one-row kernel does not build here: {row_kernel.why_not()}")

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _int4_llama(folder, tokenizer_dir, *, hidden: int, heads: int, kv_heads: int, layers: int, seed: int):
    """A random Llama sharing SmolLM2's vocabulary whose projections are requantized to Q4_1 (as
    the embedded base's are), doubled so their errors show."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in _PROJECTIONS:
                module.weight.copy_(q4_1(module.weight * 2))
    model.save_pretrained(str(folder), safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def wide_int4_base(tmp_path_factory, smol_tokenizer_dir):
    """3 layers, hidden 128, 4 heads of 32 over 2 kv heads: the attention's generic code."""
    return _int4_llama(tmp_path_factory.mktemp("wide-int4"), smol_tokenizer_dir, hidden=128, heads=4, kv_heads=2, layers=3, seed=5)


@pytest.fixture(scope="module")
def smol_shaped_int4_base(tmp_path_factory, smol_tokenizer_dir):
    """2 layers, hidden 192, 3 heads of 64 over 1 kv head: SmolLM2's head size and group of 3
    (the attention's specialised code)."""
    return _int4_llama(tmp_path_factory.mktemp("smol-int4"), smol_tokenizer_dir, hidden=192, heads=3, kv_heads=1, layers=2, seed=6)


def _reference_step(lean) -> OneRowStep:
    return OneRowStep(hidden=lean.hidden, heads=lean.heads, kv_heads=lean.kv_heads, head_dim=lean.head_dim, eps=lean.eps, scale=lean.scale,
                      gate_up_spans=lean.layers[0].gate_up.spans)


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """fp32 values a bf16 holds exactly, as the engine's LoRA rows are (the slot table keeps them at bf16)."""
    return t.bfloat16().float()


def _lora_rows(lean, ranks: tuple[int, ...], seed: int, scale: float) -> list[list[tuple]]:
    """Per layer and projection group, random ``(A [r, in], B [r, out])`` (fp32 holding bf16 values) with the group's
    rank from ``ranks`` (0: no rows), big enough to move the output well past bf16 noise."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for layer in lean.layers:
        rows.append([(_bf16_exact(torch.randn(r, f.weight.shape[1], generator=g) * 0.1), _bf16_exact(torch.randn(r, f.out_features, generator=g) * scale)) if r else (None, None)
                     for f, r in zip(layer.fused, ranks)])
    return rows


def _inputs_with(lean, rows) -> list[tuple]:
    """OneRowStep.run's 22 inputs per layer with these LoRA rows (or none)."""
    plain = lean.one_row_layer_inputs(lean.layers[0].o_lora.context)  # no adapter in use: A/B are None
    out = []
    for layer_inputs, layer_rows in zip(plain, rows or [None] * len(plain)):
        items = list(layer_inputs)
        if layer_rows is not None:
            for (a_at, b_at), (a, b) in zip(((4, 5), (9, 10), (15, 16), (20, 21)), layer_rows):
                items[a_at], items[b_at] = a, b
        out.append(tuple(items))
    return out


def _exact_step(lean, h, pos, slot, keys, values, rows):
    """The one-row step in float64 from the raw tensors (the weights as served, bf16 and exactly
    Q4_1; the norms, rotary tables, K/V and LoRA rows as given): ``(h, [(k, v) written per layer])``."""
    f64 = torch.float64
    heads, kv_heads, d, hidden = lean.heads, lean.kv_heads, lean.head_dim, lean.hidden
    group, half = heads // kv_heads, d // 2
    cos, sin = lean.cos[pos].to(f64), lean.sin[pos].to(f64)

    def rms(x, w):
        return w.to(f64) * x / torch.sqrt((x * x).mean() + lean.eps)

    def project(x, fused, lora):
        y = fused.weight.to(f64) @ x
        if fused.bias is not None:
            y = y + fused.bias.to(f64)
        a, b = lora
        if a is not None:
            y = y + b.to(f64).T @ (a.to(f64) @ x)
        return y

    def rope(x):  # [n, d]
        return x * cos + torch.cat((-x[:, half:], x[:, :half]), dim=-1) * sin

    h = h[0].to(f64)
    written = []
    for index, layer in enumerate(lean.layers):
        lora = rows[index] if rows else [(None, None)] * 4
        qkv = project(rms(h, layer.in_norm), layer.qkv, lora[0])
        q = rope(qkv[: heads * d].view(heads, d))
        k = rope(qkv[heads * d : (heads + kv_heads) * d].view(kv_heads, d))
        v = qkv[(heads + kv_heads) * d :].view(kv_heads, d)
        written.append((k, v))
        k_all = keys[index][slot, :, : pos + 1].to(f64).clone()  # [kv_heads, pos + 1, d]
        v_all = values[index][slot, :, : pos + 1].to(f64).clone()
        k_all[:, pos], v_all[:, pos] = k, v
        attn = []
        for head in range(heads):
            scores = k_all[head // group] @ q[head] * lean.scale
            attn.append(torch.softmax(scores, dim=0) @ v_all[head // group])
        h = h + project(torch.cat(attn), layer.o_proj, lora[1])
        gate_up = project(rms(h, layer.post_norm), layer.gate_up, lora[2])
        (g_lo, g_hi), (u_lo, u_hi) = layer.gate_up.spans
        h = h + project(torch.nn.functional.silu(gate_up[g_lo:g_hi]) * gate_up[u_lo:u_hi], layer.down_proj, lora[3])
    return h, written


@pytest.mark.parametrize("model", ["wide", "smol_shaped"])
@pytest.mark.parametrize("pos", [0, 37, 63, 64, 130])
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_the_kernel_step_is_as_close_to_the_exact_step_as_the_torch_step(request, model, pos, with_lora):
    """Kernel and plain torch step (bf16, int4 kernel with bf16 scales) against float64, in the
    output and in the K/V each writes: both carry a few bf16 roundings per layer, in different
    places, so neither is always closer: measured over these cases both were 1-5 bf16 ulps (of the
    largest value) from float64 in the output and 1-3.5 in the K/V, the kernel's error 0.4-2.5x
    the torch step's. The bound: at most 1.5x the torch step's error or 4 ulps, whichever is
    larger (a lost LoRA term or a misread weight is far over, see the end). Nothing else in the
    buffers changes."""
    engine = _engine(request.getfixturevalue(f"{model}_int4_base"), {}, dtype=torch.bfloat16)
    lean = engine.lean
    assert lean.row_step is not None, lean.row_reason
    rows = _lora_rows(lean, ranks=(6, 0, 3, 16), seed=pos, scale=0.3) if with_lora else None  # o without rows
    inputs = _inputs_with(lean, rows)
    lean.row_step.set_adapter(("test", pos, with_lora), [[(x[4], x[5]), (x[9], x[10]), (x[15], x[16]), (x[20], x[21])] for x in inputs])
    g = torch.Generator().manual_seed(100 + pos)
    n_layers, kv_heads, d = len(lean.layers), lean.kv_heads, lean.head_dim
    keys = [(torch.randn(3, kv_heads, 160, d, generator=g)).bfloat16() for _ in range(n_layers)]
    values = [(torch.randn(3, kv_heads, 160, d, generator=g)).bfloat16() for _ in range(n_layers)]
    h0 = (torch.randn(1, lean.hidden, generator=g) * 0.5).bfloat16()
    slot = 2
    exact, exact_kv = _exact_step(lean, h0, pos, slot, keys, values, rows)
    with torch.inference_mode():
        k_ref, v_ref = [k.clone() for k in keys], [v.clone() for v in values]
        plain = _reference_step(lean).run(h0.clone(), lean.cos[pos][None, None], lean.sin[pos][None, None], torch.tensor([slot]), torch.tensor([pos]), k_ref, v_ref, inputs)
        k_got, v_got = [k.clone() for k in keys], [v.clone() for v in values]
        got = lean.row_step.step(h0.clone(), lean.cos[pos].contiguous(), lean.sin[pos].contiguous(), k_got, v_got, slot, pos)

    def error(x, want):
        return float((x.double() - want).abs().max())

    ulp = float(exact.abs().max()) * 2.0**-8
    assert error(got[0], exact) <= max(1.5 * error(plain[0], exact), 4 * ulp), (error(got[0], exact) / ulp, error(plain[0], exact) / ulp)
    for layer in range(n_layers):
        (k_exact, v_exact) = exact_kv[layer]
        for mine, theirs, want, before in ((k_got[layer], k_ref[layer], k_exact, keys[layer]), (v_got[layer], v_ref[layer], v_exact, values[layer])):
            kv_ulp = float(want.abs().max()) * 2.0**-8
            assert error(mine[slot, :, pos], want) <= max(1.5 * error(theirs[slot, :, pos], want), 4 * kv_ulp)
            untouched = torch.ones(mine.shape[0], mine.shape[2], dtype=torch.bool)
            untouched[slot, pos] = False
            assert torch.equal(mine.permute(0, 2, 1, 3)[untouched], before.permute(0, 2, 1, 3)[untouched])  # nothing else written
    if with_lora:  # not vacuous: the LoRA rows move the result far past those errors
        lean.row_step.set_adapter(("test-bare",), [[(None, None)] * 4 for _ in range(n_layers)])
        with torch.inference_mode():
            without = lean.row_step.step(h0.clone(), lean.cos[pos].contiguous(), lean.sin[pos].contiguous(), [k.clone() for k in keys], [v.clone() for v in values], slot, pos)
        assert error(without[0], exact) > 10 * max(1.5 * error(plain[0], exact), 4 * ulp)


def test_a_stream_decoding_alone_runs_the_kernel_within_bf16_noise_of_peft(wide_int4_base, tmp_path):
    adapters = {"a": make_random_adapter(wide_int4_base, tmp_path / "a", seed=31), "b": make_random_adapter(wide_int4_base, tmp_path / "b", seed=32, r=8, targets=("q_proj", "v_proj"))}
    engine = _engine(wide_int4_base, adapters, dtype=torch.bfloat16)
    assert engine.lean.row_reason.startswith("C kernel"), engine.lean.row_reason
    plan = [([1, 520, 3000, 44, 17], "a"), ([1, 9, 8, 7, 6, 5, 4], "b"), ([1] + list(range(700, 770)), None)]
    requests = []
    for i, (prompt, adapter) in enumerate(plan):  # one stream at a time: every decode step is one row
        before = engine.lean.row_step.calls
        requests.append(_request(str(i), prompt, adapter, 16))
        run_engine(engine, {0: [requests[-1][0]]})
        assert engine.lean.row_step.calls - before == 15  # every decode step after the prefill's token
    _check_bf16_against_peft(wide_int4_base, adapters, plan, requests)


def test_mixes_and_the_torch_switch_keep_the_per_op_path(wide_int4_base, tmp_path):
    adapters = {"a": make_random_adapter(wide_int4_base, tmp_path / "a", seed=41), "b": make_random_adapter(wide_int4_base, tmp_path / "b", seed=42)}
    engine = _engine(wide_int4_base, adapters, dtype=torch.bfloat16)
    request = _req("mix", [1, 5, 6, 7], None, 6, mix=(("a", 0.5), ("b", 0.5)))
    run_engine(engine, {0: [request[0]]})
    assert len(request[1].tokens) == 6 and engine.lean.row_step.calls == 0
    off = _engine(wide_int4_base, {}, dtype=torch.bfloat16, decode_row="torch")
    assert off.lean.row_step is None and off.lean.row_reason == "per op (--decode-row torch)"
    narrow = _engine(wide_int4_base, {}, dtype=torch.bfloat16, int4_decode_rows=0)
    assert narrow.lean.row_step is None and "int4 decode GEMMs" in narrow.lean.row_reason


def test_a_refused_adapter_leaves_the_step_as_it_was(smol_shaped_int4_base):
    engine = _engine(smol_shaped_int4_base, {}, dtype=torch.bfloat16)
    lean = engine.lean
    step = lean.row_step
    good = _lora_rows(lean, ranks=(4, 4, 4, 4), seed=1, scale=0.3)
    step.set_adapter("good", good)
    n_layers, kv_heads, d = len(lean.layers), lean.kv_heads, lean.head_dim
    keys = [torch.zeros(2, kv_heads, 8, d, dtype=torch.bfloat16) for _ in range(n_layers)]
    values = [torch.zeros_like(k) for k in keys]
    h0 = torch.ones(1, lean.hidden, dtype=torch.bfloat16)
    first = step.step(h0.clone(), lean.cos[3].contiguous(), lean.sin[3].contiguous(), [k.clone() for k in keys], [v.clone() for v in values], 0, 3)
    bad = _lora_rows(lean, ranks=(64, 64, 64, 64), seed=2, scale=0.3)
    bad[-1][3] = (bad[-1][3][0], bad[-1][3][1][:, :-16])  # the last projection's B a block short
    with pytest.raises(ValueError, match="do not fit"):
        step.set_adapter("bad", bad)
    assert step.adapter_key == "good"
    again = step.step(h0.clone(), lean.cos[3].contiguous(), lean.sin[3].contiguous(), [k.clone() for k in keys], [v.clone() for v in values], 0, 3)
    assert torch.equal(first, again)  # the rank-64 rows checked first were never put in the table


def test_a_long_stream_crosses_the_cache_growth_on_the_kernel_within_bf16_noise_of_peft(smol_shaped_int4_base, tmp_path):
    """SmolLM2's head shape; 71 prompt tokens and 100 generated: the row's cache grows past 128
    positions while the kernel runs (it re-reads the buffers' addresses)."""
    adapters = {"a": make_random_adapter(smol_shaped_int4_base, tmp_path / "a", seed=51)}
    engine = _engine(smol_shaped_int4_base, adapters, dtype=torch.bfloat16)
    assert engine.lean.row_reason.startswith("C kernel"), engine.lean.row_reason
    plan = [([1] + list(range(900, 970)), "a"), ([1, 5, 6, 7], None)]
    requests = []
    for i, (prompt, adapter) in enumerate(plan):
        before = engine.lean.row_step.calls
        requests.append(_request(str(i), prompt, adapter, 100))
        run_engine(engine, {0: [requests[-1][0]]})
        assert engine.lean.row_step.calls - before == 99
    assert engine.kv.len_cap >= 171
    _check_bf16_against_peft(smol_shaped_int4_base, adapters, plan, requests, n=100)
