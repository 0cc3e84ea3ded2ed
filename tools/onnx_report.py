"""ONNX export quality of the demo adapters on the real base (``make onnx-report``; minutes on a
2-core CPU; writes docs/onnx/report.json, quoted in docs/onnx.md).

1. Token agreement of the int4 export with the fp32 export (which itself equals peft token for
   token: tests/slow/test_real_base.py), per adapter and for the bare base, on held-out prompts
   of each task: the answer up to EOS, and 20 tokens forced past EOS (strict).
2. Task accuracy on each adapter's full held-out split (reproduced from its training report's
   config): torch (peft ``PeftModel``) vs the int4 export served by plain onnxruntime-genai.
3. With ``--aware-adapters DIR`` (the same adapters trained with ``--quantization_aware
   onnx-int4``): a side-by-side table per adapter, plain vs int4-aware, torch vs int4, and whether
   each int4 score is within ``--tolerance`` (1 point) of the same adapter's torch score
   (``side_by_side`` in the report; printed as a markdown table).

A tool, not a package module: it uses both the training package (splits, prompts, metrics) and
the server's export, which the packages themselves must not mix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def og_greedy(model, adapters, name: str | None, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    out: list[int] = []
    while len(out) < max_new:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in eos:
            break
        out.append(token)
    return out


AWARE_SUFFIX = "-int4aware"


def side_by_side(accuracy: dict[str, dict], tolerance: float = 0.01) -> list[dict]:
    """One row per plain-trained adapter of ``accuracy`` (the report's section): its torch and int4
    scores beside those of ``NAME-int4aware`` when that was measured (else None), and whether each
    int4 score is within ``tolerance`` of the same adapter's torch score."""
    rows = []
    for name, plain in accuracy.items():
        if name.endswith(AWARE_SUFFIX):
            continue
        aware = accuracy.get(name + AWARE_SUFFIX)
        row = {
            "adapter": name,
            "metric": plain["metric"],
            "plain_torch": plain["torch"],
            "plain_int4": plain["onnx_int4"],
            "plain_int4_within_tolerance": abs(plain["onnx_int4"] - plain["torch"]) <= tolerance + 1e-9,
            "aware_torch": aware["torch"] if aware else None,
            "aware_int4_weights_in_torch": aware["manifest_adapter_score"] if aware else None,
            "aware_int4": aware["onnx_int4"] if aware else None,
            "aware_int4_within_tolerance": (abs(aware["onnx_int4"] - aware["torch"]) <= tolerance + 1e-9) if aware else None,
        }
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], tolerance: float = 0.01) -> str:
    """``side_by_side`` rows as the table docs/onnx.md quotes."""
    def fmt(x) -> str:
        return "-" if x is None else f"{x:.3f}"

    def ok(x) -> str:
        return "-" if x is None else ("yes" if x else "**no**")

    points = f"{tolerance * 100:g}"
    lines = [
        f"| adapter | metric | plain: torch | plain: onnx int4 | plain: int4 within {points} pt | int4-aware: torch | "
        f"int4-aware: int4 weights in torch | int4-aware: onnx int4 | int4-aware: int4 within {points} pt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapter']} | {r['metric']} | {fmt(r['plain_torch'])} | {fmt(r['plain_int4'])} | {ok(r['plain_int4_within_tolerance'])} | "
            f"{fmt(r['aware_torch'])} | {fmt(r['aware_int4_weights_in_torch'])} | {fmt(r['aware_int4'])} | {ok(r['aware_int4_within_tolerance'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", default="sentiment,extract,datefmt")
    parser.add_argument("--agreement-prompts", type=int, default=20, help="held-out prompts per task for token agreement")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N held-out records per task (0 = all)")
    parser.add_argument("--output", default=str(REPO / "docs" / "onnx" / "report.json"))
    parser.add_argument("--builder-option", action="append", default=[], help="for the int4 export (see loraplex export-onnx --help)")
    parser.add_argument("--agreement-only", action="store_true", help="recompute only the agreement section of an existing --output")
    parser.add_argument("--aware-adapters", default="", help="a folder of the same adapters trained with train-adapter --quantization_aware onnx-int4 "
                        "(same names); each is reported beside its plain-trained one as NAME-int4aware")
    parser.add_argument("--tolerance", type=float, default=0.01, help="int4 vs torch difference still counted as kept (default 0.01 = 1 point)")
    parser.add_argument("--table-only", action="store_true", help="measure nothing: recompute the side-by-side table of an existing --output "
                        "from its accuracy section, print it and write it back")
    args = parser.parse_args(argv)
    if args.table_only:
        out = Path(args.output)
        report = json.loads(out.read_text())
        report["side_by_side"] = {"tolerance": args.tolerance, "rows": side_by_side(report["accuracy"], args.tolerance)}
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(markdown_table(report["side_by_side"]["rows"], args.tolerance))
        return 0

    import onnxruntime_genai as og
    from peft import PeftModel

    from loraplex.server.basemodel import load_base_model, load_tokenizer, resolve_base
    from loraplex.server.onnx.engine import genai_eos_ids
    from loraplex.server.onnx.export import ExportConfig, export_onnx
    from loraplex.training.config import TrainConfig
    from loraplex.training.data import PromptRenderer, load_records, make_splits
    from loraplex.training.evaluation import GENERATION_METRICS, generate_greedy

    names = [n for n in args.adapters.split(",") if n]
    sources = {n: REPO / "adapters" / n for n in names}
    if args.aware_adapters:
        for n in list(names):
            aware = Path(args.aware_adapters) / n
            if aware.is_dir():
                sources[f"{n}{AWARE_SUFFIX}"] = aware
        names = list(sources)

    ref = resolve_base("embedded")
    tokenizer = load_tokenizer(ref)
    work = Path(tempfile.mkdtemp(prefix="loraplex-onnx-report-"))
    paths = tuple(sources[n] for n in names)
    exports = {}
    for precision in ("fp32", "int4"):
        t0 = time.perf_counter()
        options = tuple(args.builder_option) if precision == "int4" else ()
        export_onnx(ExportConfig(output_path=work / precision, adapter_paths=paths, adapter_names=tuple(names), precision=precision, builder_options=options), say=lambda line: print(line, file=sys.stderr))
        exports[precision] = (work / precision, round(time.perf_counter() - t0, 1))
    models = {}
    for precision, (folder, _) in exports.items():
        model = og.Model(str(folder))
        container = og.Adapters(model)
        for n in names:
            container.load(str(folder / f"{n}.onnx_adapter"), n)
        models[precision] = (model, container, set(genai_eos_ids(folder)))

    if not args.agreement_only:
        peft_model = PeftModel.from_pretrained(load_base_model(ref), str(paths[0]), adapter_name=names[0])
        for n, p in zip(names[1:], paths[1:]):
            peft_model.load_adapter(str(p), adapter_name=n)
        peft_model.eval()

    report: dict = {"base": {"id": ref.id, "fingerprint": ref.fingerprint}, "int4_builder_options": args.builder_option,
                    "export_seconds": {p: s for p, (_, s) in exports.items()},
                    "agreement_int4_vs_fp32": {}, "accuracy": {}}
    if args.agreement_only:
        report = {**json.loads(Path(args.output).read_text()), "agreement_int4_vs_fp32": {}}
    agreement_prompts: dict[str, list[list[int]]] = {}
    for n in names:
        train_report = json.loads((sources[n] / "training_report.json").read_text())
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in train_report["config"].items() if k in fields})
        records = load_records([REPO / f for f in cfg.data_files.split(",")])
        _, held_out = make_splits(records, cfg)
        if args.limit:
            held_out = held_out[: args.limit]
        renderer = PromptRenderer(cfg, tokenizer)
        rendered = [renderer.render(r, i) for i, r in enumerate(held_out)]
        prompts = [ex.prompt for ex in rendered]
        references = [ex.reference for ex in rendered]
        max_new = cfg.max_new_tokens or min(256, max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 8)
        metric = GENERATION_METRICS[cfg.metric]
        agreement_prompts[n] = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[: args.agreement_prompts]]
        if args.agreement_only:
            continue

        t0 = time.perf_counter()
        peft_model.set_adapter(n)
        torch_predictions = generate_greedy(peft_model, tokenizer, prompts, max_new_tokens=max_new, batch_size=16)
        torch_seconds = time.perf_counter() - t0
        model, container, eos = models["int4"]
        t0 = time.perf_counter()
        int4_predictions = [
            tokenizer.decode(og_greedy(model, container, n, tokenizer(p, add_special_tokens=False)["input_ids"], max_new, eos), skip_special_tokens=True)
            for p in prompts
        ]
        int4_seconds = time.perf_counter() - t0
        report["accuracy"][n] = {
            "metric": cfg.metric,
            "held_out_records": len(prompts),
            "torch": round(metric(torch_predictions, references), 4),
            "onnx_int4": round(metric(int4_predictions, references), 4),
            "same_prediction": round(sum(a.strip() == b.strip() for a, b in zip(torch_predictions, int4_predictions)) / len(prompts), 4),
            "manifest_adapter_score": train_report["adapter_score"],
            "seconds": {"torch_batched": round(torch_seconds, 1), "onnx_int4_one_by_one": round(int4_seconds, 1)},
        }
        print(n, report["accuracy"][n], file=sys.stderr)

    # each adapter on its own task's held-out prompts; the bare base on all of them
    everything = [p for n in names if not n.endswith(AWARE_SUFFIX) for p in agreement_prompts[n]]
    for n in [None, *names]:
        prompts_n = agreement_prompts[n] if n else everything
        full, prefix, positions, total, answers = 0, [], 0, 0, 0
        eos = models["fp32"][2]
        for prompt in prompts_n:
            # strict: 20 tokens forced past EOS; answer: what a user gets (up to EOS, at most 20 tokens)
            a = og_greedy(*models["fp32"][:2], n, prompt, 20, set())
            b = og_greedy(*models["int4"][:2], n, prompt, 20, set())
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            prefix.append(same)
            full += same == len(a)
            positions += sum(x == y for x, y in zip(a, b))
            total += len(a)
            answers += og_greedy(*models["fp32"][:2], n, prompt, 20, eos) == og_greedy(*models["int4"][:2], n, prompt, 20, eos)
        report["agreement_int4_vs_fp32"][n or "(base)"] = {
            "prompts": len(prompts_n),
            "identical_answer_up_to_eos": round(answers / len(prompts_n), 4),
            "identical_20_tokens": round(full / len(prompts_n), 4),
            "mean_identical_prefix": round(sum(prefix) / len(prefix), 2),
            "position_agreement": round(positions / total, 4),
        }
        print(n, report["agreement_int4_vs_fp32"][n or "(base)"], file=sys.stderr)
    if report.get("accuracy"):
        report["side_by_side"] = {"tolerance": args.tolerance, "rows": side_by_side(report["accuracy"], args.tolerance)}
        print(markdown_table(report["side_by_side"]["rows"], args.tolerance), file=sys.stderr)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
