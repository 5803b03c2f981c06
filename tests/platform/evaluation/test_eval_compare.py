"""``ovdlab compare`` on an MLflow store made here: settings, the best per method, the spread, figures."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from ovdlab.platform.evaluation.compare import (
    best_per_method,
    compare,
    comparison_table,
    job_runs,
    settings,
    sweep_points,
)
from ovdlab.platform.tracking import Tracker


def _job(tracker: Tracker, method: str, seed: int, metrics: dict[str, float], kind: str = "recipe",
         parent: str | None = None, **params: str) -> str:
    with tracker.start_run(run_name=f"{method}-{seed}", tags={"kind": kind, "method": method}, parent_run_id=parent) as run_id:
        tracker.log_params({"seed": seed, "train.vocabulary": "base", **params})
        tracker.log_metrics({"time/train_minutes": 2.0, "time/cpu_hours": 0.1, "time/gpu_hours": 0.0, **metrics})
    return str(run_id)


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "shapes", artifact_location=(tmp_path / "artifacts").as_uri())
    for seed, (novel, base) in enumerate([(10.0, 70.0), (14.0, 74.0)]):
        _job(t, "vild-text", seed, {"ap50_novel": novel, "ap50_base": base, "ap50_all": 50.0})
        _job(t, "vild", seed, {"ap50_novel": novel + 10, "ap50_base": base - 10, "ap50_all": 50.0}, **{"method.distill_weight": "0.5"})
        _job(t, "vild", seed, {"ap50_novel": novel + 1, "ap50_base": base, "ap50_all": 50.0}, **{"method.distill_weight": "1.0"})
    _job(t, "vild-text", 0, {"ap50_novel": 80.0, "ap50_base": 95.0, "ap50_all": 90.0}, **{"train.vocabulary": "all"})
    with t.start_run(run_name="sweep", tags={"kind": "sweep", "sweep": "vild-distill", "metric": "ap50_novel"}) as sweep:
        for weight, novel in ((0.1, 5.0), (1.0, 9.0)):
            with t.start_run(run_name=f"trial-{weight}", parent_run_id=sweep,
                             tags={"kind": "trial", "method": "vild", "param.method.distill_weight": json.dumps(weight)}):
                t.log_params({"seed": 3, "method.distill_weight": weight, "train.vocabulary": "base"})
                t.log_metrics({"ap50_novel": novel, "ap50_base": 60.0, "ap50_all": 40.0})
    with t.start_run(run_name="a training", tags={"kind": "train", "method": "vild"}):
        t.log_metrics({"ap50_novel": 99.0})  # a stage's run: not a job, never a row
    return t


def test_runs_group_into_settings_over_seeds_and_each_method_shows_its_best(tracker):
    found = settings(job_runs(tracker.client, tracker.experiment_id))
    # The sweep's trial at weight 1.0 (seed 3) is a third seed of the jobs' weight-1.0 setting.
    assert sorted((s.method, len(s.runs)) for s in found) == [
        ("vild", 1), ("vild", 2), ("vild", 3), ("vild-text", 2), ("vild-text-oracle", 1)]
    rows = best_per_method(found, "ap50_novel")
    assert [(s.method, label) for s, label in rows] == [
        ("vild", "method.distill_weight=0.5"), ("vild-text", ""), ("vild-text-oracle", "")]
    table = comparison_table(rows).splitlines()
    assert table[0].startswith("| method | setting | seeds | AP50 novel | base | all |")
    assert table[2].startswith("| vild | method.distill_weight=0.5 | 0,1 | 22.0 ± 2.8 | 62.0 ± 2.8 |")
    assert table[3] == "| vild-text | - | 0,1 | 12.0 ± 2.8 | 72.0 ± 2.8 | 50.0 ± 0.0 | 2.00 | 0.10 | 0.00 |"
    assert table[4].startswith("| vild-text-oracle | - | 0 | 80.0 | 95.0 |")  # one seed: no spread


def test_compare_writes_table_and_figures_and_logs_a_comparison_run(tracker, tmp_path):
    result = compare(tracker, tmp_path / "out")
    names = sorted(p.name for p in result.files)
    assert names == ["comparison.md", "novel_vs_base.png", "sweep_vild-distill_method.distill_weight.png"]
    assert all(p.stat().st_size > 0 for p in result.files)
    assert "best setting per method by mean ap50_novel" in (tmp_path / "out" / "comparison.md").read_text()
    client = MlflowClient(tracker.uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["kind"] == "comparison"
    assert sorted(a.path for a in client.list_artifacts(result.run_id, "comparison")) == [f"comparison/{n}" for n in names]
    # The comparison run is no job: comparing again gives the same rows.
    assert compare(tracker, tmp_path / "again").table == result.table
    filtered = compare(tracker, tmp_path / "f", filter_string="params.seed = '0'")
    assert "| 0 |" in filtered.table and "0,1" not in filtered.table
    with pytest.raises(ValueError, match="no finished job runs"):
        compare(tracker, tmp_path / "none", filter_string="params.seed = '7'")


def test_a_sweep_figure_keeps_the_trials_stopped_early_from_the_sweeps_table(tracker):
    with tracker.start_run(run_name="asha", tags={"kind": "sweep", "sweep": "asha", "metric": "ap50_novel"}) as run_id:
        tracker.log_dict({"metric": "ap50_novel", "trials": [
            {"method.distill_weight": 0.1, "ap50_novel": 7.0, "completed": False, "reports": 1, "mlflow_run_id": None},
            {"method.distill_weight": 0.5, "ap50_novel": 12.0, "completed": True, "reports": 4, "mlflow_run_id": "x"},
        ]}, "sweep/trials.json")
    sweep = tracker.client.get_run(run_id)
    assert sweep_points(tracker.client, tracker.experiment_id, sweep, "ap50_novel") == {
        "method.distill_weight": [(0.1, 7.0, False), (0.5, 12.0, True)]}
    # Without the table (a sweep killed before its end): the finished trial runs.
    other = next(r for r in tracker.client.search_runs([tracker.experiment_id], "tags.sweep = 'vild-distill'"))
    assert sorted(sweep_points(tracker.client, tracker.experiment_id, other, "ap50_novel")["method.distill_weight"]) == [
        (0.1, 5.0, True), (1.0, 9.0, True)]
