"""A job submitted with ``ray job submit --working-dir .`` runs on a node that never installed ovdlab.

The README's cluster section, on this machine: an ``mlflow server``, a head node started
by ``ray start --head`` from this test's environment with no CPUs (so nothing that needs
one can run there), and a second node started by ``ray start --address`` from a fresh
virtualenv that sees this environment's packages (Ray, torch, ...) but not ovdlab's
editable install. Token authentication is on for every process, as on a real cluster.
Whatever of the job needs a CPU (its tasks, Ray Data actors, Ray Train workers) can only
run on the second node, so the job succeeds only if the code it ships
(``platform/code_shipping.py``) reaches it; a control job that ships nothing fails there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ovdlab.platform.code_shipping import CONFIGS, SUBPACKAGES, content_digest, package_files

pytestmark = pytest.mark.slow

JOB = "jobs/cliff_shapes.py"
"""The submitted job: CLIFF's recipe extracts a store with Ray Data, trains three phases with
Ray Train and evaluates over sampling seeds."""
JOB_OVERRIDES = ["train.max_iter=4", "train.checkpoint_period=2", "proposals.source=gt"]
"""The job's own overrides after the tiny world's (``tiny_overrides``): phases of 1, 3 and 1
steps; the base boxes as the class-agnostic regions (no proposal detector to train first)."""
ACTORS_ON_NODE_2 = ("RayTrainWorker", "MapWorker")
"""Class names (prefixes) of the job's actors that must have run on node 2: Ray Train's
training workers and Ray Data's model actors (``MapWorker(MapBatches(...))``)."""
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120.0
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port")


@dataclass(frozen=True)
class Cluster:
    """What the test uses of the running cluster."""

    api: str
    """The head's dashboard URL: what ``RAY_API_SERVER_ADDRESS`` names for ``ray job submit``."""
    client_env: dict[str, str]
    worker_node_id: str
    worker_python: Path
    worker_temp_dir: Path


def fresh_python(venv: Path) -> Path:
    """A new virtualenv's python that imports this environment's packages but not ovdlab.

    Its site-packages holds a ``.pth`` line naming this environment's site-packages: that
    folder lands on ``sys.path``, but the ``.pth`` files inside it are not processed, so
    the finder of ovdlab's editable install is never installed.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(site) / "shared_packages.pth").write_text("".join(f"{path}\n" for path in ours))
    return python


def shell_env(token: Path, path_first: Path) -> dict[str, str]:
    """A shell on a cluster machine: token authentication, no Ray or MLflow address, nothing
    on ``PYTHONPATH``, ``path_first`` (a venv's bin) at the head of ``PATH``."""
    dropped = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "PYTHONPATH",
               "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    path = [entry for entry in env.get("PATH", "").split(os.pathsep) if entry and Path(entry) != BIN]
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), LOOPBACK, "localhost"]))
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg", NO_PROXY=no_proxy, no_proxy=no_proxy,
               PATH=os.pathsep.join([str(path_first), *path]))
    return env


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind((LOOPBACK, 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


@contextmanager
def running(cmd: list, log: Path, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen]:
    """``cmd`` in a session of its own; on exit it and every process it started are ended."""
    with log.open("w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        end_process_tree(proc)


def end_process_tree(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM (``ray start --block`` then stops its node's processes), then SIGKILL to every
    process still in its session (Ray's daemons and workers never leave it)."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    for pid in command_lines():
        with suppress(ProcessLookupError):
            if os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)


def command_lines() -> dict[int, list[str]]:
    """pid -> command line of every process on this machine (Linux ``/proc``)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
    return found


def kill_processes_mentioning(marker: str) -> list[str]:
    """Kill every process whose command line names ``marker`` (a Ray node's temp dir); their command lines."""
    killed = []
    for pid, cmdline in command_lines().items():
        if pid != os.getpid() and any(marker in arg for arg in cmdline):
            killed.append(" ".join(cmdline))
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return killed


def ray_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


def wait_until(ready, what: str, log: Path, timeout_s: float = START_TIMEOUT_S):
    """``ready()``'s first truthy value, polled until ``timeout_s``; the log in the failure."""
    deadline = time.monotonic() + timeout_s
    while not (value := ready()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not up after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return value


def alive_nodes(env: dict[str, str]) -> list[dict]:
    """The cluster's alive nodes; none while the State API is not up yet (an error, or the
    plain-text "No resource in the cluster" that ``ray list`` prints for an empty table)."""
    listed = ray_cli(env, "list", "nodes", "--format", "json", "--detail")
    if listed.returncode != 0 or not listed.stdout.lstrip().startswith("["):
        return []
    return [n for n in json.loads(listed.stdout) if n["state"] == "ALIVE"]


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1: SQLite backend, artifacts served, both in tmp_path."""
    root = tmp_path / "mlflow"
    root.mkdir()
    (port,) = free_ports(1)
    uri = f"http://{LOOPBACK}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", port, "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", root / "artifacts"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with running(cmd, root / "server.log", env, root) as proc:
        wait_until(lambda: healthy(uri) or proc.poll() is not None, "mlflow server", root / "server.log")
        assert proc.poll() is None, (root / "server.log").read_text()[-4000:]
        yield uri


@pytest.fixture
def two_node_cluster(tmp_path) -> Iterator[Cluster]:
    """A head without CPUs from this environment and a 2-CPU node from a fresh venv without ovdlab."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    worker_python = fresh_python(tmp_path / "worker-venv")
    head_env, worker_env = shell_env(token, BIN), shell_env(token, worker_python.parent)
    # Ray's Unix sockets live under the temp dir; pytest's tmp_path is too long for them.
    temp_root = Path(tempfile.mkdtemp(prefix="ovr-", dir="/tmp"))
    gcs, dashboard, client, *head_ports = free_ports(3 + len(NODE_PORTS))
    worker_ports = free_ports(len(NODE_PORTS))
    api = f"http://{LOOPBACK}:{dashboard}"
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, temp_root, ignore_errors=True)
        stack.callback(kill_processes_mentioning, str(temp_root))
        head_log = tmp_path / "head.log"
        stack.enter_context(running(
            [BIN / "ray", "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs}",
             "--num-cpus=0", "--num-gpus=0", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", *node_ports(head_ports), "--object-store-memory=200000000",
             f"--temp-dir={temp_root / 'head'}", "--disable-usage-stats"],
            head_log, head_env, tmp_path,
        ))
        client_env = {**head_env, "RAY_API_SERVER_ADDRESS": api}
        wait_until(lambda: ray_cli(client_env, "job", "list").returncode == 0, "the head's job API", head_log)
        worker_log = tmp_path / "worker.log"
        stack.enter_context(running(
            [worker_python, "-m", "ray.scripts.scripts", "start", "--block", f"--address={LOOPBACK}:{gcs}",
             f"--node-ip-address={LOOPBACK}", "--num-cpus=2", "--num-gpus=0", *node_ports(worker_ports),
             "--object-store-memory=400000000", f"--temp-dir={temp_root / 'worker'}", "--disable-usage-stats"],
            worker_log, worker_env, tmp_path,
        ))
        workers = wait_until(lambda: [n for n in alive_nodes(client_env) if not n["is_head_node"]], "node 2",
                             worker_log)
        yield Cluster(api, client_env, workers[0]["node_id"], worker_python, temp_root / "worker")


def node_ports(ports: list[int]) -> list[str]:
    """Every port a node's daemons bind, chosen free (two nodes share this machine and Ray's
    defaults); workers bind ports the OS picks."""
    flags = [f"--{name}={port}" for name, port in zip(NODE_PORTS, ports, strict=True)]
    return [*flags, "--min-worker-port=0", "--max-worker-port=0"]


def raylet_worker_command(cluster: Cluster) -> str:
    """The command node 2's raylet starts its Python workers with."""
    for cmdline in command_lines().values():
        if cmdline[0].endswith("/raylet") and any(str(cluster.worker_temp_dir) in arg for arg in cmdline):
            return next(arg for arg in cmdline if arg.startswith("--python_worker_command="))
    raise AssertionError("node 2's raylet is not running")


IMPORT_ON_A_WORKER = "import ray; ray.init(); print(ray.get(ray.remote(lambda: str(__import__('ovdlab'))).remote()))"
"""A driver that imports ovdlab in a task (which needs a CPU, so runs on node 2) without shipping it."""


def submit(clone: Path, cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    """``ray job submit [options] --working-dir . -- <entrypoint>`` from the clone; options end at ``python``."""
    split = args.index("python")
    return subprocess.run([BIN / "ray", "job", "submit", *args[:split], "--working-dir", ".", "--", *args[split:]],
                          cwd=clone, env=cluster.client_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1000)


@pytest.mark.timeout(1200)
def test_a_submitted_job_runs_on_a_node_without_ovdlab(clone, tiny_overrides, mlflow_server, two_node_cluster, tmp_path,
                                                       monkeypatch):
    cluster = two_node_cluster
    # Node 2's Python has the job's dependencies but no ovdlab, and its raylet starts workers with it.
    assert subprocess.run([cluster.worker_python, "-c", "import ray, torch, mlflow"], cwd=tmp_path).returncode == 0
    missing = subprocess.run([cluster.worker_python, "-c", "import ovdlab"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert "No module named 'ovdlab'" in missing.stderr, missing.stderr
    assert f"--python_worker_command={cluster.worker_python} " in raylet_worker_command(cluster)

    # The control: the job's working dir (the repository) alone does not give node 2 ovdlab.
    control = submit(clone, cluster, "python", "-c", IMPORT_ON_A_WORKER)
    assert control.returncode != 0 and "No module named 'ovdlab'" in control.stdout, control.stdout[-8000:]

    work = tmp_path / "shared" / "work"
    submission = f"ovdlab-{secrets.token_hex(4)}"
    job = submit(clone, cluster, "--submission-id", submission, "python", JOB, *tiny_overrides, *JOB_OVERRIDES,
                 f"work_dir={work}", f"tracking.uri={mlflow_server}")
    out = job.stdout
    (tmp_path / "job.log").write_text(out)
    assert job.returncode == 0 and f"Job '{submission}' succeeded" in out, out[-8000:]
    assert f"Job '{submission}' succeeded" in ray_cli(cluster.client_env, "job", "status", submission).stdout
    logged = re.search(r"shipping ovdlab to every node of the job: \S+ \(\d+ files, \d+ KiB, sha256 (\w+)", out)
    assert logged and "AP50 novel" in out, out[-8000:]

    # The job's actors ran on node 2 ...
    listed = ray_cli(cluster.client_env, "list", "actors", "--detail", "--format", "json", "--limit", "10000")
    on_node_2 = {a["class_name"] for a in json.loads(listed.stdout) if a["node_id"] == cluster.worker_node_id}
    for expected in ACTORS_ON_NODE_2:
        assert any(name.startswith(expected) for name in on_node_2), (expected, on_node_2)
    # ... from the package the driver staged, unpacked there by node 2's runtime env agent.
    shipped = list((cluster.worker_temp_dir / "session_latest").glob("runtime_resources/py_modules_files/*/ovdlab"))
    assert len(shipped) == 1, shipped
    folders = {name: shipped[0] / name for name in (*SUBPACKAGES, CONFIGS)}
    assert content_digest(package_files(folders)).startswith(logged.group(1))

    monkeypatch.setenv("NO_PROXY", cluster.client_env["NO_PROXY"])
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("shapes")
    jobs = client.search_runs([experiment.experiment_id], "tags.kind = 'recipe'")
    assert len(jobs) == 1 and jobs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in jobs]
    assert any(name.startswith("ap50") for name in jobs[0].data.metrics), jobs[0].data.metrics
