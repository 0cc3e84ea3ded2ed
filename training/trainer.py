"""Train adapters: load the base once per (base, method), train each config, publish each result.

The loop itself is Hugging Face's ``Trainer`` (schedulers, accumulation, checkpoints, resume,
early stopping, tensorboard); this module wires it to peft, our data and our store. Between two
adapters sharing a base, peft's ``unload()`` strips the LoRA layers so the same loaded base
serves the next one. Nothing here knows about serving.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.server import __version__
from loraplex.server.basemodel import BaseModelRef, load_base_model, load_tokenizer, resolve_base
from loraplex.server.basemodel.loading import bitsandbytes_problem
from loraplex.server.errors import AdapterExists
from loraplex.server.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterManifest, AdapterStore, sha256_file, write_manifest
from loraplex.server.store.manifest import EvalMetrics
from loraplex.training.config import TrainConfig, TrainInputError
from loraplex.training.data import PromptRenderer, SupervisedDataset, load_records, make_splits
from loraplex.training.evaluation import GENERATION_METRICS, generate_greedy
from loraplex.training.progress import LossProgressBar
from loraplex.training.report import plot_losses, write_report

#: Module types whose names can be LoRA targets (bitsandbytes layers subclass nn.Linear).
_EXCLUDED_TARGETS = frozenset({"lm_head"})


@dataclass
class TrainResult:
    """What one run produced and how it scored."""

    name: str
    path: Path
    metric: str
    base_score: float | None
    adapter_score: float | None
    train_loss: float | None
    eval_loss: float | None
    base_eval_loss: float | None
    global_step: int
    seconds: float
    eval_examples: int
    log_history: list[dict[str, Any]] = field(default_factory=list)


def linear_module_names(model) -> list[str]:
    """Suffixes of every Linear layer in the model's blocks (candidates for --target_modules)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            suffix = full_name.rsplit(".", 1)[-1]
            if suffix not in _EXCLUDED_TARGETS:
                names.add(suffix)
    return sorted(names)


def resolve_target_modules(cfg: TrainConfig, model) -> list[str]:
    available = linear_module_names(model)
    requested = cfg.target_module_list
    if requested is None:
        return available
    unknown = [m for m in requested if m not in available]
    if unknown:
        raise TrainInputError(
            f"--target_modules {', '.join(unknown)} not found in the base model; available linear modules: {', '.join(available)}",
            param="target_modules",
        )
    return requested


def preflight(cfg: TrainConfig) -> None:
    """Checks that need no model: fail before minutes of loading."""
    store = AdapterStore(cfg.store_root)
    target = store.path_for(cfg.adapter_name)
    if (target.exists() or target.is_symlink()) and not cfg.overwrite:
        raise AdapterExists(f"adapter {cfg.adapter_name!r} already exists at {target}; pass --overwrite to replace it")
    if cfg.method == "qlora":
        problem = bitsandbytes_problem()
        if problem:
            raise TrainInputError(f"--method qlora needs bitsandbytes, which cannot run here: {problem}", param="method")
    records = load_records(cfg.data_paths)
    make_splits(records, cfg)
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint not in ("latest", "auto"):
        if not Path(cfg.resume_from_checkpoint).is_dir():
            raise TrainInputError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: no such checkpoint folder")


def _total_steps(cfg: TrainConfig, n_train: int) -> int:
    per_epoch = max(1, math.ceil(n_train / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps)))
    return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * per_epoch))


def _resume_argument(cfg: TrainConfig) -> str | bool | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint in ("latest", "auto"):
        run_dir = cfg.resolved_checkpoint_dir
        # complete checkpoints only: a run killed while saving leaves a folder without trainer_state.json
        complete = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit()]
        if not complete:
            if cfg.resume_from_checkpoint == "auto":
                return None  # nothing to resume: start fresh (a retried Job's first attempt)
            raise TrainInputError(f"--resume_from_checkpoint latest: no complete checkpoint-* folder in {run_dir}")
        return str(max(complete, key=lambda p: int(p.name.split("-")[-1])))
    return cfg.resume_from_checkpoint


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing flags; transformers 5.x renamed gradient_ -> activation_checkpointing."""
    import inspect

    from transformers import TrainingArguments

    if not enabled:
        return {}
    params = inspect.signature(TrainingArguments.__init__).parameters
    prefix = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
    return {prefix: True, f"{prefix}_kwargs": {"use_reentrant": False}}


def _training_arguments(cfg: TrainConfig, n_train: int):
    import torch
    from transformers import TrainingArguments

    total = _total_steps(cfg, n_train)
    eval_steps = cfg.eval_steps or max(1, total // 10)
    save_steps = cfg.save_steps
    early = cfg.early_stopping_patience is not None
    if early:
        save_steps = eval_steps  # the best checkpoint must exist to be restored
    return TrainingArguments(
        output_dir=str(cfg.resolved_checkpoint_dir),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers >= 5: a float below 1 is a ratio of total steps
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        **_checkpointing_arguments(cfg.gradient_checkpointing),
        report_to=["tensorboard"] if cfg.report_to == "tensorboard" else [],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        disable_tqdm=False,
    )


def _generation_score(cfg: TrainConfig, model, tokenizer, eval_ds: SupervisedDataset) -> tuple[float, list[str]]:
    prompts = [ex.prompt for ex in eval_ds.rendered]
    references = [ex.reference for ex in eval_ds.rendered]
    max_new = cfg.max_new_tokens or min(256, max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 8)
    predictions = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.per_device_eval_batch_size)
    return GENERATION_METRICS[cfg.metric](predictions, references), predictions


def train_one(cfg: TrainConfig, ref: BaseModelRef, model, tokenizer) -> tuple[TrainResult, Any]:
    """Train one adapter on an already loaded base; returns the result and the peft model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, Trainer, set_seed
    from transformers.trainer_callback import ProgressCallback

    started = time.monotonic()
    set_seed(cfg.seed)
    records = load_records(cfg.data_paths)
    train_records, eval_records = make_splits(records, cfg)
    renderer = PromptRenderer(cfg, tokenizer)
    train_ds = SupervisedDataset(train_records, renderer, tokenizer, cfg.max_seq_length, split="train")
    eval_ds = SupervisedDataset(eval_records, renderer, tokenizer, cfg.max_seq_length, split="eval")
    targets = resolve_target_modules(cfg, model)

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    tokenizer.padding_side = "right"
    trainer = Trainer(
        model=peft_model,
        args=_training_arguments(cfg, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgressBar(cfg.adapter_name))
    if cfg.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))

    with peft_model.disable_adapter():
        base_eval_loss = trainer.evaluate()["eval_loss"]
        base_score = None
        if cfg.metric != "loss":
            base_score, _ = _generation_score(cfg, peft_model, tokenizer, eval_ds)
    output = trainer.train(resume_from_checkpoint=_resume_argument(cfg))
    eval_loss = trainer.evaluate()["eval_loss"]
    predictions: list[str] = []
    if cfg.metric == "loss":
        base_score, adapter_score = base_eval_loss, eval_loss
    else:
        adapter_score, predictions = _generation_score(cfg, peft_model, tokenizer, eval_ds)
    history = list(trainer.state.log_history)
    result = TrainResult(
        name=cfg.adapter_name,
        path=cfg.store_root / cfg.adapter_name,
        metric=cfg.metric,
        base_score=base_score,
        adapter_score=adapter_score,
        train_loss=output.training_loss,
        eval_loss=eval_loss,
        base_eval_loss=base_eval_loss,
        global_step=trainer.state.global_step,
        seconds=time.monotonic() - started,
        eval_examples=len(eval_ds),
        log_history=history,
    )
    _publish(cfg, ref, peft_model, targets, result, train_ds, eval_ds, predictions)
    return result, peft_model


def _publish(cfg, ref, peft_model, targets, result, train_ds, eval_ds, predictions) -> None:
    store = AdapterStore(cfg.store_root)
    with store.staging(cfg.adapter_name) as staged:
        peft_model.peft_config["default"].base_model_name_or_path = ref.id
        peft_model.save_pretrained(str(staged), safe_serialization=True)
        if not (staged / ADAPTER_WEIGHTS).is_file() or not (staged / ADAPTER_CONFIG).is_file():
            raise RuntimeError(f"peft did not write {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG} into {staged}")
        metrics = EvalMetrics(
            metric=cfg.metric,
            base=result.base_score,
            adapter=result.adapter_score,
            eval_examples=result.eval_examples,
            train_loss=result.train_loss,
            eval_loss=result.eval_loss,
            base_eval_loss=result.base_eval_loss,
        )
        manifest = AdapterManifest(
            name=cfg.adapter_name,
            task=cfg.task_name or cfg.adapter_name,
            base_model_id=ref.id,
            base_fingerprint=ref.fingerprint,
            rank=cfg.lora_r,
            alpha=cfg.lora_alpha,
            target_modules=tuple(targets),
            method=cfg.method,
            weights_sha256=sha256_file(staged / ADAPTER_WEIGHTS),
            training_args=cfg.to_dict(),
            metrics=metrics,
            loraplex_version=__version__,
        )
        write_manifest(staged, manifest)
        write_report(
            staged / "training_report.json",
            cfg=cfg,
            result=result,
            extra={
                "train_examples": len(train_ds),
                "eval_examples": len(eval_ds),
                "truncated_away": {"train": train_ds.dropped, "eval": eval_ds.dropped},
                "eval_samples": [
                    {"prompt": ex.prompt, "reference": ex.reference, "prediction": pred}
                    for ex, pred in list(zip(eval_ds.rendered, predictions))[:20]
                ],
            },
        )
        plot_losses(result.log_history, staged / "loss.png", title=cfg.adapter_name)
        store.publish(staged, cfg.adapter_name, overwrite=cfg.overwrite)


def train_all(configs: list[TrainConfig]) -> list[TrainResult]:
    """Train every config; the base is loaded once per (base model, method) pair."""
    for cfg in configs:
        preflight(cfg)
    results: list[TrainResult] = []
    groups: dict[tuple[str, str], list[TrainConfig]] = {}
    for cfg in configs:
        groups.setdefault((cfg.model_name_or_path, cfg.method), []).append(cfg)
    for (base_name, method), group in groups.items():
        ref = resolve_base(base_name)
        tokenizer = load_tokenizer(ref)
        model = load_base_model(ref, quantize="nf4" if method == "qlora" else "none")
        for cfg in group:
            result, peft_model = train_one(cfg, ref, model, tokenizer)
            results.append(result)
            model = peft_model.unload()  # strip LoRA layers (no merge): the untouched base for the next adapter
    return results


def results_as_json(results: list[TrainResult]) -> str:
    return json.dumps(
        [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items() if k != "log_history"}
            for r in results
        ],
        indent=2,
    )
