"""The README's main job, shrunk, in-process: world, teacher, Ray Train, evaluation, MLflow, the table."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from ovdlab.jobs import shapes_demo

SHRUNK = ["train.max_iter=6", "train.eval_period=3", "train.checkpoint_period=3"]


@pytest.mark.slow
def test_shapes_demo_end_to_end(tmp_path, ray_local, tiny_overrides, capsys):
    """Tiny world, ``shapes-tiny`` with deterministic random weights (its pretraining has
    its own tests), two evaluations, one MLflow run with the pictures, the comparison table."""
    work_dir = tmp_path / "work"
    assert shapes_demo.main(["--methods", "vild-text", "--seeds", "0", f"work_dir={work_dir}", *tiny_overrides, *SHRUNK]) == 0
    out = capsys.readouterr().out
    assert "| method | runs | AP50 novel_concept | AP50 novel_comp | AP50 novel | AP50 base | AP50 all | base named novel % | train min |" in out
    assert "| vild-text | 1 |" in out and "MLflow:" in out and "final checkpoint" in out
    assert (work_dir / "comparison.md").read_text().count("| vild-text | 1 |") == 1
    assert (work_dir / "showcase" / "vild-text" / "detections.png").is_file()

    client = MlflowClient(f"sqlite:///{work_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shapes")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["kind"] for r in runs) == ["recipe", "train"]  # the job's run, its training's
    job, run = sorted(runs, key=lambda r: r.data.tags["kind"])
    assert run.data.tags["mlflow.parentRunId"] == job.info.run_id and job.info.run_name.endswith("-job")
    assert job.data.metrics["ap50_all"] == run.data.metrics["ap50_all"]
    assert run.info.run_name.startswith("vild-text-shapes-")
    for name in ("ap50_novel", "ap50_novel_comp", "ap50_novel_concept", "ap50_base", "ap50_all", "train/total_loss"):
        assert name in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ap50_all")] == [3, 6]
    assert run.data.tags["method"] == "vild-text" and run.data.tags["completed"] == "True"
    assert run.data.tags["reported_checkpoint"] == "last"
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


def test_method_overrides_reach_only_that_methods_runs():
    """``lp-ovod:method.retrieval_k=7`` configures LP-OVOD's runs; ViLD's config has no such
    knob, so a plain override would fail there. A URL's colon is not a method prefix."""
    overrides = ["train.max_iter=5", "lp-ovod:method.retrieval_k=7", "tracking.uri=http://host:5000"]
    assert shapes_demo.overrides_for("lp-ovod", overrides) == ["train.max_iter=5", "method.retrieval_k=7",
                                                               "tracking.uri=http://host:5000"]
    assert shapes_demo.overrides_for("vild", overrides) == ["train.max_iter=5", "tracking.uri=http://host:5000"]
    assert shapes_demo.parse_args(["lp-ovod:method.retrieval_k=7"]).overrides == ["lp-ovod:method.retrieval_k=7"]
    with pytest.raises(SystemExit):
        shapes_demo.parse_args(["detic:method.kl_weight=1"])


def test_ablation_rows_run_their_own_experiment_and_take_their_methods_overrides():
    """EZSD's ablations are rows of the default table, each its own experiment config, and
    ``ezsd:`` overrides reach them as they reach EZSD's own row."""
    rows = shapes_demo.parse_args([]).methods
    assert {"ezsd", "ezsd-rpn-proposals", "ezsd-untuned-teacher"} <= set(rows) and rows[-1] == "oracle"
    assert shapes_demo.experiment("ezsd-rpn-proposals") == "experiments/ezsd_rpn_shapes"
    assert shapes_demo.experiment("ezsd") == "experiments/ezsd_shapes"
    overrides = ["ezsd:method.distill_weight=0.5", "ezsd-untuned-teacher:seed=3"]
    assert shapes_demo.overrides_for("ezsd-untuned-teacher", overrides) == ["method.distill_weight=0.5", "seed=3"]
    assert shapes_demo.overrides_for("ezsd-rpn-proposals", overrides) == ["method.distill_weight=0.5"]
    assert shapes_demo.overrides_for("ezsd", overrides) == ["method.distill_weight=0.5"]
