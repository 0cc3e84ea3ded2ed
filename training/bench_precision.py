"""Training-step speed of fp32 vs bf16 on this machine: ``python -m loraplex.training.bench_precision``.

One LoRA training step (forward, backward, gradient clipping, AdamW) as ``train-adapter`` takes it:
the same data pipeline (prompt positions masked), the same LoRA config and the same loss
(``trainer.labelled_token_loss``), on one batch of the given data file. Modes, interleaved round by
round so that load from other processes hits every mode alike:

- ``fp32``: fp32 base, loss over labelled positions only (``--bf16 false``)
- ``bf16``: base held in bf16 with eager attention, LoRA and optimizer fp32, labelled positions
  only (``--bf16 true|auto``)
- ``fp32-full`` / ``autocast-full``: the step before this change (full [B, T, V] logits; autocast
  = fp32 weights under ``torch.autocast``, the former ``--bf16 true``)
- ``autocast``, ``bf16-full``, ``bf16-sdpa``: one change at a time (autocast with labelled
  positions only; a bf16 base with full logits; a bf16 base keeping torch's sdpa attention)
- ``fp32-branch``, ``bf16-branch``: ``fp32`` / ``bf16`` with one node per LoRA branch only
  (``--lora_branch fused``); ``fp32-peft``, ``bf16-peft``: with peft's own LoRA forward (its
  ``nn.Dropout`` and separate ops, ``--lora_branch peft``); every other mode runs
  ``lora_fused.install`` and ``layer_fused.install`` as ``train-adapter`` does by default

Prints seconds per step, per-round ratios to the first mode and the load average. A measuring
tool, not used by training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

MODES = ("fp32", "bf16", "fp32-full", "autocast-full", "autocast", "bf16-full", "bf16-sdpa", "fp32-branch", "bf16-branch", "fp32-peft", "bf16-peft")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a train-adapter data file (e.g. training/demo_data/sentiment.jsonl, or chat records from loraplex.training.chat_task)")
    parser.add_argument("--model_name_or_path", default="embedded")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default="fp32,bf16", help=f"comma-separated, from {', '.join(MODES)}; ratios are to the first")
    parser.add_argument("--profile", type=int, default=0, help="instead of timing, print a torch.profiler table (top N ops) of one step per mode")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes {','.join(unknown)}: unknown; choose from {', '.join(MODES)}")
    from loraplex.training.cli import quiet_libraries

    quiet_libraries()
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    from loraplex.server.basemodel import load_base_model, load_tokenizer, resolve_base
    from loraplex.training import layer_fused, lora_fused
    from loraplex.training.config import configs_from_argv
    from loraplex.training.data import IGNORE_INDEX, PromptRenderer, SupervisedDataset, prepare_records
    from loraplex.training.trainer import lora_config_for, labelled_token_loss, resolve_target_modules, use_bf16_attention

    cfg = configs_from_argv(["--model_name_or_path", args.model_name_or_path, "--data_files", args.data,
                             "--output_path", os.path.join(tempfile.gettempdir(), "bench-precision", "unused")])[0]
    fmt, train, _ = prepare_records(cfg)
    ref = resolve_base(cfg.model_name_or_path)
    tokenizer = load_tokenizer(ref)
    tokenizer.padding_side = "right"
    dataset = SupervisedDataset(train[: args.batch], PromptRenderer(cfg, tokenizer, fmt), tokenizer, cfg.max_seq_length, split="train")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    batch = collator([dataset[i] for i in range(len(dataset))])  # input_ids/attention_mask/labels: [B, T]
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    runs = {}
    for mode in modes:
        torch.manual_seed(cfg.seed)
        model = load_base_model(ref, dtype="bfloat16" if mode.startswith("bf16") else None)
        if mode.startswith("bf16") and mode != "bf16-sdpa":
            use_bf16_attention(model)  # as train-adapter does for a bf16 base
        peft_model = get_peft_model(model, lora_config_for(cfg, resolve_target_modules(cfg, model)))
        if mode.endswith("-peft"):
            branch = "peft's LoRA forward"
        else:
            branch = lora_fused.install(peft_model)
            if not mode.endswith("-branch"):
                branch = f"{layer_fused.install(peft_model)}; elsewhere {branch}"
        print(f"{mode}: {branch}")
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        runs[mode] = (peft_model, params, torch.optim.AdamW(params, lr=cfg.learning_rate, fused=cfg.optim == "adamw_torch_fused" or None))

    def step(mode: str) -> float:
        model, params, optimizer = runs[mode]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("autocast")):
            total, count, _ = labelled_token_loss(model, batch, labelled_only=not mode.endswith("-full"))
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    for mode in modes:
        step(mode)  # warm-up (kernel selection, optimizer state)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for mode in modes:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                step(mode)
            print(f"--- {mode}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
        return 0
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            times[mode].append(step(mode))
    load_after = os.getloadavg()
    print(f"batch {tuple(batch['input_ids'].shape)} ({labelled} labelled tokens), {args.rounds} interleaved rounds, "
          f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after on {os.cpu_count()} CPUs")
    for mode in modes:
        xs = sorted(times[mode])
        print(f"{mode:>13}: median {xs[len(xs) // 2]:.3f} s/step  all {[round(x, 3) for x in times[mode]]}")
    for mode in modes[1:]:
        ratios = [f / b for f, b in zip(times[modes[0]], times[mode])]
        print(f"{modes[0]}/{mode} per round: {[round(r, 2) for r in ratios]}  median {sorted(ratios)[len(ratios) // 2]:.2f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
