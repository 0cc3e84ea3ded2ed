"""``train-adapter --search SPEC.yaml``: hyperparameter search with Optuna around one adapter config.

SPEC (the seed-style YAML of the fine-tuning workflow)::

    search_strategy: {type: random|tpe, num_trials: 6, seed: 0}
    search_space:
      learning_rate: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      lora_r: {type: int, low: 4, high: 16}
      per_device_train_batch_size: {type: choice, values: [4, 8]}

Every key of ``search_space`` is a ``train-adapter`` flag. The base is loaded once; each trial trains
on the training split and is scored on the eval split with the first ``--metric``; trials report the
eval loss at every evaluation so Optuna's median pruner can stop bad ones early. Trial 0 is the
command line's own flags, so the winner is at least as good as them. The study lives in
``<run folder>/search.db`` (SQLite): running the same command again resumes it. The best trial is
retrained with its seed (deterministic) and published with the search record in ``loraplex.json``;
``search.png`` (metric per trial) and ``search.json`` sit in the run folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from loraplex.training.config import LOSS_METRICS, TrainConfig, TrainInputError
from loraplex.training.trainer import TrainResult, load_base, preflight, score_model, train_one

STRATEGIES = ("random", "tpe")
_NOT_SEARCHABLE = frozenset({"data_files", "data_name", "data_config", "output_path", "adapter", "eval_only", "checkpoint_dir",
                             "resume_from_checkpoint", "overwrite", "model_name_or_path", "method", "metric", "train_split", "eval_split"})


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    strategy: str
    num_trials: int
    seed: int
    space: dict[str, dict[str, Any]]


def read_spec(path: Path) -> SearchSpec:
    where = f"--search {path}"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainInputError(f"{where}: not valid YAML ({exc})", param="search") from exc
    if not isinstance(raw, dict):
        raise TrainInputError(f"{where}: expected a mapping with search_strategy and search_space", param="search")
    unknown = sorted(set(raw) - {"search_strategy", "search_space"})
    if unknown:
        raise TrainInputError(f"{where}: unknown key(s) {', '.join(unknown)}; expected search_strategy and search_space", param="search")
    strategy = raw.get("search_strategy") or {}
    kind = strategy.get("type", "random")
    if kind not in STRATEGIES:
        raise TrainInputError(f"{where}: search_strategy.type {kind!r} is not one of {', '.join(STRATEGIES)}", param="search")
    trials = strategy.get("num_trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise TrainInputError(f"{where}: search_strategy.num_trials must be a positive integer, got {trials!r}", param="search")
    space = raw.get("search_space")
    if not isinstance(space, dict) or not space:
        raise TrainInputError(f"{where}: search_space must map flags to {{type: float|int|choice, ...}}", param="search")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, dist in space.items():
        if name not in fields or name in _NOT_SEARCHABLE:
            raise TrainInputError(f"{where}: search_space.{name} is not a searchable train-adapter flag", param="search")
        if not isinstance(dist, dict) or dist.get("type") not in ("float", "int", "choice"):
            raise TrainInputError(f"{where}: search_space.{name}.type must be float, int or choice", param="search")
        if dist["type"] == "choice":
            if not isinstance(dist.get("values"), list) or not dist["values"]:
                raise TrainInputError(f"{where}: search_space.{name} (choice) needs a non-empty 'values' list", param="search")
        else:
            low, high = dist.get("low"), dist.get("high")
            if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or low >= high:
                raise TrainInputError(f"{where}: search_space.{name} needs numbers low < high, got low={low!r} high={high!r}", param="search")
            if dist.get("log") and low <= 0:
                raise TrainInputError(f"{where}: search_space.{name} is log-scaled, so low must be > 0", param="search")
    return SearchSpec(kind, trials, int(strategy.get("seed", 0)), space)


def _inside(value: Any, dist: dict[str, Any]) -> bool:
    if dist["type"] == "choice":
        return value in dist["values"]
    return isinstance(value, (int, float)) and dist["low"] <= value <= dist["high"]


def _suggest(trial, name: str, dist: dict[str, Any]) -> Any:
    if dist["type"] == "float":
        return trial.suggest_float(name, float(dist["low"]), float(dist["high"]), log=bool(dist.get("log", False)))
    if dist["type"] == "int":
        return trial.suggest_int(name, int(dist["low"]), int(dist["high"]), log=bool(dist.get("log", False)))
    return trial.suggest_categorical(name, dist["values"])


class _PruneOnEvalLoss:
    """A Trainer callback: reports eval loss to the trial and, when Optuna prunes it, raises
    ``optuna.TrialPruned`` out of training, so a pruned trial is not scored (greedy decoding of the
    eval split) for nothing; ``train_one`` unloads the LoRA from the shared base on the way out."""

    def __new__(cls, trial, sign: float):
        import optuna
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                if metrics and "eval_loss" in metrics:
                    trial.report(sign * metrics["eval_loss"], state.global_step)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"trial {trial.number} pruned at step {state.global_step} (eval loss {metrics['eval_loss']:.4f})")

        return Callback()


def _plot(trials: list[dict[str, Any]], metric: str, maximize: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(t["number"], t["value"]) for t in trials if t["value"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if done:
        xs, ys = zip(*done)
        ax.scatter(xs, ys, label=f"{metric} per trial")
        best, running = [], None
        for y in ys:
            running = y if running is None else (max(running, y) if maximize else min(running, y))
            best.append(running)
        ax.step(xs, best, where="post", label="best so far", color="C1")
    pruned = [t["number"] for t in trials if t["state"] == "PRUNED"]
    for x in pruned:
        ax.axvline(x, color="grey", alpha=0.3)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"search: {metric} on the eval split" + (" (grey: pruned)" if pruned else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def trial_records(study) -> list[dict[str, Any]]:
    """The finished trials of ``study`` as plain records. A pruned trial has no headline metric:
    Optuna stores the last value it reported (here the signed eval loss) as its value, which must
    not be shown or plotted as the metric; it gets ``value: None`` and the step and eval loss it was
    stopped at instead."""
    import optuna

    records = []
    for t in study.trials:
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            continue
        record: dict[str, Any] = {"number": t.number, "state": t.state.name, "params": t.params, "value": t.value, "scores": t.user_attrs.get("scores")}
        if t.state == optuna.trial.TrialState.PRUNED:
            step = max(t.intermediate_values) if t.intermediate_values else None
            record["value"] = None
            record["pruned_at_step"] = step
            record["eval_loss_at_prune"] = abs(t.intermediate_values[step]) if step is not None else None
        records.append(record)
    return records


def trials_table(trials: list[dict[str, Any]], metric: str, best: int | None):
    from rich.table import Table

    names = sorted({k for t in trials for k in t["params"]})
    table = Table(title=f"search trials ({metric} on the eval split)")
    for column in ("trial", "state", *names, metric):
        table.add_column(column, no_wrap=True)
    for t in trials:
        mark = " *" if t["number"] == best else ""
        values = [f"{t['params'][n]:.3g}" if isinstance(t["params"].get(n), float) else str(t["params"].get(n, "")) for n in names]
        if t["value"] is not None:
            score = f"{t['value']:.4f}"
        elif t.get("pruned_at_step") is not None:
            score = f"pruned at step {t['pruned_at_step']}"
        else:
            score = "-"
        table.add_row(f"{t['number']}{mark}", t["state"], *values, score)
    return table


def run_search(cfg: TrainConfig, spec_path: Path, console) -> TrainResult:
    import optuna

    spec = read_spec(spec_path)
    if cfg.init_lora_weights in ("pissa", "olora"):
        raise TrainInputError("--search loads the base once; --init_lora_weights pissa/olora rewrite it, so they cannot be searched", param="init_lora_weights")
    data = preflight(cfg)  # every data check before the base loads
    run_dir = cfg.resolved_checkpoint_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    metric = cfg.primary_metric
    maximize = metric not in LOSS_METRICS
    storage = f"sqlite:///{(run_dir / 'search.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=cfg.adapter_name,
        storage=storage,
        load_if_exists=True,
        direction="maximize" if maximize else "minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    sampler_seed = spec.seed + len(finished)  # a resumed study must not replay the first suggestions
    study.sampler = optuna.samplers.RandomSampler(seed=sampler_seed) if spec.strategy == "random" else optuna.samplers.TPESampler(seed=sampler_seed)
    if not study.trials:  # trial 0: the flags as given, where they lie inside the space (the rest sampled)
        study.enqueue_trial({name: getattr(cfg, name) for name, dist in spec.space.items() if _inside(getattr(cfg, name), dist)})

    base = load_base(cfg)
    base_scores_holder: dict[str, Any] = {}

    def trial_config(params: dict[str, Any], number: int) -> TrainConfig:
        try:
            return dataclasses.replace(cfg, **params, checkpoint_dir=str(run_dir / f"trial-{number}"), resume_from_checkpoint=None).validate()
        except TypeError as exc:
            raise TrainInputError(f"--search: a suggested value does not fit its flag ({exc})", param="search") from exc

    def objective(trial) -> float:
        params = {name: _suggest(trial, name, dist) for name, dist in spec.space.items()}
        trial_cfg = trial_config(params, trial.number)
        if not base_scores_holder:
            from transformers import DataCollatorForSeq2Seq

            from loraplex.training.data import IGNORE_INDEX, PromptRenderer, SupervisedDataset

            renderer = PromptRenderer(cfg, base.tokenizer, data.fmt)
            eval_ds = SupervisedDataset(data.eval, renderer, base.tokenizer, cfg.max_seq_length, split="eval")
            base.tokenizer.padding_side = "right"
            collator = DataCollatorForSeq2Seq(base.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
            base_scores_holder.update(score_model(cfg, base.model, base.tokenizer, eval_ds, collator)[0])
        pruner = _PruneOnEvalLoss(trial, -1.0 if maximize else 1.0)
        # a pruned trial leaves through optuna.TrialPruned, raised by the callback (train_one unloads first)
        result, peft_model = train_one(trial_cfg, base, data, publish=False, callbacks=(pruner,), base_scores=dict(base_scores_holder))
        base.model = peft_model.unload()
        trial.set_user_attr("scores", result.scores)
        return float(result.adapter_score)

    remaining = spec.num_trials - len(finished)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    trials = trial_records(study)
    completed = [t for t in trials if t["state"] == "COMPLETE"]
    if not completed:
        raise TrainInputError("--search: every trial was pruned or failed; nothing to publish", param="search")
    best = study.best_trial
    console.print(trials_table(trials, metric, best.number))
    _plot(trials, metric, maximize, run_dir / "search.png")
    record = {
        "strategy": spec.strategy,
        "num_trials": spec.num_trials,
        "metric": metric,
        "direction": "maximize" if maximize else "minimize",
        "best_trial": best.number,
        "best_params": best.params,
        "best_value": best.value,
        "trials": trials,
        "storage": str(run_dir / "search.db"),
        "plot": str(run_dir / "search.png"),
        "base_loads": 1,
    }
    (run_dir / "search.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    final_cfg = dataclasses.replace(cfg, **best.params).validate()
    result, peft_model = train_one(final_cfg, base, data, base_scores=dict(base_scores_holder), manifest_extra={"search": record})
    base.model = peft_model.unload()
    return result
