"""Tracker against a real ``mlflow server`` on 127.0.0.1, and the fail-fast health check.

Only loopback addresses are used; the server's store and artifacts live in tmp_path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.tracking import (
    CONFIG_ARTIFACT,
    TRACKING_URI_ENV,
    Tracker,
    TrackingServerUnavailable,
    check_tracking_server,
    tracker_from_config,
)

LOOPBACK = "127.0.0.1"
SERVER_START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def loopback_no_proxy() -> Iterator[None]:
    """Keep any proxy from the environment away from 127.0.0.1."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("NO_PROXY", "no_proxy"):
            mp.setenv(name, ",".join(filter(None, [os.environ.get(name, ""), LOOPBACK, "localhost"])))
        yield


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, loopback_no_proxy: None) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` with a SQLite backend and served artifacts, both in tmp_path."""
    root = tmp_path_factory.mktemp("server")
    artifacts = root / "artifacts"
    port = _free_port()
    uri = f"http://{LOOPBACK}:{port}"
    log = (root / "server.log").open("w")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    # No job-execution consumer (it would also leave a temp dir in /dev/shm behind).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Own session: the server starts uvicorn as a child; teardown ends the whole group.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(uri):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(root / 'server.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n{(root / 'server.log').read_text()}")
            time.sleep(0.25)
        yield uri, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_tracker_logs_through_server(mlflow_server: tuple[str, Path], tmp_path: Path) -> None:
    uri, artifacts = mlflow_server
    cfg = ExperimentConfig(work_dir=str(tmp_path / "work"))
    tracker = Tracker(uri, "server-exp")
    with tracker.start_run("parent") as parent_id:
        with tracker.start_run("trial", parent_run_id=parent_id) as run_id:
            tracker.log_config(cfg)
            for step in range(3):
                tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            tracker.log_text("cat,40.0\n", "tables/ap.csv")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trial"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.tags["config_hash"] == cfg.content_hash()
    assert run.data.params["train.max_iter"] == str(cfg.train.max_iter)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    got = Path(client.download_artifacts(run_id, "tables/ap.csv", str(tmp_path)))
    assert got.read_text() == "cat,40.0\n"
    served = {p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()}
    assert any(p.endswith(f"{run_id}/artifacts/{CONFIG_ARTIFACT}") for p in served)
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_tracker_from_config_uses_env_server(
    mlflow_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _ = mlflow_server
    monkeypatch.setenv(TRACKING_URI_ENV, uri)
    cfg = ExperimentConfig(work_dir=str(tmp_path / "work"))
    tracker = tracker_from_config(cfg)
    assert tracker.uri == uri and tracker.artifact_location is None
    with tracker.start_run("from-env") as run_id:
        tracker.log_metrics({"ap50_all": 33.0})
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("shapes").experiment_id == client.get_run(run_id).info.experiment_id
    assert client.get_run(run_id).data.metrics == {"ap50_all": 33.0}
    assert not (tmp_path / "work").exists()


def test_unreachable_server_fails_fast(loopback_no_proxy: None) -> None:
    uri = f"http://{LOOPBACK}:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingServerUnavailable, match=uri) as err:
        Tracker(uri, "shapes")
    assert time.monotonic() - start < 5.0
    assert "tracking.uri" in str(err.value) and TRACKING_URI_ENV in str(err.value)


def test_silent_server_fails_within_timeout(loopback_no_proxy: None) -> None:
    """A port that accepts connections but never answers: bounded by ``timeout_s``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(1)
        uri = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingServerUnavailable, match=uri):
            check_tracking_server(uri, timeout_s=0.5)
        elapsed = time.monotonic() - start
    assert 0.4 < elapsed < 3.0


def test_disabled_tracker_never_contacts_server() -> None:
    uri = f"http://{LOOPBACK}:{_free_port()}"
    assert not Tracker(uri, "shapes", enabled=False).enabled
