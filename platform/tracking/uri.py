"""Where runs go: tracking URI resolution, experiment names, server reachability.

Default store is a SQLite file inside ``work_dir`` (MLflow's file store is deprecated,
and a database next to the work it describes travels with it to shared storage).
An ``http(s)://`` URI names an ``mlflow server``; MLflow's own client retries an
unreachable server for minutes, so :func:`check_tracking_server` probes ``/health``
once with a short timeout and fails with a message that says how to fix it.
:func:`check_tracking_uri` refuses every other kind of URI up front.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from ovdlab.platform.config import TrackingConfig, absolute_path

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
    """Explicit ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > SQLite file in ``work_dir``.

    A path (in either) becomes the ``sqlite:///`` URL of that database file.
    """
    if tracking.uri:
        return absolute_tracking_uri(tracking.uri, Path.cwd())
    from_env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if from_env:
        return absolute_tracking_uri(from_env, Path.cwd())
    return default_tracking_uri(work_dir)


def absolute_tracking_uri(uri: str, base: Path) -> str:
    """A plain path or a relative ``sqlite:///`` file -> ``sqlite:///<absolute file>``; others unchanged.

    Relative paths are taken against ``base`` (the driver's current directory), so Ray
    workers, which run in other folders, open the same database.
    """
    if "://" in uri and not uri.startswith("sqlite:///"):
        return uri
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri
    if path in {"", ":memory:"}:
        return uri
    return f"sqlite:///{absolute_path(path, Path(base))}"


def _tracking_uri_problem(uri: str) -> str | None:
    """What makes ``uri`` unusable as an ovdlab tracking store, or None when it is usable."""
    parsed = urlparse(uri)
    if not uri.strip():
        return "is empty (leave it unset for a SQLite file in the work dir)"
    if parsed.scheme == "file":
        return "is MLflow's deprecated file store"
    if parsed.scheme in {"http", "https"}:
        return None if parsed.netloc else "names no server host"
    if parsed.scheme == "sqlite":
        return None if uri.startswith("sqlite://") else "is not a sqlite:/// URL"
    if not parsed.scheme and "://" not in uri:
        return None  # a filesystem path: the config takes it as a SQLite database file
    return f"uses the unsupported scheme {parsed.scheme or uri.split('://')[0]!r}"


def check_tracking_uri(uri: str | None, source: str = "tracking.uri") -> None:
    """Raise ``ValueError`` for a tracking URI that is not one of the stores ovdlab logs to.

    Allowed: None (a SQLite file in the work dir), a filesystem path (taken as a SQLite
    database file), ``sqlite://...``, or ``http(s)://host[:port]`` of an ``mlflow
    server``. ``file:`` is MLflow's deprecated file store; any other scheme (``ftp``,
    ``postgresql``, ...) is a store nothing here sets up or tests, on which MLflow would
    fail only once Ray has started. ``source`` names where the URI came from.
    """
    problem = None if uri is None else _tracking_uri_problem(uri)
    if problem is not None:
        raise ValueError(
            f"{source} {uri!r} {problem}; use a filesystem path (a SQLite database file), "
            f"sqlite:///<abs path>/{DB_FILE}, or http(s)://<host>:<port> of an mlflow server"
        )


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
