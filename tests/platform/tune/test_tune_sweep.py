"""The sweep runner's parts: shared stages, concurrency, the best trial, the reports Tune gets."""

from __future__ import annotations

import math

import pytest

from ovdlab.platform.config import load_config
from ovdlab.platform.tune.config import load_sweep
from ovdlab.platform.tune.sweep import (
    TrialOutcome,
    best_trial,
    fitted_concurrency,
    shared_stages,
    trials_table,
)


def test_stages_no_swept_value_reaches_are_shared():
    assert shared_stages(load_sweep("vild_distill_shapes")) == ["proposal-detector", "store"]
    assert shared_stages(load_sweep("cliff_steps_shapes")) == ["proposal-detector", "store"]
    assert shared_stages(load_sweep("ezsd_distill_shapes")) == ["teacher", "store"]
    # LP-OVOD's base training ignores the retrieval's keys: only retrieval and probe run per trial.
    assert shared_stages(load_sweep("lp_ovod_retrieval_shapes")) == ["proposal-detector", "store", "base"]
    # The seed reaches the proposal detector (ViLD-text of the same seed) and so everything after it.
    assert shared_stages(load_sweep("vild_distill_shapes", ["sweep.params.seed=[0,1]"])) == []


def test_concurrency_is_cut_to_what_the_cluster_holds():
    sweep = load_sweep("vild_distill_shapes")
    cfg = load_config(sweep.experiment, sweep.overrides)  # a trial: 0.25 + 1 x 0.75 CPU
    assert fitted_concurrency(sweep, cfg, {"CPU": 2.0}) == 2
    assert fitted_concurrency(sweep, cfg, {"CPU": 1.5}) == 1
    assert fitted_concurrency(sweep.model_copy(update={"max_concurrent_trials": 8}), cfg, {"CPU": 64.0}) == 8
    with pytest.raises(ValueError, match="needs"):
        fitted_concurrency(sweep, cfg, {"CPU": 0.5})
    coco = load_sweep("vild_distill_coco")
    gpu_cfg = load_config(coco.experiment, coco.overrides)  # 8 workers with a GPU each
    assert fitted_concurrency(coco, gpu_cfg, {"CPU": 128.0, "GPU": 8.0}) == 1
    assert fitted_concurrency(coco, gpu_cfg, {"CPU": 128.0, "GPU": 16.0}) == 2


def _trial(weight: float, novel: float, completed: bool = True) -> TrialOutcome:
    return TrialOutcome({"method.distill_weight": weight}, {"ap50_novel": novel}, completed, reports=2)


def test_the_best_trial_is_a_completed_one():
    trials = [_trial(0.1, 30.0), _trial(0.5, 50.0, completed=False), _trial(1.0, 40.0), _trial(2.0, math.nan)]
    assert best_trial(trials, "ap50_novel", "max") is trials[2]  # the stopped trial's higher value does not count
    assert best_trial(trials, "ap50_novel", "min") is trials[0]
    assert best_trial([trials[1]], "ap50_novel", "max") is None
    sweep = load_sweep("vild_distill_shapes")
    table = trials_table(sweep, trials, trials[2]).splitlines()
    assert table[0] == "| method.distill_weight | ap50_novel | ended | best |"
    assert table[2] == "| 1.0 | 40.0 | completed | yes |" and "stopped after 2" in table[-1]


def test_only_evaluations_reach_tune(monkeypatch):
    from ovdlab.platform.tune import reporting

    monkeypatch.setattr(reporting, "_in_tune_session", lambda: True, raising=False)
    sent = []

    class Queue:
        def put(self, item):
            sent.append(item)

    callback = reporting.EvaluationsToTune.__new__(reporting.EvaluationsToTune)
    callback.metric, callback._training_actor_item_queue = "ap50_novel", Queue()
    callback.after_report(None, [{"step": 100, "loss": 1.0}], None)
    callback.after_report(None, [{"step": 200, "ap50_novel": 12.5}], None)
    assert sent == [{"step": 200, "ap50_novel": 12.5}]
    assert reporting.tune_callbacks() == []
    with reporting.reporting_to_tune("ap50_novel"):
        monkeypatch.setattr(reporting.EvaluationsToTune, "__init__", lambda self, metric: setattr(self, "metric", metric))
        assert [c.metric for c in reporting.tune_callbacks()] == ["ap50_novel"]
    assert reporting.tune_callbacks() == []
