"""A local Ray started by ``ensure_ray`` serves the State API that Ray Train V2 polls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


ISOLATED_IMPORT = """
import sys
sys.path.append({site!r})  # this environment's packages; their .pth files (ovdlab's editable install) unprocessed
try:
    import ovdlab
    print("BEFORE importable")
except ModuleNotFoundError:
    print("BEFORE missing")
sys.path.insert(0, {staged!r})
import importlib.util
import ovdlab.platform.cluster
assert importlib.util.find_spec("ovdlab.jobs.shapes_demo") and importlib.util.find_spec("ovdlab.methods.ezsd")
from ovdlab.platform.config import CONFIGS_DIR, load_config
print("CLUSTER", ovdlab.platform.cluster.__file__)
print("CONFIGS", CONFIGS_DIR)
print("METHOD", load_config("experiments/vild_text_shapes", []).method.name)
"""


def test_the_staged_package_imports_as_ovdlab_where_ovdlab_is_not_installed(tmp_path, repo_root):
    """What a worker node without ovdlab gets in ``py_modules``: the package, its configs, no caches."""
    import sysconfig

    from ovdlab.platform.code_shipping import stage_package

    staged = stage_package(root=tmp_path)
    assert staged.built and staged.path.name == "ovdlab"
    assert {p.name for p in staged.path.iterdir()} == {"platform", "methods", "jobs", "configs"}
    assert not list(staged.path.rglob("__pycache__")) and not list(staged.path.rglob("*.pyc"))
    tracked = subprocess.run(["git", "ls-files", "platform", "methods", "jobs", "configs"], cwd=repo_root,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked and all((staged.path / name).is_file() for name in tracked)

    script = ISOLATED_IMPORT.format(site=sysconfig.get_paths()["purelib"], staged=str(staged.path.parent))
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["BEFORE"] == "missing"
    assert Path(lines["CLUSTER"]) == staged.path / "platform" / "cluster.py"
    assert Path(lines["CONFIGS"]) == staged.path / "configs" and lines["METHOD"] == "vild-text"

    # A node with an (older) ovdlab installed still runs the shipped copy: Ray puts it on
    # the workers' PYTHONPATH, which comes before site-packages and its editable finder.
    probe = "import ovdlab.platform.cluster as c; print(c.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(staged.path.parent)})
    assert Path(out.stdout.strip()) == staged.path / "platform" / "cluster.py", out.stderr[-3000:]


def test_the_staged_package_is_reused_until_the_code_changes(tmp_path):
    from ovdlab.platform.code_shipping import stage_package

    source = tmp_path / "platform"
    (source / "__pycache__").mkdir(parents=True)
    (source / ".ipynb_checkpoints").mkdir()
    (source / "train.py").write_text("STEPS = 1\n")
    (source / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"cache")
    (source / ".ipynb_checkpoints" / "train.py").write_text("STEPS = 0\n")
    (source / "stale.pyc").write_bytes(b"cache")
    sources = {"platform": source}

    first = stage_package(sources, root=tmp_path / "staged")
    assert first.built and first.files == 1 and first.size_bytes == len("STEPS = 1\n")
    assert [p.relative_to(first.path).as_posix() for p in first.path.rglob("*") if p.is_file()] == ["platform/train.py"]
    again = stage_package(sources, root=tmp_path / "staged")
    assert not again.built and again.path == first.path and again.digest == first.digest
    (source / "train.py").write_text("STEPS = 2\n")
    changed = stage_package(sources, root=tmp_path / "staged")
    assert changed.built and changed.path != first.path
    assert (changed.path / "platform" / "train.py").read_text() == "STEPS = 2\n"


def test_the_shipped_folders_are_those_setup_py_maps_onto_ovdlab(repo_root):
    import ast

    from ovdlab.platform.code_shipping import PACKAGE, SUBPACKAGES

    tree = ast.parse((repo_root / "setup.py").read_text())
    roots = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ROOTS")
    assert roots == {name: f"{PACKAGE}.{name}" for name in SUBPACKAGES}


def test_only_a_cluster_gets_the_package_in_its_runtime_env(tmp_path, monkeypatch):
    """A local Ray runs in the driver's environment; a cluster's nodes may lack ovdlab. Inside
    ``ray job submit``, the job's own ``py_modules`` stay (Ray would refuse a second list)."""
    import json

    import ray

    from ovdlab.platform import cluster, code_shipping

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((kw, os.environ.get(cluster.OVERRIDE_JOB_RUNTIME_ENV))))
    monkeypatch.setattr(code_shipping, "staging_root", lambda: tmp_path / "staged")
    monkeypatch.chdir(tmp_path)
    for name in (cluster.ADDRESS_ENV, cluster.SUBMITTED_JOB_ENV, cluster.OVERRIDE_JOB_RUNTIME_ENV):
        monkeypatch.delenv(name, raising=False)

    cluster.init_ray("local", num_cpus=1)
    assert set(calls[0][0]["runtime_env"]) == {"env_vars"}

    cluster.init_ray("10.0.0.5:6379", runtime_env={"env_vars": {"A": "1"}})
    (staged,) = (tmp_path / "staged").glob("*/ovdlab")
    shipped = {"env_vars": {"A": "1"}, "py_modules": [str(staged)]}
    assert calls[1] == ({"address": "10.0.0.5:6379", "runtime_env": shipped}, None)

    submitted = {"runtime_env": {"working_dir": "gcs://_ray_pkg_a.zip", "py_modules": ["gcs://_ray_pkg_b.zip"]}}
    monkeypatch.setenv(cluster.SUBMITTED_JOB_ENV, json.dumps(submitted))
    monkeypatch.setenv(cluster.ADDRESS_ENV, "10.0.0.5:6379")  # what the job supervisor sets for the driver
    cluster.init_ray(None)
    assert calls[2][0]["runtime_env"] == {"py_modules": ["gcs://_ray_pkg_b.zip", str(staged)]}
    assert calls[2][1] == "1" and cluster.OVERRIDE_JOB_RUNTIME_ENV not in os.environ


def test_a_submitted_checkout_with_other_code_than_the_driver_imported_is_reported(tmp_path, monkeypatch, caplog):
    """The driver of ``ray job submit`` imports the head's installed ovdlab and ships that one."""
    import shutil

    from ovdlab.platform.code_shipping import SUBMITTED_JOB_ENV, stage_package, warn_if_working_dir_differs

    staged = stage_package(root=tmp_path / "staged")
    checkout = tmp_path / "checkout"
    shutil.copytree(staged.path, checkout)
    assert not warn_if_working_dir_differs(staged.digest, checkout)  # not a submitted job
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    assert not warn_if_working_dir_differs(staged.digest, checkout)
    assert not warn_if_working_dir_differs(staged.digest, tmp_path)  # not an ovdlab checkout
    (checkout / "platform" / "cluster.py").write_text("# edited in the submitted copy only\n")
    assert warn_if_working_dir_differs(staged.digest, checkout)
    assert "install the checkout you submit on the head node" in caplog.text
