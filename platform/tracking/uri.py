"""Where runs go: tracking URI resolution, experiment names, server reachability.

Default store is a SQLite file inside ``work_dir`` (MLflow's file store is deprecated,
and a database next to the work it describes travels with it to shared storage).
An ``http(s)://`` URI names an ``mlflow server``; MLflow's own client retries an
unreachable server for minutes, so :func:`check_tracking_server` probes ``/health``
once with a short timeout and fails with a message that says how to fix it.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from ovdlab.platform.config import TrackingConfig

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"

EXPERIMENT_NAMES = {"shapes": "shapes", "coco": "coco-ovd", "lvis": "lvis-ovd"}


class TrackingError(RuntimeError):
    """Tracking cannot go on as asked; the message names the URI, run or experiment."""


class TrackingServerUnavailable(TrackingError):
    """An ``http(s)://`` tracking server did not answer its health check in time."""


def default_tracking_uri(work_dir: Path) -> str:
    """``sqlite:///<abs work_dir>/mlflow.db``: absolute, so Ray workers agree on it."""
    return f"sqlite:///{Path(work_dir).expanduser().resolve() / DB_FILE}"


def default_artifact_location(work_dir: Path) -> str:
    """``file://`` URI of ``<work_dir>/mlartifacts``, set on experiments created here.

    Without it a database-backed store puts artifacts under ``./mlruns`` of whatever
    directory the job happened to start in.
    """
    return (Path(work_dir).expanduser().resolve() / ARTIFACTS_DIR).as_uri()


def resolve_tracking_uri(tracking: TrackingConfig, work_dir: Path) -> str:
    """Explicit ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > SQLite file in ``work_dir``."""
    if tracking.uri:
        return tracking.uri
    from_env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if from_env:
        return from_env
    return default_tracking_uri(work_dir)


def is_http_uri(uri: str) -> bool:
    """An ``mlflow server`` (which then decides where artifacts go)."""
    return urlparse(uri).scheme in {"http", "https"}


def server_sets_artifacts(uri: str) -> bool:
    """Stores behind a server (``http(s)``, ``databricks``) place artifacts themselves."""
    return is_http_uri(uri) or urlparse(uri).scheme == "databricks"


def is_file_store_uri(uri: str) -> bool:
    """A plain path or ``file:`` URI: MLflow's deprecated file store."""
    return urlparse(uri).scheme in {"", "file"}


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other stores / in-memory."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in {"", ":memory:"}:
        return None
    return Path(uri[len(prefix):])


def experiment_name_for(dataset_kind: str) -> str:
    """One MLflow experiment per dataset: ``shapes``, ``coco-ovd``, ``lvis-ovd``."""
    try:
        return EXPERIMENT_NAMES[dataset_kind]
    except KeyError:
        raise ValueError(
            f"no experiment for dataset kind {dataset_kind!r}; known kinds: {sorted(EXPERIMENT_NAMES)}"
        ) from None


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """GET ``<uri>/health`` once; raise :class:`TrackingServerUnavailable` unless it answers 200.

    Proxies from the environment are honoured as MLflow's own client honours them, so
    the probe sees the server the way the runs will.
    """
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingServerUnavailable(_unreachable_message(uri, f"{reason}", timeout_s)) from None
    if status != 200:
        raise TrackingServerUnavailable(_unreachable_message(uri, f"GET {url} answered HTTP {status}", timeout_s))


def _unreachable_message(uri: str, reason: str, timeout_s: float) -> str:
    return (
        f"MLflow tracking server {uri} is not reachable ({reason}; health check timeout {timeout_s:g} s). "
        f"Start it (e.g. `mlflow server --host 127.0.0.1 --port <port> --backend-store-uri sqlite:///mlflow.db`), "
        f"or point tracking.uri / ${TRACKING_URI_ENV} at a running server, "
        f"or unset both to log to {DB_FILE} in the work dir, or set tracking.enabled=false."
    )
