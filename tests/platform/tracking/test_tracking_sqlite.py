"""Tracker against real SQLite MLflow stores in tmp_path, read back with MlflowClient."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # noqa: E402

from ovdlab.platform.config import ExperimentConfig, TrackingConfig, flatten  # noqa: E402
from ovdlab.platform.tracking import (  # noqa: E402
    CONFIG_ARTIFACT,
    LONG_PARAM_POINTER,
    LONG_PARAMS_ARTIFACT,
    TRACKING_URI_ENV,
    Tracker,
    TrackingError,
    experiment_name_for,
    git_commit,
    resolve_tracking_uri,
    tracker_from_config,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One SQLite store for the module (creating its tables takes seconds)."""
    root = tmp_path_factory.mktemp("store")
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


@pytest.fixture
def tracker(store: tuple[str, str], request: pytest.FixtureRequest) -> Tracker:
    """A tracker on the shared store with an experiment of its own per test."""
    uri, artifacts = store
    return Tracker(uri, f"exp-{request.node.name}", artifact_location=artifacts)


def _runs(tracker: Tracker):
    return MlflowClient(tracker.uri).search_runs([tracker.experiment_id])


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv(TRACKING_URI_ENV, "http://127.0.0.1:5999")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:5999"
    explicit = TrackingConfig(uri="sqlite:////elsewhere/m.db")
    assert resolve_tracking_uri(explicit, tmp_path) == "sqlite:////elsewhere/m.db"


def test_experiment_per_dataset() -> None:
    assert [experiment_name_for(k) for k in ("shapes", "coco", "lvis")] == ["shapes", "coco-ovd", "lvis-ovd"]
    with pytest.raises(ValueError, match="imagenet"):
        experiment_name_for("imagenet")


def test_log_config_params_long_value_artifacts_and_tags(tracker: Tracker, tmp_path: Path) -> None:
    long_name = "n" * (MAX_PARAM_VAL_LENGTH + 1)
    cfg = ExperimentConfig(name=long_name, method={"name": "vild"})
    with tracker.start_run("config") as run_id:
        tracker.log_config(cfg)
    client = MlflowClient(tracker.uri)
    run = client.get_run(run_id)

    expected = flatten(cfg.model_dump(mode="json"))
    assert set(run.data.params) == set(expected)
    assert run.data.params["name"] == LONG_PARAM_POINTER
    assert run.data.params["train.max_iter"] == str(cfg.train.max_iter)
    assert json.loads(run.data.params["proposals.anchor_sizes"]) == cfg.proposals.anchor_sizes
    assert run.data.params["teacher.pretrained"] == "null"

    long_params = json.loads(Path(client.download_artifacts(run_id, LONG_PARAMS_ARTIFACT, str(tmp_path))).read_text())
    assert long_params == {"name": long_name}
    dumped = yaml.safe_load(Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(tmp_path))).read_text())
    assert ExperimentConfig.model_validate(dumped) == cfg

    assert run.data.tags["config_hash"] == cfg.content_hash()
    assert run.data.tags["dataset"] == "shapes"
    assert run.data.tags["method"] == "vild"
    assert run.data.tags["git_commit"] == git_commit()
    assert run.info.status == "FINISHED"


def test_metrics_with_steps(tracker: Tracker) -> None:
    losses = [2.0, 1.5, 1.25, 1.0]
    with tracker.start_run("metrics") as run_id:
        for step, loss in enumerate(losses):
            tracker.log_metrics({"loss": loss, "lr": 0.01 * (step + 1)}, step=step * 10)
        tracker.log_metrics({"ap50_novel": 12.5})
        with pytest.raises(TypeError, match="'bad'"):
            tracker.log_metrics({"bad": "high"})
    client = MlflowClient(tracker.uri)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(s * 10, v) for s, v in enumerate(losses)]
    assert [m.step for m in client.get_metric_history(run_id, "ap50_novel")] == [0]
    assert client.get_run(run_id).data.metrics["lr"] == pytest.approx(0.04)


def test_artifacts_text_dict_figure_and_tags(tracker: Tracker, tmp_path: Path) -> None:
    table = tmp_path / "per_class_ap.csv"
    table.write_text("class,ap50\ncat,40.0\n")
    pics = tmp_path / "pictures"
    pics.mkdir()
    (pics / "img_1.png").write_bytes(b"\x89PNG fake")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with tracker.start_run("artifacts") as run_id:
        tracker.log_artifact(table)
        tracker.log_artifact(pics, artifact_path="vis")
        tracker.log_text("hello", "notes/readme.txt")
        tracker.log_dict({"ap50": {"cat": 40.0}}, "tables/ap.json")
        tracker.log_figure(fig, "plots/curve.png")
        tracker.set_tags({"store_key": "abc123", "epochs": 3})
        with pytest.raises(FileNotFoundError, match="missing.csv"):
            tracker.log_artifact(tmp_path / "missing.csv")
    plt.close(fig)
    client = MlflowClient(tracker.uri)
    assert _artifact_paths(client, run_id) == {
        "per_class_ap.csv",
        "vis/pictures/img_1.png",
        "notes/readme.txt",
        "tables/ap.json",
        "plots/curve.png",
    }
    got = Path(client.download_artifacts(run_id, "tables/ap.json", str(tmp_path / "dl")))
    assert json.loads(got.read_text()) == {"ap50": {"cat": 40.0}}
    tags = client.get_run(run_id).data.tags
    assert tags["store_key"] == "abc123" and tags["epochs"] == "3"
    artifact_root = Path(tracker.artifact_location.removeprefix("file://"))
    assert (artifact_root / run_id / "artifacts" / "per_class_ap.csv").read_text() == table.read_text()


def test_parent_and_child_runs(tracker: Tracker) -> None:
    with tracker.start_run("sweep", tags={"sweep": "distill_weight"}) as parent_id:
        child_ids = []
        for weight in (0.5, 1.0):
            with tracker.start_run(f"trial-{weight}", parent_run_id=parent_id) as child_id:
                tracker.log_metrics({"ap50_novel": 10 * weight})
                child_ids.append(child_id)
            assert tracker.active_run_id == parent_id
        tracker.log_metrics({"best_ap50_novel": 10.0})
    assert tracker.active_run_id is None
    client = MlflowClient(tracker.uri)
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(child_ids)
    assert sorted(r.data.metrics["ap50_novel"] for r in children) == [5.0, 10.0]
    parent = client.get_run(parent_id)
    assert "mlflow.parentRunId" not in parent.data.tags and parent.data.metrics == {"best_ap50_novel": 10.0}
    assert parent.data.tags["sweep"] == "distill_weight"
    with pytest.raises(TrackingError, match="no-such-run"):
        with tracker.start_run("orphan", parent_run_id="no-such-run"):
            pass


def test_resume_by_id_keeps_one_run(tracker: Tracker) -> None:
    cfg = ExperimentConfig()
    with tracker.start_run("train") as run_id:
        tracker.log_config(cfg)
        tracker.log_metrics({"loss": 2.0}, step=0)
    with tracker.start_run(run_id=run_id) as resumed_id:
        assert resumed_id == run_id
        assert MlflowClient(tracker.uri).get_run(run_id).info.status == "RUNNING"
        tracker.log_config(cfg)
        tracker.log_metrics({"loss": 1.0}, step=100)
        with pytest.raises(TrackingError, match=r"train\.max_iter"):
            tracker.log_config(ExperimentConfig(train={"max_iter": 999}))
    runs = _runs(tracker)
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_name == "train"
    history = MlflowClient(tracker.uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (100, 1.0)]
    with pytest.raises(TrackingError, match="0123456789abcdef"):
        with tracker.start_run(run_id="0123456789abcdef"):
            pass


def test_failed_run_status_and_logging_outside_a_run(tracker: Tracker) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.start_run("crash") as run_id:
            raise RuntimeError("boom")
    assert MlflowClient(tracker.uri).get_run(run_id).info.status == "FAILED"
    with pytest.raises(TrackingError, match="no open run"):
        tracker.log_metrics({"loss": 1.0})


def test_pickled_tracker_logs_to_the_open_run(tracker: Tracker) -> None:
    with tracker.start_run("driver") as run_id:
        worker_copy = pickle.loads(pickle.dumps(tracker))
        worker_copy.log_metrics({"worker_loss": 0.5}, step=3)
    assert MlflowClient(tracker.uri).get_run(run_id).data.metrics == {"worker_loss": 0.5}


def test_two_trackers_in_one_process_stay_apart(store: tuple[str, str], tmp_path: Path) -> None:
    uri, artifacts = store
    other_uri = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    first = Tracker(uri, "exp-two-a", artifact_location=artifacts)
    second = Tracker(other_uri, "exp-two-b", artifact_location=(tmp_path / "other_art").as_uri())
    with first.start_run("a") as a_id, second.start_run("b") as b_id:
        first.log_metrics({"only_a": 1.0})
        second.log_metrics({"only_b": 2.0})
        first.set_tags({"who": "a"})
    assert MlflowClient(uri).get_run(a_id).data.metrics == {"only_a": 1.0}
    assert MlflowClient(other_uri).get_run(b_id).data.metrics == {"only_b": 2.0}
    assert "who" not in MlflowClient(other_uri).get_run(b_id).data.tags
    assert [r.info.run_id for r in _runs(second)] == [b_id]


def test_disabled_tracker_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    fig = plt.figure()
    off_by_rank = Tracker.for_rank(1, f"sqlite:///{tmp_path / 'rank.db'}", "shapes")
    off_by_config = tracker_from_config(
        ExperimentConfig(work_dir=str(tmp_path / "work"), tracking={"enabled": False})
    )
    for off in (off_by_rank, off_by_config):
        assert not off.enabled
        with off.start_run("r", tags={"a": 1}) as run_id:
            with off.start_run("child", parent_run_id="p"):
                assert run_id is None and off.active_run_id is None
                off.log_config(ExperimentConfig())
                off.log_metrics({"loss": 1.0}, step=1)
                off.log_artifact(tmp_path / "a.txt")
                off.log_text("t", "t.txt")
                off.log_dict({"a": 1}, "d.json")
                off.log_figure(fig, "f.png")
                off.set_tags({"k": "v"})
    plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert Tracker.for_rank(0, "sqlite:///unused.db", "shapes").enabled


def test_default_uri_lands_in_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    work = tmp_path / "work"
    cfg = ExperimentConfig(work_dir=str(work), dataset={"kind": "coco", "shapes": None})
    tracker = tracker_from_config(cfg)
    assert tracker.uri == f"sqlite:///{work.resolve()}/mlflow.db" and tracker.experiment == "coco-ovd"
    with tracker.start_run("job") as run_id:
        tracker.log_config(cfg)
    assert (work / "mlflow.db").is_file()
    assert (work / "mlartifacts" / run_id / "artifacts" / CONFIG_ARTIFACT).is_file()
    assert list(cwd.iterdir()) == []
    named = tracker_from_config(cfg.model_copy(update={"tracking": TrackingConfig(experiment="mine")}))
    assert named.experiment == "mine" and named.uri == tracker.uri


def test_file_store_uri_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="file store"):
        Tracker(str(tmp_path / "mlruns"), "shapes")
    with pytest.raises(TrackingError, match="file store"):
        Tracker((tmp_path / "mlruns").as_uri(), "shapes")


def test_experiments_open_as_model_training_in_the_ui(tracker: Tracker, store: tuple[str, str]) -> None:
    """MLflow 3's UI shows an untagged experiment as a GenAI overview; ours are training runs."""
    client = MlflowClient(tracker.uri)
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-before-the-tag", artifact_location=store[1])
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    Tracker(tracker.uri, "made-before-the-tag").experiment_id
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
