"""How the job tests run a job: as a user in a shell, from a clone, and what they read back.

Shared by the job-test modules (``pythonpath`` in pyproject.toml puts this folder on
``sys.path``); see ``test_jobs_as_users_run_them.py`` for the contract.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

PYTHON = sys.executable
BIN = Path(sys.executable).parent
SHRUNK_RUN = ["train.max_iter=4", "train.eval_period=2", "train.checkpoint_period=2"]
TABLE = re.compile(r"AP50 novel \d+\.\d \| base \d+\.\d \| all \d+\.\d")


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no Ray address, offline hub, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"}}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def run_as_user(cmd: list[str], cwd: Path, timeout: int = 900, **env: str) -> str:
    """Run ``cmd`` in ``cwd``; its combined output, after asserting it exited 0."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=user_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-8000:]}"
    return done.stdout


def only_run(db: Path, name_prefix: str, kind: str = "train"):
    """The one MLflow run of ``kind`` (``train``, or ``recipe`` for a job's parent run) named so."""
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("shapes")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.info.run_name.startswith(name_prefix) and r.data.tags.get("kind") == kind]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def resumed(out: str, total: int = 4) -> bool:
    """Whether the rerun continued the killed training from a checkpoint (step 2, or the
    last step when the killed run had already written its last one before the kill landed)."""
    return re.search(rf"resuming at step (2|{total})/{total}", out) is not None


REPORT_GRACE_S = 2.0


def run_until_checkpoint_of(stage: str, cmd: list[str], cwd: Path, timeout: float = 900, marker: str | None = None) -> str:
    """Start ``cmd``; once its train stage ``stage`` (or the first training after the line
    ``marker``) has reported its first checkpoint, SIGKILL its whole process group (driver
    and its local Ray). Returns the output up to then.

    The kill waits for the worker's report line and ``REPORT_GRACE_S`` more: the line that
    the checkpoint was written comes before Ray Train's controller records it, and a kill
    in between (seen on a loaded machine) leaves a run that restarts instead of resuming.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    in_probe = False
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            in_probe = in_probe or (marker or f"stage {stage} (train") in line
            if in_probe and "Reporting training result" in line:
                time.sleep(REPORT_GRACE_S)
                break
            assert time.time() < deadline, "".join(lines[-200:])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert in_probe, "".join(lines[-200:])
    return "".join(lines)


def experiment_runs(clone: Path, name: str = "shapes") -> tuple[MlflowClient, list]:
    """The MLflow client of the clone's default work dir and every run of experiment ``name``."""
    client = MlflowClient(f"sqlite:///{clone / 'work' / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=5000)


def children(runs: list, parent) -> list:
    """The runs among ``runs`` whose parent is ``parent``."""
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
