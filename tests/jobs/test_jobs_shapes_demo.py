"""The README's main job end to end, shrunk: world, teacher, Ray Train, evaluation, MLflow."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from ovdlab.jobs import shapes_demo

DEMO = [
    "train.max_iter=6",
    "train.eval_period=3",
    "train.checkpoint_period=3",
    "tracking.run_name=demo-test",
]


@pytest.mark.slow
def test_shapes_demo_end_to_end(tmp_path, ray_local, tiny_overrides, capsys):
    """Tiny world, ``shapes-tiny`` with deterministic random weights (its pretraining has
    its own tests), two evaluations, one MLflow run with the pictures."""
    work_dir = tmp_path / "work"
    assert shapes_demo.main([f"work_dir={work_dir}"] + tiny_overrides + DEMO) == 0
    out = capsys.readouterr().out
    assert "AP50 novel" in out and "MLflow:" in out and "best checkpoint" in out

    client = MlflowClient(f"sqlite:///{work_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shapes")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'demo-test'")
    assert len(runs) == 1
    run = runs[0]
    for name in ("ap50_novel", "ap50_base", "ap50_all", "train/total_loss"):
        assert name in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ap50_all")] == [3, 6]
    assert run.data.tags["method"] == "vild-text" and run.data.tags["completed"] == "True"
    assert {"eval/detections.png", "eval/per_class_ap.png", "eval/pr_curves.png", "eval/per_class_ap.txt"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "eval")
    }


def test_bad_config_is_one_line_naming_the_field_before_any_work(tmp_path, repo_root):
    """As a user types it: exit 2, the field and the allowed values, no traceback, nothing made."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(repo_root / "jobs" / "shapes_demo.py"), "train.optimizer=adam"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "train.optimizer" in out.stderr and "sgd" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "work").exists()
