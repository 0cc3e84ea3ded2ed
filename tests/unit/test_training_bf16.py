"""The fast training step: the loss over labelled positions only, and a bf16 base under fp32 LoRA.

References are independent of the code under test: transformers' own causal-LM loss over the full
[B, T, V] logits, and the dtypes peft/torch report for the parameters after our setup.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.training.config import configs_from_argv
from loraplex.training.trainer import _labelled_loss_trainer_class, bf16_mode, labelled_token_loss, load_base, preflight, train_one


def _tiny_causal_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _batch():
    """Two right-padded examples: prompt positions and padding masked (-100), answers labelled."""
    torch.manual_seed(1)
    input_ids = torch.randint(1, 97, (2, 12))  # [B=2, T=12]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    input_ids[1, 9:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, 7:12] = input_ids[0, 7:12]  # 5 answer tokens
    labels[1, 6:9] = input_ids[1, 6:9]  # 3 answer tokens, then padding
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_labelled_only_loss_equals_the_full_logits_loss_and_its_gradient():
    model = _tiny_causal_lm()
    batch = _batch()
    reference = model(**batch).loss  # transformers' mean over the 8 labelled next tokens
    full_sum, full_n, full_out = labelled_token_loss(model, batch, labelled_only=False)
    model.zero_grad()
    full_sum.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    part_sum, part_n, part_out = labelled_token_loss(model, batch, labelled_only=True)
    part_sum.backward()

    assert full_n == part_n == 8
    assert tuple(full_out.logits.shape) == (2, 12, 97)
    assert tuple(part_out.logits.shape) == (8, 97)  # only the labelled positions reached the lm_head
    torch.testing.assert_close(full_sum / full_n, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part_sum, full_sum, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_trainer_loss_is_normalised_like_transformers():
    model = _tiny_causal_lm()
    batch = _batch()
    compute_loss = _labelled_loss_trainer_class().compute_loss  # self is unused
    mean = compute_loss(None, model, dict(batch))
    torch.testing.assert_close(mean, model(**batch).loss, rtol=1e-5, atol=1e-6)
    # accumulated batches: the sum over this batch divided by the labelled tokens of all of them
    over_20 = compute_loss(None, model, dict(batch), num_items_in_batch=torch.tensor(20))
    torch.testing.assert_close(over_20, model(**batch, num_items_in_batch=torch.tensor(20)).loss, rtol=1e-5, atol=1e-6)
    loss, output = compute_loss(None, model, dict(batch), return_outputs=True)
    assert tuple(output.logits.shape) == (8, 97)


def _cfg(tmp_path, data, *extra):
    argv = ["--model_name_or_path", "MODEL", "--data_files", str(data), "--output_path", str(tmp_path / "adapters" / "x"),
            "--per_device_train_batch_size", "4", "--max_steps", "1", "--lora_r", "4", "--logging_steps", "1", *extra]
    return argv


@pytest.mark.parametrize(
    "extra, mode",
    [
        (["--bf16", "true"], "weights"),
        (["--bf16", "false"], "off"),
        (["--bf16", "true", "--method", "qlora"], "autocast"),
        (["--bf16", "true", "--quantization_aware", "onnx-int4"], "autocast"),
        (["--bf16", "true", "--init_lora_weights", "pissa"], "autocast"),
    ],
)
def test_bf16_mode_keeps_exact_base_weights_under_autocast(tmp_path, label_data, extra, mode):
    cfg = configs_from_argv(_cfg(tmp_path, label_data, *extra))[0]
    assert bf16_mode(cfg, cfg.bf16 == "true") == mode


def test_bf16_training_holds_the_frozen_base_in_bf16_and_lora_in_fp32(tmp_path, tiny_base, label_data):
    from transformers import TrainerCallback

    seen: dict = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["autocast"] = args.bf16
            seen["trainable"] = {p.dtype for p in model.parameters() if p.requires_grad}
            seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
            seen["n_trainable"] = sum(1 for p in model.parameters() if p.requires_grad)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen["optimizer_state"] = {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim() > 0}

    argv = _cfg(tmp_path, label_data, "--bf16", "true")
    argv[1] = str(tiny_base)
    cfg = configs_from_argv(argv)[0]
    data = preflight(cfg)
    base = load_base(cfg)
    assert base.bf16_mode == "weights" and base.autocast is False
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert base.model.config._attn_implementation == "eager"  # CPU sdpa is slow in bf16
    result, peft_model = train_one(cfg, base, data, publish=False, callbacks=(Spy(),))
    assert seen["autocast"] is False  # no autocast: the base is already bf16
    assert seen["n_trainable"] > 0 and seen["trainable"] == {torch.float32}
    assert seen["frozen"] == {torch.bfloat16}
    assert seen["optimizer_state"] == {torch.float32}
    assert result.bf16 is True and result.train_loss is not None and result.train_loss == result.train_loss  # not NaN


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], (True, "weights")),  # the default is auto
        (["--bf16", "auto", "--method", "qlora"], (False, "off")),
        (["--bf16", "true", "--method", "qlora"], (True, "autocast")),
        (["--bf16", "auto", "--quantization_aware", "onnx-int4"], (False, "off")),
    ],
)
def test_auto_on_a_bf16_cpu_takes_bf16_only_where_the_base_can_be_held_in_it(tmp_path, label_data, monkeypatch, extra, expected):
    from loraplex.training import trainer as trainer_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer_module, "use_bf16", lambda setting: (setting != "false", f"--bf16 {setting}"))  # an AMX CPU
    on, reason, mode = trainer_module.resolve_bf16(configs_from_argv(_cfg(tmp_path, label_data, *extra))[0])
    assert (on, mode) == expected and reason.startswith("--bf16 ")
