"""Every job script and every Ray-starting ``ovdlab`` command, run the way a user runs them.

The contract behind the README: a subprocess, started in a copy of the repository that
holds only its tracked files, with the **default** ``work_dir`` (``work``, relative), its
own Ray (no ``RAY_ADDRESS``, nothing shared with this test session), shrunk only by
command-line overrides. An in-process test with a shared Ray and an absolute work dir
once hid a main job that failed on every fresh clone (Ray Train workers resolved the
relative ``work`` in their own folder); the in-process tests stay, this is the contract.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from user_runs import (
    BIN,
    PYTHON,
    SHRUNK_RUN,
    TABLE,
    children,
    experiment_runs,
    only_run,
    resumed,
    run_as_user,
    run_until_checkpoint_of,
    user_env,
)

pytestmark = pytest.mark.slow

LP_OVOD_DEMO = ["lp-ovod:method.objectness_floor=0"]
DEMO_ROWS = ("vild-text", "vild", "vild-ensemble", "lp-ovod", "ezsd", "oracle")
"""Every method and the oracle; EZSD's ablation rows run in the EZSD job test (CI time)."""
"""The tiny world's RPN after 4 steps scores every proposal near 0.5: no objectness floor.
(Only a ``method.*`` override: another one would also reach LP-OVOD's borrowed proposal
detector and make it a second ViLD-text training.)"""


@pytest.mark.timeout(2400)
def test_shapes_demo_from_a_fresh_clone(clone, tiny_overrides):
    """The README's first command (after the install), shrunk to one seed: every method and
    the oracle, default work dir, own Ray, one comparison table."""
    out = run_as_user([PYTHON, "jobs/shapes_demo.py", "--seeds", "0", "--methods", ",".join(DEMO_ROWS), *tiny_overrides,
                       *SHRUNK_RUN, *LP_OVOD_DEMO], clone, timeout=2400)  # seven trainings, each with its Ray start-up
    for method in (*DEMO_ROWS, "lp-ovod w/o probe"):
        assert re.search(rf"^\| {method} \| 1 \| (\d+\.\d|n/a) \| ", out, re.M), out[-4000:]
    assert out.count("[ovdlab train] step 2/4 (50%)") == 7, "each run's progress lines reach the console once"
    assert "teacher crop accuracy base " in out  # EZSD's teacher stage
    assert "[ovdlab train] step 4: evaluating 8 val.json images" in out
    assert "shapes world: train images 24/24 (100%)" in out
    for prefix in ("vild-text-shapes-", "vild-shapes-", "vild-ensemble-shapes-", "vild-text-oracle-shapes-"):
        client, run = only_run(clone / "work" / "mlflow.db", prefix)
        assert run.data.tags["completed"] == "True" and run.data.tags["reported_checkpoint"] == "last"
        metrics = run.data.metrics
        assert {"ap50_novel_concept", "ap50_novel_comp", "ap50_base", "problems/train_annotations_skipped",
                "problems/eval_skipped_images"} <= set(metrics)
        assert (clone / "work" / "runs" / run.info.run_name / "ovdlab_run.json").is_file()
        job = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert job.data.tags["kind"] == "recipe" and job.info.run_name.endswith("-job")
    # ViLD's job: its proposal detector is the ViLD-text training (reused), then its own.
    client, vild_job = only_run(clone / "work" / "mlflow.db", "vild-shapes-", kind="recipe")
    assert vild_job.data.tags["stages"] == "proposal-detector,store,train" and "stage.proposal-detector" in vild_job.data.tags
    assert "stage proposal-detector (train): reused" in out
    assert (clone / "work" / "comparison.md").is_file()
    assert (clone / "work" / "showcase" / "lp-ovod" / "detections.png").is_file() and "held-out concept" in out


def test_ovdlab_extract_then_train_from_a_fresh_clone(clone, tiny_overrides):
    """``ovdlab extract`` fills the store with Ray Data; ``ovdlab train`` (ViLD) reuses it."""
    vild = [*tiny_overrides, "method.name=vild", "method.distill_weight=0.5", "proposals.source=gt"]
    out = run_as_user([BIN / "ovdlab", "extract", "experiments/vild_text_shapes", *vild], clone)
    store = re.search(r"region store (\S+) \(train, key (\w+)\): 24 images, \d+ regions, 0 failures", out)
    assert store, out[-4000:]
    assert Path(store.group(1)).parent == clone / "work" / "stores"
    out = run_as_user([BIN / "ovdlab", "train", "experiments/vild_text_shapes", *vild, *SHRUNK_RUN], clone)
    assert TABLE.search(out), out[-4000:]
    assert f"region store {store.group(1)} is complete; reusing it" in out
    run_id = re.search(r"MLflow: \S+ experiment 'shapes' run (\w+)", out).group(1)
    run = MlflowClient(f"sqlite:///{clone / 'work' / 'mlflow.db'}").get_run(run_id)
    assert run.info.run_name.startswith("vild-shapes-") and run.data.params["method.name"] == "vild"
    assert "train/loss_distill" in run.data.metrics


def test_bench_extract_from_a_fresh_clone(clone):
    out = run_as_user([PYTHON, "jobs/bench_extract.py", "--tiny-images", "24", "--skip-vit"], clone)
    assert "24 images, 2400 regions" in out and re.search(r"1\. pipeline / best loop   = \d+\.\d+", out), out[-4000:]
    assert (clone / "work" / "bench").is_dir()


def test_bench_train_from_a_fresh_clone(clone, tiny_overrides):
    out = run_as_user([PYTHON, "jobs/bench_train.py", "--steps", "4", "--rounds", "1", *tiny_overrides], clone)
    assert re.search(r"1\. TorchTrainer / in-process steps/s = \d+\.\d+, median of 1 rounds", out), out[-4000:]
    assert re.search(r"2\. data wait fraction under TorchTrainer = \d+\.\d+%", out)


def test_bench_roi_align_from_a_fresh_clone(clone):
    out = run_as_user([PYTHON, "jobs/bench_roi_align.py", "--steps", "2", "--rounds", "1"], clone)
    assert re.search(r"1\. step time torchvision / gather = \d+\.\d+x, median of 1 rounds", out), out[-4000:]
    match = re.search(r"largest difference: output (\S+), feature gradient (\S+)", out)
    assert match and max(float(match[1]), float(match[2])) < 1e-3, out[-4000:]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for_jobs_api(address: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=user_env(RAY_AUTH_MODE="token"),
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the local head's job API did not come up: {probe.stdout[-2000:]} {probe.stderr[-2000:]}")
        time.sleep(2)


@pytest.fixture
def local_head(tmp_path):
    """``ray start --head`` as a user starts it (token authentication is Ray's default)."""
    gcs, dashboard, client, agent_http, agent_grpc, metrics = _free_ports(6)
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}", "--disable-usage-stats"],
        env=user_env(), stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        _forget_head(gcs)


def _forget_head(gcs_port: int) -> None:
    """Remove the stopped head's address that ``ray start`` left for plain ``ray.init()`` to join."""
    from ray._common.utils import get_ray_address_file

    current = Path(get_ray_address_file(None))
    if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def test_ray_job_submit_to_a_local_head(clone, tiny_overrides, local_head, tmp_path):
    """The README's cluster line, with the client settings it documents."""
    shared = tmp_path / "shared"
    out = run_as_user(
        [BIN / "ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/shapes_demo.py",
         "--methods", "vild-text", "--seeds", "0", f"work_dir={shared}", *tiny_overrides, *SHRUNK_RUN],
        clone, RAY_AUTH_MODE="token", RAY_API_SERVER_ADDRESS=local_head,
    )
    assert TABLE.search(out) and "succeeded" in out, out[-4000:]
    only_run(shared / "mlflow.db", "vild-text-shapes-")
    info = json.loads(next((shared / "runs").glob("*/ovdlab_run.json")).read_text())
    assert info["tracking_uri"] == f"sqlite:///{shared / 'mlflow.db'}"


# The tiny world's RPN after 4 steps scores every proposal near 0.5: no floor, so that
# retrieval finds pseudo-labels at all.
LP_OVOD = ["method.objectness_floor=0", "method.retrieval_k=4", "train.distill_per_image=8"]


@pytest.mark.timeout(1800)
def test_lp_ovod_job_runs_its_recipe_and_resumes_a_killed_probe(clone, tiny_overrides):
    cmd = [PYTHON, "jobs/lp_ovod_shapes.py", *tiny_overrides, *SHRUNK_RUN, *LP_OVOD]
    first = run_until_checkpoint_of("probe", cmd, clone)
    assert "stage retrieval (post" in first
    out = run_as_user(cmd, clone)
    for stage in ("proposal-detector (train)", "store (extract)", "base (train)", "retrieval (post)"):
        assert f"stage {stage}: reused" in out, out[-4000:]
    assert resumed(out) and "stage probe (train): " in out and "reused" not in out.split("stage probe")[1].split("\n")[0]
    assert "AP50 novel" in out

    client = MlflowClient(f"sqlite:///{clone / 'work' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shapes")
    runs = client.search_runs([exp.experiment_id])
    job_id = re.search(r"MLflow job run (\w+)", out).group(1)  # the clone's demo test made other LP-OVOD jobs
    job = client.get_run(job_id)
    assert job.data.tags["kind"] == "recipe" and job.info.run_name.startswith("lp-ovod-")
    assert job.data.tags["stages"] == "proposal-detector,store,base,retrieval,probe"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == job.info.run_id]
    names = sorted(r.info.run_name for r in children)
    assert len(names) == 5 and len(set(names)) == 5, names  # one child per stage, none twice after the resume
    probe = [r for r in children if r.data.tags.get("kind") == "train" and r.info.run_name.startswith("lp-ovod-")]
    assert len(probe) == 2 and all(r.data.tags.get("completed") == "True" for r in probe)
    assert "ap50_novel" in job.data.metrics
    pseudo = next(r for r in children if r.data.tags.get("kind") == "post")
    assert Path(pseudo.data.tags["output"]).name == "pseudo_labels.json"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", ["coco", "lvis"])
def test_lp_ovod_coco_and_lvis_jobs_in_smoke_mode(clone, kind):
    """``--smoke``: the COCO / LVIS job end to end on a generated fixture in that layout
    (real category ids and names, the real converters), default work dir, own Ray."""
    out = run_as_user([PYTHON, f"jobs/lp_ovod_{kind}.py", "--smoke", "method.objectness_floor=0"], clone)
    for stage in ("proposal-detector (train)", "store (extract)", "base (train)", "retrieval (post)", "probe (train)"):
        assert f"stage {stage}: " in out, out[-4000:]
    headline = r"AP50 novel \d+\.\d \| base \d+\.\d \| all \d+\.\d" if kind == "coco" else r"  AP \d+\.\d( \| AP[rcf] )?"
    assert re.search(headline, out), out[-4000:]
    assert f"experiment '{kind}-smoke'" in out
    root = clone / "work" / "data" / f"{kind}-smoke"
    assert (root / "annotations").is_dir() and (root / "raw").is_dir()


SWEEP = ["train.distill_per_image=8", "sweep.params.method.distill_weight=[0.25,1.0]", "sweep.max_concurrent_trials=1",
         "sweep.scheduler.kind=fifo"]
"""Two trials one after the other (the second is killed), no early stopping (tiny runs tie)."""


@pytest.mark.timeout(1800)
def test_vild_sweep_runs_shared_stages_once_resumes_a_killed_driver_and_compares(clone, tiny_overrides):
    """The sweep job as a user runs it: shared stages before the trials, the driver killed
    during the second trial, the rerun keeps the finished one and resumes the other; one
    MLflow run per sweep with a child per trial; ``ovdlab compare`` over its trials."""
    cmd = [PYTHON, "jobs/sweep_vild_distill_shapes.py", *tiny_overrides, *SHRUNK_RUN, *SWEEP]
    first = run_until_checkpoint_of("", cmd, clone, marker="trial method.distill_weight=1.0 runs its recipe")
    assert "shared stages proposal-detector, store run once" in first
    assert "trial method.distill_weight=0.25 runs its recipe" in first
    out = run_as_user(cmd, clone)
    assert "resuming" in out and "trial method.distill_weight=1.0 runs its recipe" in out and resumed(out), out[-4000:]
    assert "trial method.distill_weight=0.25 runs its recipe" not in out  # finished before the kill: kept
    assert "stage proposal-detector reused" in out and "stage store reused" in out

    client, runs = experiment_runs(clone)
    sweeps = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].data.params["space.method.distill_weight"] == "values [0.25, 1.0]"
    under_sweep = children(runs, sweeps[0])
    assert sorted(r.data.tags["kind"] for r in under_sweep) == ["sweep-shared", "trial", "trial"]
    trials = [r for r in under_sweep if r.data.tags["kind"] == "trial"]
    assert len({r.info.run_name for r in trials}) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert sum(r.data.tags.get("best") == "true" for r in trials) == 1
    for trial in trials:  # each trial trained once (resumed, not restarted) and extracted nothing
        assert [r.data.tags["kind"] for r in children(runs, trial)] == ["train"]
        assert "ap50_novel" in trial.data.metrics and "time/cpu_hours" in trial.data.metrics
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "curve/ap50_novel")] == [2, 4]
    shared = next(r for r in under_sweep if r.data.tags["kind"] == "sweep-shared")
    assert sorted(shared.data.tags["stages"].split(",")) == ["proposal-detector", "store"]
    artifacts = {a.path for a in client.list_artifacts(sweeps[0].info.run_id, "sweep")}
    assert {"sweep/trials.md", "sweep/trials.json", "sweep/ap50_novel_vs_method.distill_weight.png"} <= artifacts

    table = run_as_user([BIN / "ovdlab", "compare", "--filter", "tags.sweep = 'vild-distill-shapes'"], clone)
    assert re.search(r"\| vild \| method.distill_weight=(0.25|1.0) \| 0 \|", table), table
    assert (clone / "work" / "comparison" / "sweep_vild-distill-shapes_method.distill_weight.png").is_file()


@pytest.mark.timeout(1800)
def test_vild_coco_sweep_in_smoke_mode(clone):
    """The COCO sweep of ViLD's distillation weight end to end on the layout fixture, one value."""
    out = run_as_user([PYTHON, "jobs/sweep_vild_distill_coco.py", "--smoke", "sweep.params.method.distill_weight=[0.5]"], clone)
    assert "1 trials" in out and "(completed)" in out and "experiment 'coco-smoke'" in out, out[-4000:]
