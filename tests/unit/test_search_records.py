"""training/search.py's trial records and table: a pruned trial must not show the value it reported
to the pruner (a signed eval loss, which Optuna keeps as a pruned trial's value) as its headline
metric. A real in-memory Optuna study; no model."""

from __future__ import annotations

import optuna
from rich.console import Console

from loraplex.training.search import trial_records, trials_table


def _study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        lr = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        trial.report(-0.25, 10)  # the search reports -eval_loss when maximizing
        if trial.number == 1:
            trial.report(-0.4574, 20)
            raise optuna.TrialPruned()
        trial.set_user_attr("scores", {"accuracy": 0.5 + trial.number / 10})
        return 0.5 + trial.number / 10 + lr * 0

    study.optimize(objective, n_trials=3)
    return study


def test_a_pruned_trial_has_no_metric_value_but_says_where_it_stopped():
    study = _study()
    assert study.trials[1].state == optuna.trial.TrialState.PRUNED
    records = trial_records(study)
    assert [r["number"] for r in records] == [0, 1, 2]
    pruned = records[1]
    assert pruned["state"] == "PRUNED" and pruned["value"] is None
    assert pruned["pruned_at_step"] == 20 and pruned["eval_loss_at_prune"] == 0.4574
    assert records[0]["value"] == 0.5 and records[2]["value"] == 0.7
    assert records[2]["scores"] == {"accuracy": 0.7} and "pruned_at_step" not in records[2]


def test_the_table_prints_pruned_instead_of_the_reported_loss():
    records = trial_records(_study())
    console = Console(width=200, record=True)
    console.print(trials_table(records, "accuracy", best=2))
    text = console.export_text()
    assert "pruned at step 20" in text
    assert "-0.4574" not in text and "0.4574" not in text
    assert "0.7000" in text and "2 *" in text


def test_the_prune_callback_raises_out_of_training_only_when_optuna_prunes():
    from types import SimpleNamespace

    from loraplex.training.search import _PruneOnEvalLoss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    callback = _PruneOnEvalLoss(trial, 1.0)
    control = SimpleNamespace(should_training_stop=False)
    callback.on_evaluate(None, SimpleNamespace(global_step=5), control, metrics={"eval_loss": 0.8})  # under the threshold: goes on
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {5: 0.8}
    try:
        callback.on_evaluate(None, SimpleNamespace(global_step=10), control, metrics={"eval_loss": 1.7})
    except optuna.TrialPruned as exc:
        assert "step 10" in str(exc) and "1.7000" in str(exc)
    else:
        raise AssertionError("a pruned trial must leave training (and skip scoring) by raising TrialPruned")
