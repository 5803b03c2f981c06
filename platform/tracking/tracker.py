"""MLflow run lifecycle for ovdlab jobs: one run per job, a parent run per sweep.

Everything goes through an explicit :class:`mlflow.MlflowClient` and run ids, never
``mlflow.start_run``'s process-global active run, so two trackers (two URIs, or a
sweep driver and a trial in one process) cannot log into each other's runs.

Params are the flattened resolved config (the architecture's tracking model). MLflow
caps a param value at ``MAX_PARAM_VAL_LENGTH`` characters; longer values go to the
``params_long.json`` artifact and the param holds a pointer to it. Params are
immutable in MLflow, so a resumed run accepts the same config again and refuses a
changed one with the differing keys named.
"""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow import MlflowClient
from mlflow.entities import LifecycleStage, Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from ovdlab.platform.config import ExperimentConfig, dump_yaml, flatten
from ovdlab.platform.tracking.uri import (
    TrackingError,
    check_tracking_server,
    check_tracking_uri,
    default_artifact_location,
    experiment_name_for,
    is_file_store_uri,
    is_http_uri,
    resolve_tracking_uri,
    server_sets_artifacts,
    sqlite_path,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LONG_PARAMS_ARTIFACT = "params_long.json"
CONFIG_ARTIFACT = "config.yaml"
LONG_PARAM_POINTER = f"<in {LONG_PARAMS_ARTIFACT}>"
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3's UI opens an experiment without this tag in its GenAI overview (traces);
``custom_model_development`` makes it open on the runs table, where training runs are read."""


def git_commit(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of the ovdlab checkout, or ``"unknown"`` (no git, no commit)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def param_value(value: Any) -> str:
    """Strings as they are; everything else as JSON (``null``, ``true``, ``[32, 64]``)."""
    return value if isinstance(value, str) else json.dumps(value)


def split_long_params(params: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(params to log, values over ``MAX_PARAM_VAL_LENGTH`` kept whole for the artifact)."""
    short: dict[str, str] = {}
    long: dict[str, str] = {}
    for key, value in params.items():
        text = param_value(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            long[key] = text
            short[key] = LONG_PARAM_POINTER
        else:
            short[key] = text
    return short, long


def _is_missing(err: MlflowException) -> bool:
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


class Tracker:
    """Logs one job's runs to one MLflow experiment; a no-op when ``enabled`` is False.

    ``with tracker.start_run("name") as run_id:`` opens a run; the ``log_*`` calls go to
    the innermost open run. Disabled trackers (Ray Train ranks other than 0) accept
    every call and touch nothing. A tracker pickles without its client, so it can be
    handed to Ray workers; the runs open at pickling time travel with it.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        enabled: bool = True,
        artifact_location: str | None = None,
        server_timeout_s: float = 5.0,
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.enabled = enabled
        self.artifact_location = artifact_location
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._active: list[str] = []
        if not enabled:
            return
        try:
            check_tracking_uri(uri, source="tracking URI")
        except ValueError as err:
            raise TrackingError(str(err)) from None
        if is_file_store_uri(uri):
            raise TrackingError(
                f"tracking URI {uri!r} is a plain path, which MLflow would open as its deprecated file store; "
                f"give it as sqlite:///<abs path>/mlflow.db (the config and $MLFLOW_TRACKING_URI convert paths)"
            )
        if is_http_uri(uri):
            check_tracking_server(uri, server_timeout_s)

    @classmethod
    def for_rank(
        cls, rank: int, uri: str, experiment: str, artifact_location: str | None = None
    ) -> "Tracker":
        """Only rank 0 of a Ray Train run logs; the other ranks get a disabled tracker."""
        return cls(uri, experiment, enabled=rank == 0, artifact_location=artifact_location)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def __repr__(self) -> str:
        return f"Tracker(uri={self.uri!r}, experiment={self.experiment!r}, enabled={self.enabled})"

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            db = sqlite_path(self.uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """Id of ``self.experiment``, created (with ``artifact_location``) on first use."""
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self.client.create_experiment(
                    self.experiment, artifact_location=self.artifact_location, tags=EXPERIMENT_TAGS
                )
            except MlflowException as err:
                # Another process (a parallel sweep trial) created it first.
                if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == LifecycleStage.DELETED:
            raise TrackingError(
                f"experiment {self.experiment!r} in {self.uri} is deleted; restore it "
                f"(MlflowClient.restore_experiment) or set tracking.experiment to another name"
            )
        for key, value in EXPERIMENT_TAGS.items():
            if key not in found.tags:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    @property
    def active_run_id(self) -> str | None:
        """The innermost open run, or None (always None when disabled)."""
        return self._active[-1] if self._active else None

    def _run_id(self) -> str:
        if not self._active:
            raise TrackingError(f"no open run on {self!r}; log inside `with tracker.start_run(...)`")
        return self._active[-1]

    def _get_run(self, run_id: str, what: str) -> Run:
        try:
            return self.client.get_run(run_id)
        except MlflowException as err:
            if _is_missing(err):
                raise TrackingError(f"{what} {run_id!r} does not exist in {self.uri}") from None
            raise

    @contextmanager
    def start_run(
        self,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
    ) -> Iterator[str | None]:
        """Open a run and yield its id; it ends FINISHED, or FAILED / KILLED on an exception.

        ``parent_run_id`` makes it a child run (one per sweep trial), tagged
        ``mlflow.parentRunId``. ``run_id`` reopens an existing run of this experiment
        instead of creating one, so a resumed training job keeps one run.
        """
        if not self.enabled:
            yield None
            return
        tag_values = {key: str(value) for key, value in (tags or {}).items()}
        if run_id is not None:
            run_id = self._reopen_run(run_id, run_name, tag_values)
        else:
            if parent_run_id is not None:
                self._get_run(parent_run_id, "parent run")
                tag_values[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tag_values).info.run_id
        self._active.append(run_id)
        status = RunStatus.to_string(RunStatus.FINISHED)
        try:
            yield run_id
        except KeyboardInterrupt:
            status = RunStatus.to_string(RunStatus.KILLED)
            raise
        except BaseException:
            status = RunStatus.to_string(RunStatus.FAILED)
            raise
        finally:
            self._active.pop()
            self.client.set_terminated(run_id, status=status)

    def _reopen_run(self, run_id: str, run_name: str | None, tags: dict[str, str]) -> str:
        run = self._get_run(run_id, "run to resume")
        if run.info.experiment_id != self.experiment_id:
            raise TrackingError(
                f"run {run_id!r} belongs to experiment id {run.info.experiment_id}, "
                f"not {self.experiment!r} (id {self.experiment_id}) in {self.uri}"
            )
        if run.info.lifecycle_stage == LifecycleStage.DELETED:
            raise TrackingError(f"run {run_id!r} in {self.uri} is deleted; restore it or start a new run")
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING), name=run_name)
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return run_id

    def log_config(self, cfg: ExperimentConfig) -> None:
        """Params (flattened resolved config), ``config.yaml``, and the identifying tags."""
        if not self.enabled:
            return
        run_id = self._run_id()
        short, long = split_long_params(flatten(cfg.model_dump(mode="json")))
        existing = self.client.get_run(run_id).data.params
        changed = sorted(key for key, value in short.items() if key in existing and existing[key] != value)
        if changed:
            raise TrackingError(
                f"run {run_id} already has different values for {changed}; MLflow params are "
                f"immutable, so a changed config needs a new run, not a resumed one"
            )
        new = [Param(key, value) for key, value in short.items() if key not in existing]
        self.client.log_batch(run_id, params=new)
        if long:
            self.client.log_dict(run_id, long, LONG_PARAMS_ARTIFACT)
        self.client.log_text(run_id, dump_yaml(cfg), CONFIG_ARTIFACT)
        self.set_tags(
            {
                "config_hash": cfg.content_hash(),
                "dataset": cfg.dataset.kind,
                "method": cfg.method.name,
                "git_commit": git_commit(),
            }
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params not yet on the run (a reopened run keeps the ones it has: params are
        immutable), values as strings (a sweep's search space)."""
        if not self.enabled:
            return
        run_id = self._run_id()
        existing = self.client.get_run(run_id).data.params
        new = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items() if key not in existing]
        if new:
            self.client.log_batch(run_id, params=new)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Scalars (floats, ints, 0-d tensors) at ``step`` (0 when None, as ``mlflow.log_metrics``)."""
        if not self.enabled:
            return
        run_id = self._run_id()
        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}") from None
            entries.append(Metric(key, number, now, step or 0))
        self.client.log_batch(run_id, metrics=entries)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder with its contents, under ``artifact_path`` of the run."""
        if not self.enabled:
            return
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {local}")
        self.client.log_artifact(self._run_id(), str(local), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        """``text`` stored as the artifact file ``name`` (e.g. ``"tables/per_class_ap.md"``)."""
        if self.enabled:
            self.client.log_text(self._run_id(), text, name)

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        """``obj`` as a JSON (``.json``) or YAML (``.yaml``) artifact named ``name``."""
        if self.enabled:
            self.client.log_dict(self._run_id(), dict(obj), name)

    def log_figure(self, fig: Any, name: str) -> None:
        """A matplotlib figure saved as the image artifact ``name`` (e.g. ``"plots/ap.png"``)."""
        if self.enabled:
            self.client.log_figure(self._run_id(), fig, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags on the innermost open run; values stored as strings."""
        if self.enabled and tags:
            self.client.log_batch(self._run_id(), tags=[RunTag(k, str(v)) for k, v in tags.items()])


def tracker_from_config(cfg: ExperimentConfig, rank: int = 0) -> Tracker:
    """The job's tracker: URI resolved, experiment per dataset, logging on rank 0 only.

    Experiments created on a database store get ``<work_dir>/mlartifacts`` as their
    artifact location; behind a server the server decides.
    """
    work_dir = cfg.work_path()
    uri = resolve_tracking_uri(cfg.tracking, work_dir)
    experiment = cfg.tracking.experiment or experiment_name_for(cfg.dataset.kind)
    artifacts = None if server_sets_artifacts(uri) else default_artifact_location(work_dir)
    return Tracker(uri, experiment, enabled=cfg.tracking.enabled and rank == 0, artifact_location=artifacts)
