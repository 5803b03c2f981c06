"""Connecting to Ray: the configured cluster, the one ``ray job submit`` set, or a local one."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from ovdlab.platform.code_shipping import (
    OVERRIDE_JOB_RUNTIME_ENV,
    SUBMITTED_JOB_ENV,
    submitted_py_modules,
    with_shipped_code,
)
from ovdlab.platform.config import ExperimentConfig

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
"""Read by a local Ray start for its GCS port (``ray._private.node``)."""


def init_address(configured: str | None) -> str:
    """``ray.address`` if set, else ``$RAY_ADDRESS`` (set by ``ray job submit``), else ``"local"``.

    ``"local"`` starts a Ray of the job's own. Plain ``ray.init()`` would instead join
    the last cluster ``ray start`` made on this machine (``/tmp/ray/ray_current_cluster``),
    and hang retrying when that cluster has since died; set ``ray.address=auto`` to join
    a running local cluster on purpose.
    """
    return configured or os.environ.get(ADDRESS_ENV) or "local"


def init_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """``ray.init`` at :func:`init_address`: a cluster gets the job's code, a local Ray its own address.

    Joining a cluster (any address but ``"local"``, e.g. inside ``ray job submit``), the
    driver's ovdlab is staged and added to the runtime env's ``py_modules``
    (:mod:`ovdlab.platform.code_shipping`), so that workers on nodes that never installed
    ovdlab run the job. A local Ray runs in the driver's own environment and gets none.

    With several Ray instances on one machine (two jobs, a job next to a test session),
    Ray Train V2's placement-group cleaner -- an actor that asks the State API whether
    the training controller is alive -- resolves "the" cluster by the machine's
    last-started one, does not find the controller there, takes it for dead and removes
    the run's placement group: the training worker is killed mid-run (seen in a demo run
    next to the test suite). So the local GCS gets a port chosen here
    (``RAY_GCS_SERVER_PORT``) and every worker gets ``RAY_ADDRESS`` pointing at it.
    """
    import ray
    from ray._private.services import get_node_ip_address

    target = init_address(address)
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    if target != "local":
        shipped = with_shipped_code(runtime_env)
        with _environment(OVERRIDE_JOB_RUNTIME_ENV, "1") if submitted_py_modules() else nullcontext():
            ray.init(address=target, runtime_env=shipped, **init_kwargs)
        return
    port = _free_port()
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), ADDRESS_ENV: f"{get_node_ip_address()}:{port}"}
    with _environment(GCS_PORT_ENV, str(port)):
        ray.init(address="local", runtime_env=runtime_env, **init_kwargs)


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block, then as it was: later subprocesses of
    the driver must not inherit a setting meant for one ``ray.init``."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Connect to the cluster :func:`init_address` names, or start a local Ray.

    A local Ray starts with its dashboard when Ray's dashboard packages are installed
    (they are, with ``ray[default]``): Ray Train V2's placement-group cleaner polls the
    training controller through the State API, which the dashboard serves, and without
    it logs "Failed to query Ray Train Controller actor state" every few seconds of
    every training run.
    """
    import ray

    warn_if_work_dir_is_temporary(cfg)
    if not ray.is_initialized():
        init_ray(cfg.ray.address, configure_logging=False)


def warn_if_work_dir_is_temporary(cfg: ExperimentConfig, cwd: Path | None = None) -> bool:
    """Warn (and return True) when a submitted job's ``work_dir`` lies in Ray's copy of the working dir.

    Under ``ray job submit --working-dir .`` the entrypoint runs in a temporary copy of
    that folder on the head node, so the default relative ``work`` (resolved against
    the current directory) puts datasets, checkpoints and the MLflow database where the
    next Ray session deletes them.
    """
    cwd = Path.cwd() if cwd is None else cwd
    if SUBMITTED_JOB_ENV not in os.environ or not Path(cfg.work_dir).is_relative_to(cwd):
        return False
    log.warning(
        "work_dir %s lies inside Ray's temporary copy of the job's working dir (%s) and is lost with the "
        "Ray session; pass an absolute work_dir on storage every node shares, e.g. work_dir=/shared/ovdlab",
        cfg.work_dir, cwd,
    )
    return True
