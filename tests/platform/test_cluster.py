"""A local Ray started by ``ensure_ray`` serves the State API that Ray Train V2 polls."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import ray
from ray.util.state import list_nodes
from ovdlab.platform.cluster import ensure_ray
from ovdlab.platform.config import load_config

ensure_ray(load_config(None, []))
ensure_ray(load_config(None, []))  # a second call keeps the running Ray
print("nodes", len(list_nodes(address=ray.get_runtime_context().gcs_address, timeout=30)))
ray.shutdown()
"""


def test_local_ray_serves_the_state_api(tmp_path):
    """Without the dashboard, ``list_nodes`` (like Train V2's placement-group cleaner) fails."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nodes 1" in out.stdout


def test_submitted_job_warns_when_work_dir_is_in_rays_temporary_copy(tmp_path, monkeypatch, caplog):
    from ovdlab.platform.cluster import SUBMITTED_JOB_ENV, warn_if_work_dir_is_temporary
    from ovdlab.platform.config import load_config

    monkeypatch.chdir(tmp_path)
    default = load_config(None, [])  # work_dir "work" -> <cwd>/work
    assert not warn_if_work_dir_is_temporary(default)  # a user's own shell: their folder, kept
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    assert warn_if_work_dir_is_temporary(default)
    assert "pass an absolute work_dir" in caplog.text
    assert not warn_if_work_dir_is_temporary(load_config(None, ["work_dir=/shared/ovdlab"]))


def test_a_job_starts_its_own_ray_unless_told_where_one_is(monkeypatch):
    """Plain ``ray.init()`` joins the last ``ray start`` cluster of the machine (and hangs when
    it died, as a killed local head leaves its address behind); a job joins only what it is told."""
    from ovdlab.platform.cluster import ADDRESS_ENV, init_address

    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    assert init_address(None) == "local"
    assert init_address("auto") == "auto"
    monkeypatch.setenv(ADDRESS_ENV, "10.0.0.5:6379")  # what `ray job submit` sets for its entrypoint
    assert init_address(None) == "10.0.0.5:6379"
    assert init_address("ray://head:10001") == "ray://head:10001"


WORKER_ADDRESS_SCRIPT = """
import os, ray
from ovdlab.platform.cluster import init_ray

init_ray(None, num_cpus=1, include_dashboard=False)

@ray.remote(num_cpus=0.1)
def address_seen_by_a_worker():
    return os.environ.get("RAY_ADDRESS")

print("GCS", ray.get_runtime_context().gcs_address)
print("WORKER", ray.get(address_seen_by_a_worker.remote()))
print("DRIVER_PORT_ENV", os.environ.get("RAY_GCS_SERVER_PORT"))
ray.shutdown()
"""


def test_workers_of_a_local_ray_know_its_address(tmp_path):
    """With several Ray instances on a machine, Train V2's placement-group cleaner (a worker)
    resolved the wrong cluster, took the controller for dead and killed a running training."""
    out = subprocess.run([sys.executable, "-c", WORKER_ADDRESS_SCRIPT], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["WORKER"] == lines["GCS"]
    assert lines["DRIVER_PORT_ENV"] == "None"  # not left behind for later subprocesses
