"""EZSD's and CLIFF's jobs and the CLIFF sweeps, run the way a user runs them.

The contract of ``test_jobs_as_users_run_them.py``, in a module of its own: the suite's
two pytest-xdist workers take a test file each at a time (``--dist loadfile``), and
these tests share their clone (a sweep reuses the stages the CLIFF job made).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient
from user_runs import PYTHON, SHRUNK_RUN, children, experiment_runs, resumed, run_as_user, run_until_checkpoint_of

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
def test_ezsd_job_with_rpn_proposals_runs_its_recipe_and_resumes_a_killed_training(clone, tiny_overrides):
    """EZSD's proposal ablation as a user runs it: tuned teacher, the proposal detector
    (ViLD-text's run, reused when the demo test made it), a store of RPN proposals and
    ground-truth boxes, a training killed after its first checkpoint and resumed by rerun."""
    cmd = [PYTHON, "jobs/ezsd_shapes.py", *tiny_overrides, *SHRUNK_RUN, "proposals.source=rpn"]
    first = run_until_checkpoint_of("train", cmd, clone)
    assert "stage store (extract" in first
    out = run_as_user(cmd, clone)
    for stage in ("teacher (teacher)", "proposal-detector (train)", "store (extract)"):
        assert f"stage {stage}: reused" in out, out[-4000:]
    assert resumed(out) and "teacher crop accuracy base " in out and "AP50 novel" in out

    client = MlflowClient(f"sqlite:///{clone / 'work' / 'mlflow.db'}")
    job = client.get_run(re.search(r"MLflow job run (\w+)", out).group(1))
    assert job.data.tags["kind"] == "recipe" and job.data.tags["stages"] == "teacher,proposal-detector,store,train"
    runs = client.search_runs([client.get_experiment_by_name("shapes").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == job.info.run_id]
    names = [r.info.run_name for r in children]
    assert len(set(names)) == len(names), names  # one child per stage that ran here, none twice after the resume
    assert {"extract", "teacher", "train"} <= {r.data.tags.get("kind") for r in children}, names
    assert len([n for n in names if n.startswith("ezsd-shapes-") and not n.endswith(("/teacher", "/store"))]) == 1, names
    teacher = next(r for r in children if r.data.tags.get("kind") == "teacher")
    assert {"teacher/acc_novel_before", "teacher/acc_novel_after"} <= set(teacher.data.metrics)
    store = Path(next(r for r in children if r.data.tags.get("kind") == "extract").data.tags["output"])
    assert json.loads((store / "manifest.json").read_text())["proposal_source"] == "rpn"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", ["coco", "lvis"])
def test_ezsd_coco_and_lvis_jobs_in_smoke_mode(clone, kind):
    """``--smoke``: EZSD's COCO / LVIS job end to end on the layout fixture (CLIP proposals
    from the LN-tuned random tiny teacher), default work dir, own Ray."""
    out = run_as_user([PYTHON, f"jobs/ezsd_{kind}.py", "--smoke"], clone)
    for stage in ("teacher (teacher)", "store (extract)", "train (train)"):
        assert f"stage {stage}: " in out, out[-4000:]
    assert "teacher crop accuracy base " in out and f"experiment '{kind}-smoke'" in out


CLIFF = ["train.max_iter=4", "train.checkpoint_period=2", "eval.seeds=2"]
"""Phases of 1, 3 and 1 steps (``method.stage_split`` 3 : 12 : 4 of 4); two sampling seeds."""


@pytest.mark.timeout(1800)
def test_cliff_job_chains_three_phases_resumes_a_killed_one_and_evaluates_over_seeds(clone, tiny_overrides):
    """CLIFF as a user runs it: the proposal detector, stage 1, stage 2 killed after its first
    checkpoint and resumed by rerun from there, the final phase, and the evaluation over two
    sampling seeds whose mean and spread become the job's metrics."""
    cmd = [PYTHON, "jobs/cliff_shapes.py", *tiny_overrides, *CLIFF]
    first = run_until_checkpoint_of("obj-img-txt", cmd, clone)
    assert "stage obj-txt (train" in first
    out = run_as_user(cmd, clone)
    for stage in ("proposal-detector (train)", "store (extract)", "obj-txt (train)"):
        assert f"stage {stage}: reused" in out, out[-4000:]
    assert resumed(out, total=3), out[-4000:]
    assert "stage final (train): " in out and "stage eval (eval): " in out

    client = MlflowClient(f"sqlite:///{clone / 'work' / 'mlflow.db'}")
    job = client.get_run(re.search(r"MLflow job run (\w+)", out).group(1))
    assert job.data.tags["stages"] == "proposal-detector,store,obj-txt,obj-img-txt,final,eval"
    assert job.data.tags["metrics_stage"] == "eval"
    assert {"ap50_novel", "ap50_novel_std", "ap50_base_std"} <= set(job.data.metrics)
    runs = client.search_runs([client.get_experiment_by_name("shapes").experiment_id])
    evaluation = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == job.info.run_id
                      and r.data.tags.get("kind") == "eval")
    seeds = client.get_metric_history(evaluation.info.run_id, "seeds/ap50_novel")
    assert sorted(m.step for m in seeds) == [0, 1]
    mean = sum(m.value for m in seeds) / 2
    assert job.data.metrics["ap50_novel"] == pytest.approx(mean)
    # Stage 2 started from stage 1's weights and trained the image chain; stage 1 did not.
    phases = {r.data.params.get("train.max_iter"): r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == job.info.run_id and r.data.tags.get("kind") == "train"}
    assert phases["3"].data.params["method.image_chain"] == "true"
    assert phases["3"].data.params["train.init_from"].startswith(str(clone / "work" / "runs" / "cliff-shapes-"))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", ["coco", "lvis"])
def test_cliff_coco_and_lvis_jobs_in_smoke_mode(clone, kind):
    """``--smoke``: CLIFF's COCO / LVIS job end to end on the layout fixture: R50-C4's
    structure at ResNet-18, the three phases and the three-seed evaluation."""
    out = run_as_user([PYTHON, f"jobs/cliff_{kind}.py", "--smoke"], clone)
    for stage in ("proposal-detector (train)", "store (extract)", "obj-txt (train)", "obj-img-txt (train)", "final (train)", "eval (eval)"):
        assert f"stage {stage}: " in out, out[-4000:]
    assert f"experiment '{kind}-smoke'" in out


@pytest.mark.timeout(1800)
def test_cliff_steps_sweep_trial_chains_its_phases(clone, tiny_overrides):
    """CLIFF's sweep with one value: the proposal detector and store shared (the CLIFF job
    test's when it ran before on this clone), the trial's three phases and its evaluation
    over seeds."""
    cmd = [PYTHON, "jobs/sweep_cliff_steps_shapes.py", *tiny_overrides, *CLIFF, "train.eval_period=0",
           "sweep.params.method.diffusion_steps=[5]"]
    out = run_as_user(cmd, clone)
    assert "sweep cliff-steps-shapes: 1 trials" in out and "method.diffusion_steps=5: ap50_novel" in out, out[-4000:]
    assert "shared stages proposal-detector, store run once" in out  # (or reused: the CLIFF job test made them)
    client, runs = experiment_runs(clone)
    sweep = next(r for r in runs if r.data.tags.get("sweep") == "cliff-steps-shapes" and r.data.tags["kind"] == "sweep")
    trial = next(r for r in children(runs, sweep) if r.data.tags["kind"] == "trial")
    assert trial.data.tags["stages"] == "proposal-detector,store,obj-txt,obj-img-txt,final,eval"
    assert trial.data.params["method.diffusion_steps"] == "5" and "ap50_novel_std" in trial.data.metrics


@pytest.mark.timeout(1800)
def test_cliff_coco_sweep_in_smoke_mode(clone):
    """The COCO sweep of CLIFF's diffusion steps end to end on the layout fixture, one value."""
    out = run_as_user([PYTHON, "jobs/sweep_cliff_steps_coco.py", "--smoke", "sweep.params.method.diffusion_steps=[5]"], clone)
    assert "1 trials" in out and "(completed)" in out and "experiment 'coco-smoke'" in out, out[-4000:]
