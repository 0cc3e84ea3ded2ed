"""Training-step speed of fp32 vs bf16 on this machine: ``python -m loraplex.training.bench_precision``.

LoRA (r=8, every projection) training steps on the base with records of a chat file, interleaved
fp32 / bf16-autocast (fp32 weights, what ``--bf16 true`` does) / bf16-weights (base cast to bf16,
for comparison) so that load from other processes hits every mode alike. Prints seconds per step
and per-pair ratios. A measuring tool, not used by training.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a .jsonl file of OpenAI-chat records (e.g. from loraplex.training.chat_task)")
    parser.add_argument("--model_name_or_path", default="embedded")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--modes", default="fp32,autocast,bf16-weights")
    args = parser.parse_args(argv)
    from loraplex.training.cli import quiet_libraries

    quiet_libraries()
    import torch
    from peft import LoraConfig, get_peft_model

    from loraplex.server.basemodel import load_base_model, load_tokenizer, resolve_base

    ref = resolve_base(args.model_name_or_path)
    tokenizer = load_tokenizer(ref)
    with open(args.data) as fh:
        records = [json.loads(line) for _, line in zip(range(args.batch), fh)]
    enc = tokenizer([tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records], return_tensors="pt", padding=True)
    modes = [m.strip() for m in args.modes.split(",")]
    runs = {}
    for mode in modes:
        model = load_base_model(ref)
        if mode == "bf16-weights":
            model = model.to(torch.bfloat16)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
        peft_model.train()
        runs[mode] = (peft_model, torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4))

    def step(mode: str) -> float:
        model, opt = runs[mode]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            loss = model(**enc, labels=enc["input_ids"]).loss  # enc: [batch, tokens]
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - started

    for mode in modes:
        step(mode)  # warm-up (kernel selection)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.pairs):
        for mode in modes:
            times[mode].append(step(mode))
    print(f"batch {tuple(enc['input_ids'].shape)}, {args.pairs} interleaved rounds")
    for mode in modes:
        xs = sorted(times[mode])
        print(f"{mode:>13}: median {xs[len(xs) // 2]:.3f} s/step  all {[round(x, 3) for x in times[mode]]}")
    for mode in modes[1:]:
        print(f"fp32/{mode} per round: {[round(f / b, 2) for f, b in zip(times[modes[0]], times[mode])]}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
