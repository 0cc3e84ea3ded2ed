"""Train adapters: load the base once per (base, method, precision), train each config, publish each result.

The loop itself is Hugging Face's ``Trainer`` (schedulers, accumulation, checkpoints, resume,
early stopping, tensorboard/wandb); this module wires it to peft, our data and our store. Between
two adapters sharing a base, peft's ``unload()`` strips the LoRA layers so the same loaded base
serves the next one. Base scores are taken on the bare base before peft wraps it (PiSSA/OLoRA
rewrite the base weights). Nothing here knows about serving.

Two things keep a CPU step cheap (docs/training.md, bf16): the loss projects only the positions
that carry a label onto the vocabulary (``LabelledLossTrainer``; a chat example's prompt positions
are masked, and the [tokens, vocab] logits were most of the step's waste), and ``--bf16`` holds the
frozen base in bfloat16 (``base_dtype``) instead of autocasting fp32 weights on every step, while
the LoRA weights and the optimizer state stay fp32.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loraplex.server import __version__
from loraplex.server.basemodel import BaseModelRef, load_base_model, load_tokenizer, resolve_base
from loraplex.server.basemodel.loading import bitsandbytes_problem
from loraplex.server.errors import AdapterExists
from loraplex.server.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterManifest, AdapterStore, sha256_file, write_manifest
from loraplex.server.store.manifest import EvalMetrics
from loraplex.server.store.targets import target_suffixes
from loraplex.training.config import TrainConfig, TrainInputError
from loraplex.training.data import (
    IGNORE_INDEX,
    PackedCollator,
    PackedDataset,
    PromptRenderer,
    SupervisedDataset,
    prepare_records,
)
from loraplex.training.evaluation import GENERATION_METRICS, Verdict, chance_level, generate_greedy, judge, perplexity
from loraplex.training.precision import use_bf16
from loraplex.training.quantization import INT4_BLOCK_SIZE, apply_onnx_int4_weights
from loraplex.training.progress import LossProgressBar, ThroughputMeter, peak_memory_mb
from loraplex.training.report import plot_losses, write_report

#: The hub id of the embedded base, written as ``base_model_name_or_path`` so plain peft finds it.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Initialisations that rewrite the base weights (the saved adapter is converted back to plain LoRA).
_BASE_REWRITING_INITS = frozenset({"pissa", "olora"})


@dataclass
class PreparedData:
    """Records checked before the base loads."""

    fmt: str
    train: list[dict]
    eval: list[dict]


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
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    verdict: str = "ok"
    verdict_detail: str = ""
    throughput: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    bf16: bool = False
    lora_branch: str = ""
    log_history: list[dict[str, Any]] = field(default_factory=list)


def linear_module_names(model) -> list[str]:
    """Suffixes of every Linear layer in the model's blocks (candidates for --target_modules):
    the one rule of ``store/targets.py``."""
    return target_suffixes(model)


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


def warn(message: str) -> None:
    print(f"train-adapter: warning: {message}", file=sys.stderr, flush=True)


def preflight(cfg: TrainConfig) -> PreparedData:
    """Checks that need no model (flags, store, every data record): fail before minutes of loading."""
    store = AdapterStore(cfg.store_root)
    if cfg.eval_only:
        store.existing(cfg.adapter_name)
    else:
        target = store.path_for(cfg.adapter_name)
        if (target.exists() or target.is_symlink()) and not cfg.overwrite:
            raise AdapterExists(f"adapter {cfg.adapter_name!r} already exists at {target}; pass --overwrite to replace it")
    if cfg.method == "qlora":
        problem = bitsandbytes_problem()
        if problem:
            raise TrainInputError(f"--method qlora needs bitsandbytes, which cannot run here: {problem}", param="method")
    if cfg.report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise TrainInputError("--report_to wandb needs the wandb package, which is not installed (pip install wandb)", param="report_to")
    fmt, train, evaluation = prepare_records(cfg)
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint not in ("latest", "auto"):
        if not Path(cfg.resume_from_checkpoint).is_dir():
            raise TrainInputError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: no such checkpoint folder")
    if cfg.modules_to_save_list and not cfg.eval_only:
        warn(
            f"--modules_to_save {','.join(cfg.modules_to_save_list)}: the adapter will be trained and published, but "
            "loraplex serve refuses adapters with modules_to_save: their fully trained copies of base modules would "
            "replace the shared base for every row of a mixed-adapter batch. Use it for peft/transformers elsewhere."
        )
    return PreparedData(fmt, train, evaluation)


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


def _report_to(cfg: TrainConfig) -> list[str]:
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # never reach the network from here
        os.environ.setdefault("WANDB_DIR", str(cfg.resolved_checkpoint_dir))
        os.environ.setdefault("WANDB_PROJECT", "loraplex")
        return ["wandb"]
    return [] if cfg.report_to == "none" else [cfg.report_to]


def _training_arguments(cfg: TrainConfig, n_train: int, bf16: bool):
    """``bf16`` here is transformers' autocast (fp32 weights); a base held in bf16 passes False."""
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
        run_name=cfg.adapter_name,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers >= 5: a float below 1 is a ratio of total steps
        bf16=bf16,
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
        report_to=_report_to(cfg),
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        disable_tqdm=False,
    )


# ------------------------------------------------------------------ the loss
def _keeps_masked_logits(model) -> bool:
    """Whether ``model`` projects only the hidden states a boolean ``logits_to_keep`` [B, T] selects.

    transformers gained the boolean form with ``modeling_utils.slice_logits_to_keep``; an older
    transformers, or a model whose forward has no ``logits_to_keep``, gets the full logits instead.
    """
    import inspect

    from transformers import modeling_utils

    if not hasattr(modeling_utils, "slice_logits_to_keep"):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def labelled_token_loss(model, batch: dict[str, Any], *, labelled_only: bool = True) -> tuple[Any, int, Any]:
    """Summed next-token cross-entropy over the positions whose next label is not -100.

    Returns (loss summed over those tokens, their count, the model output). With ``labelled_only``
    (and a model that supports it) only those positions are projected onto the vocabulary: the
    logits are [N, V] for the N labelled tokens instead of [B, T, V], the same loss for a fraction of
    the lm_head and softmax work. The cross-entropy runs in fp32 whatever the model's dtype.
    """
    import torch

    labels = batch["labels"]  # [B, T]; token t+1 is predicted at position t
    targets = labels[:, 1:]  # [B, T-1]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs.setdefault("use_cache", False)  # a training forward keeps no KV cache (and layer_fused refuses one)
    if labelled_only and _keeps_masked_logits(model):
        keep = torch.zeros_like(labels, dtype=torch.bool)  # [B, T]
        keep[:, :-1] = targets != IGNORE_INDEX
        output = model(**inputs, logits_to_keep=keep)
        logits = output.logits.float()  # [N, V]
        wanted = targets[keep[:, :-1]]  # [N]
        if logits.dim() != 2 or logits.shape[0] != wanted.shape[0]:
            raise RuntimeError(f"the model ignored the boolean logits_to_keep: logits {tuple(output.logits.shape)} for {wanted.shape[0]} labelled tokens")
        loss = torch.nn.functional.cross_entropy(logits, wanted, reduction="sum")
        return loss, int(wanted.shape[0]), output
    output = model(**inputs)
    logits = output.logits.float()  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum()), output


def _labelled_loss_trainer_class():
    from transformers import Trainer

    class LabelledLossTrainer(Trainer):
        """HF ``Trainer`` whose loss projects only labelled positions onto the vocabulary.

        The normalisation is the Trainer's own: divided by ``num_items_in_batch`` (labelled tokens
        across the accumulated batch) when the Trainer counts them, else a mean over this batch.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            total, count, output = labelled_token_loss(model, inputs)
            if num_items_in_batch is not None:
                loss = total / num_items_in_batch
            else:
                loss = total / max(1, count)
            return (loss, output) if return_outputs else loss

        def floating_point_ops(self, inputs):
            """The Trainer's estimate (6 x input tokens x non-embedding parameters) with the
            parameters counted once: transformers counts them again every step (4.4 ms of a 0.45 s
            bf16 step on the embedded base)."""
            ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
            if ids is None or not hasattr(self.model, "num_parameters"):
                return 0
            if getattr(self, "_flops_parameters", None) is None:
                self._flops_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * ids.numel() * self._flops_parameters

    return LabelledLossTrainer


# ------------------------------------------------------------------ scoring
def mean_eval_loss(model, eval_ds: SupervisedDataset, collator, batch_size: int) -> float:
    """Mean cross-entropy per target token over the eval split (the model's own dtype, no autocast)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(eval_ds), batch_size):
            batch = collator([eval_ds[i] for i in range(start, min(len(eval_ds), start + batch_size))])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                loss, count, _ = labelled_token_loss(model, batch)
            total += float(loss)
            tokens += count
    finally:
        if was_training:
            model.train()
    return total / max(1, tokens)


def score_model(cfg: TrainConfig, model, tokenizer, eval_ds: SupervisedDataset, collator) -> tuple[dict[str, float], list[str]]:
    """Every requested metric for ``model`` on the eval split, and its greedy predictions."""
    loss = mean_eval_loss(model, eval_ds, collator, cfg.per_device_eval_batch_size)
    scores: dict[str, float] = {"loss": loss}
    wanted = cfg.metric_list
    if "perplexity" in wanted:
        scores["perplexity"] = perplexity(loss)
    predictions: list[str] = []
    generation = cfg.generation_metrics
    if generation:
        prompts = [ex.prompt for ex in eval_ds.rendered]
        references = [ex.reference for ex in eval_ds.rendered]
        max_new = cfg.max_new_tokens or min(256, max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 8)
        predictions = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.per_device_eval_batch_size)
        for name in generation:
            scores[name] = GENERATION_METRICS[name](predictions, references)
    return scores, predictions


def compare(cfg: TrainConfig, base: dict[str, float], adapted: dict[str, float], references: list[str]) -> tuple[dict[str, dict[str, float | None]], Verdict]:
    table = {name: {"base": base.get(name), "adapter": adapted.get(name)} for name in cfg.metric_list}
    return table, judge(table, cfg.primary_metric, chance_level(references))


# --------------------------------------------------------------- training
@dataclass
class LoadedBase:
    ref: BaseModelRef
    tokenizer: Any
    model: Any
    bf16: bool
    bf16_reason: str
    quantization_aware: str = "none"
    quantized_modules: int = 0
    #: how bf16 runs: "weights" (the frozen base held in bf16), "autocast" (fp32 weights), "off"
    bf16_mode: str = "off"

    @property
    def autocast(self) -> bool:
        """Whether the Trainer must autocast (``TrainingArguments.bf16``)."""
        return self.bf16_mode == "autocast"


def bf16_mode(cfg: TrainConfig, bf16: bool) -> str:
    """How a bf16 run holds its base: "weights" where the base may be rounded to bf16, else "autocast".

    Held in bf16, the frozen base costs no per-step casts and half the memory traffic, and it is
    scored at the dtype ``loraplex serve --dtype auto`` serves on the same machine. Kept fp32 under
    autocast: an nf4 (qlora) base, a base carrying the int4 export's dequantized weights (training
    must see exactly those), and PiSSA/OLoRA, which rewrite base weights from their SVD / QR.
    """
    if not bf16:
        return "off"
    if cfg.method != "lora" or cfg.quantization_aware != "none" or cfg.init_lora_weights in _BASE_REWRITING_INITS:
        return "autocast"
    return "weights"


def use_bf16_attention(model) -> None:
    """Eager attention for a base held in bf16 on CPU.

    torch's CPU flash-attention kernel (sdpa) is several times slower in bf16 than in fp32 for
    these short sequences, its backward above all (the profile in docs/training.md: 5 of 21 s of a
    step); transformers' eager attention (bf16 matmuls, softmax in fp32) is the fastest of the three
    here and masks padding and packed examples like sdpa. CUDA keeps its implementation.
    """
    if next(model.parameters()).device.type != "cpu":
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers
        model.config._attn_implementation = "eager"


def resolve_bf16(cfg: TrainConfig) -> tuple[bool, str, str]:
    """(bf16 on?, the reason in words, bf16_mode) for this run on this machine.

    ``auto`` on a CPU takes bf16 only where the base can be held in bf16: autocast over fp32
    weights measured no clearly faster than fp32 there (docs/training.md), so an nf4 / int4-aware /
    PiSSA run stays fp32 unless ``--bf16 true`` asks for autocast.
    """
    import torch

    bf16, reason = use_bf16(cfg.bf16)
    mode = bf16_mode(cfg, bf16)
    if cfg.bf16 == "auto" and mode == "autocast" and not torch.cuda.is_available():
        return False, f"{reason}, but this run cannot hold its base in bf16 and CPU autocast is no faster than fp32", "off"
    return bf16, reason, mode


def load_base(cfg: TrainConfig) -> LoadedBase:
    ref = resolve_base(cfg.model_name_or_path)
    tokenizer = load_tokenizer(ref)
    bf16, reason, mode = resolve_bf16(cfg)
    model = load_base_model(ref, quantize="nf4" if cfg.method == "qlora" else "none", dtype="bfloat16" if mode == "weights" else None)
    if mode == "weights":
        use_bf16_attention(model)
    quantized = 0
    if cfg.quantization_aware == "onnx-int4":
        # the weights the int4 ONNX export serves, dequantized: training and both scores see them
        quantized = len(apply_onnx_int4_weights(model))
    return LoadedBase(ref, tokenizer, model, bf16, reason, cfg.quantization_aware, quantized, mode)


def lora_config_for(cfg: TrainConfig, targets: list[str]):
    from peft import LoraConfig

    init: bool | str = {"true": True, "false": False}.get(cfg.init_lora_weights, cfg.init_lora_weights)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        init_lora_weights=init,
        modules_to_save=cfg.modules_to_save_list,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _check_packing(model) -> None:
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        raise TrainInputError(
            f"--packing needs an attention implementation that masks packed examples from each other from their "
            f"position ids (sdpa or eager); this base uses {implementation!r}",
            param="packing",
        )


def base_model_reference(ref: BaseModelRef) -> str:
    """What ``adapter_config.json`` names as the base: the hub id, or the folder's absolute path."""
    if ref.is_embedded:
        return EMBEDDED_HUB_ID
    return str(ref.path) if ref.path.is_dir() and Path(ref.id).name == ref.path.name else ref.id


def train_one(
    cfg: TrainConfig,
    base: LoadedBase,
    data: PreparedData,
    *,
    publish: bool = True,
    callbacks: tuple = (),
    manifest_extra: dict[str, Any] | None = None,
    base_scores: dict[str, float] | None = None,
) -> tuple[TrainResult, Any]:
    """Train one adapter on an already loaded base; returns the result and the peft model."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import ProgressCallback

    from loraplex.training import layer_fused, lora_fused

    started = time.monotonic()
    set_seed(cfg.seed)
    model, tokenizer = base.model, base.tokenizer
    renderer = PromptRenderer(cfg, tokenizer, data.fmt)
    train_ds = SupervisedDataset(data.train, renderer, tokenizer, cfg.max_seq_length, split="train")
    eval_ds = SupervisedDataset(data.eval, renderer, tokenizer, cfg.max_seq_length, split="eval")
    targets = resolve_target_modules(cfg, model)
    tokenizer.padding_side = "right"
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    train_set: Any = train_ds
    train_collator: Callable = padded
    if cfg.packing:
        _check_packing(model)
        train_set = PackedDataset(train_ds.items, cfg.max_seq_length)
        train_collator = PackedCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id, unpacked=padded)

    references = [ex.reference for ex in eval_ds.rendered]
    if base_scores is None:  # on the bare base: PiSSA/OLoRA rewrite base weights once peft wraps them
        base_scores, _ = score_model(cfg, model, tokenizer, eval_ds, padded)

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora_config = lora_config_for(cfg, targets)
    peft_model = get_peft_model(model, lora_config)
    # on CPU one autograd node per decoder layer (layer) or per LoRA branch (fused), unless asked for peft's own forward
    if cfg.lora_branch != "layer":
        layer_fused.uninstall(peft_model)  # swapped by an earlier adapter of this --config run
    if cfg.lora_branch == "peft":
        lora_branch = "peft's LoRA forward (--lora_branch peft)"
    else:
        lora_branch = lora_fused.install(peft_model)
        if cfg.lora_branch == "layer":
            lora_branch = f"{layer_fused.install(peft_model)}; elsewhere {lora_branch}"
    initial_dir = None
    if cfg.init_lora_weights in _BASE_REWRITING_INITS and publish:
        # peft converts a PiSSA/OLoRA adapter back to plain LoRA on the original base from its initial state
        initial_dir = cfg.resolved_checkpoint_dir / "initial-adapter"
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(str(initial_dir), safe_serialization=True, save_embedding_layers=False)
        peft_model.peft_config["default"].init_lora_weights = cfg.init_lora_weights

    samples_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    meter = ThroughputMeter(samples_per_step)
    trainer = _labelled_loss_trainer_class()(
        model=peft_model,
        args=_training_arguments(cfg, len(train_set), base.autocast),
        train_dataset=train_set,
        eval_dataset=eval_ds,
        data_collator=train_collator,
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(meter)
    trainer.add_callback(LossProgressBar(cfg.adapter_name, meter))
    for callback in callbacks:
        trainer.add_callback(callback)
    if cfg.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))

    try:
        output = trainer.train(resume_from_checkpoint=_resume_argument(cfg))
    except BaseException:
        base.model = peft_model.unload()  # leave the shared base clean for whoever catches this
        raise
    adapter_scores, predictions = score_model(cfg, peft_model, tokenizer, eval_ds, padded)
    table, verdict = compare(cfg, base_scores, adapter_scores, references)
    throughput = meter.figures()
    if cfg.packing and throughput:
        # a packed row holds several examples: count examples, not rows
        per_row = train_set.examples / max(1, len(train_set))
        throughput["samples_per_second"] = round(throughput["samples_per_second"] * per_row, 3)
        throughput["examples_per_packed_row"] = round(per_row, 3)
    primary = cfg.primary_metric
    result = TrainResult(
        name=cfg.adapter_name,
        path=cfg.store_root / cfg.adapter_name,
        metric=primary,
        base_score=table[primary]["base"],
        adapter_score=table[primary]["adapter"],
        train_loss=output.training_loss,
        eval_loss=adapter_scores["loss"],
        base_eval_loss=base_scores["loss"],
        global_step=trainer.state.global_step,
        seconds=time.monotonic() - started,
        eval_examples=len(eval_ds),
        scores=table,
        verdict=verdict.status,
        verdict_detail=verdict.detail,
        throughput=throughput,
        memory=peak_memory_mb(),
        bf16=base.bf16,
        lora_branch=lora_branch,
        log_history=list(trainer.state.log_history),
    )
    if publish:
        _publish(cfg, base, peft_model, targets, result, data.fmt, train_ds, eval_ds, predictions, initial_dir, manifest_extra or {})
    return result, peft_model


def _open_permissions(folder: Path) -> None:
    """Adapter folders 0755 and files 0644: a server running as another user must read them."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _publish(cfg, base: LoadedBase, peft_model, targets, result, fmt, train_ds, eval_ds, predictions, initial_dir, manifest_extra) -> None:
    store = AdapterStore(cfg.store_root)
    with store.staging(cfg.adapter_name) as staged:
        peft_model.peft_config["default"].base_model_name_or_path = base_model_reference(base.ref)
        # embeddings are never LoRA targets here; "auto" would look the base up on the hub
        save_kwargs: dict[str, Any] = {"safe_serialization": True, "save_embedding_layers": False}
        if initial_dir is not None:
            save_kwargs["path_initial_model_for_weight_conversion"] = str(initial_dir)
        peft_model.save_pretrained(str(staged), **save_kwargs)
        if not (staged / ADAPTER_WEIGHTS).is_file() or not (staged / ADAPTER_CONFIG).is_file():
            raise RuntimeError(f"peft did not write {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG} into {staged}")
        saved = json.loads((staged / ADAPTER_CONFIG).read_text())  # PiSSA/OLoRA conversion doubles the rank
        rank = max([int(saved["r"]), *map(int, (saved.get("rank_pattern") or {}).values())])
        metrics = EvalMetrics(
            metric=result.metric,
            base=result.base_score,
            adapter=result.adapter_score,
            eval_examples=result.eval_examples,
            train_loss=result.train_loss,
            eval_loss=result.eval_loss,
            base_eval_loss=result.base_eval_loss,
            scores=result.scores,
            verdict=result.verdict,
            verdict_detail=result.verdict_detail,
        )
        manifest = AdapterManifest(
            name=cfg.adapter_name,
            task=cfg.task_name or cfg.adapter_name,
            base_model_id=base.ref.id,
            base_fingerprint=base.ref.fingerprint,
            rank=rank,
            alpha=float(saved.get("lora_alpha", cfg.lora_alpha)),
            target_modules=tuple(targets),
            method=cfg.method,
            weights_sha256=sha256_file(staged / ADAPTER_WEIGHTS),
            training_args=cfg.to_dict(),
            metrics=metrics,
            loraplex_version=__version__,
            **manifest_extra,
        )
        write_manifest(staged, manifest)
        write_report(
            staged / "training_report.json",
            cfg=cfg,
            result=result,
            extra={
                "data_format": fmt,
                "bf16": result.bf16,
                "bf16_reason": base.bf16_reason,
                "bf16_mode": base.bf16_mode,
                "lora_branch": result.lora_branch,
                "throughput": result.throughput,
                "memory": result.memory,
                "packing": cfg.packing,
                "quantization_aware": {
                    "target": base.quantization_aware,
                    "modules": base.quantized_modules,
                    "block_size": INT4_BLOCK_SIZE if base.quantization_aware == "onnx-int4" else None,
                },
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
        _open_permissions(staged)
        store.publish(staged, cfg.adapter_name, overwrite=cfg.overwrite)


def _group_key(cfg: TrainConfig) -> tuple[str, ...]:
    """Configs that can share one loaded base (its bf16 mode decides the dtype it is loaded in)."""
    return (cfg.model_name_or_path, cfg.method, cfg.quantization_aware, resolve_bf16(cfg)[2])


def train_all(configs: list[TrainConfig]) -> list[TrainResult]:
    """Train every config; the base is loaded once per (base model, method) pair."""
    prepared = [preflight(cfg) for cfg in configs]
    results: list[TrainResult] = []
    groups: dict[tuple[str, ...], list[tuple[TrainConfig, PreparedData]]] = {}
    for cfg, data in zip(configs, prepared):
        groups.setdefault(_group_key(cfg), []).append((cfg, data))
    for group in groups.values():
        base: LoadedBase | None = None
        for cfg, data in group:
            if base is None:
                base = load_base(cfg)
            base.bf16, base.bf16_reason, base.bf16_mode = resolve_bf16(cfg)  # the group's mode (its key), own reason
            if cfg.eval_only:
                results.append(evaluate_existing(cfg, base, data))
                continue
            result, peft_model = train_one(cfg, base, data)
            results.append(result)
            if cfg.init_lora_weights in _BASE_REWRITING_INITS:
                base = None  # PiSSA/OLoRA rewrote the base weights: the next adapter needs a fresh load
            else:
                base.model = peft_model.unload()  # strip LoRA layers (no merge): the untouched base for the next adapter
    return results


def evaluate_existing(cfg: TrainConfig, base: LoadedBase, data: PreparedData) -> TrainResult:
    """--eval_only: score a published adapter and the bare base on the eval records."""
    from peft import PeftModel
    from transformers import DataCollatorForSeq2Seq

    from loraplex.server.store import read_manifest

    started = time.monotonic()
    folder = AdapterStore(cfg.store_root).existing(cfg.adapter_name)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.base_fingerprint != base.ref.fingerprint:
        raise TrainInputError(
            f"adapter {cfg.adapter_name!r} was trained on base {manifest.base_model_id} (fingerprint {manifest.base_fingerprint}), "
            f"not on {base.ref.id} ({base.ref.fingerprint}); pass its base with --model_name_or_path",
            param="model_name_or_path",
        )
    tokenizer = base.tokenizer
    renderer = PromptRenderer(cfg, tokenizer, data.fmt)
    eval_ds = SupervisedDataset(data.eval, renderer, tokenizer, cfg.max_seq_length, split="eval")
    tokenizer.padding_side = "right"
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    base_scores, _ = score_model(cfg, base.model, tokenizer, eval_ds, padded)
    peft_model = PeftModel.from_pretrained(base.model, str(folder))
    try:
        adapter_scores, _ = score_model(cfg, peft_model, tokenizer, eval_ds, padded)
    finally:
        base.model = peft_model.unload()
    references = [ex.reference for ex in eval_ds.rendered]
    table, verdict = compare(cfg, base_scores, adapter_scores, references)
    primary = cfg.primary_metric
    return TrainResult(
        name=cfg.adapter_name,
        path=folder,
        metric=primary,
        base_score=table[primary]["base"],
        adapter_score=table[primary]["adapter"],
        train_loss=None,
        eval_loss=adapter_scores["loss"],
        base_eval_loss=base_scores["loss"],
        global_step=0,
        seconds=time.monotonic() - started,
        eval_examples=len(eval_ds),
        scores=table,
        verdict=verdict.status,
        verdict_detail=verdict.detail,
    )


def results_as_json(results: list[TrainResult]) -> str:
    return json.dumps(
        [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items() if k != "log_history"}
            for r in results
        ],
        indent=2,
    )
