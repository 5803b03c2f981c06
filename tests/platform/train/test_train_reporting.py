"""Evaluation results to MLflow (``log_evaluation``) and the detection-picture input."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from ovdlab.platform.cli import main
from ovdlab.platform.config import load_config
from ovdlab.platform.evaluation import evaluate
from ovdlab.platform.evaluation.reporting import grid_detections, log_evaluation
from ovdlab.platform.tracking import tracker_from_config

CATEGORIES = [{"id": 1, "name": "cat", "split": "novel"}, {"id": 2, "name": "dog", "split": "base"}]


def _gt() -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 0},
    ]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


RESULTS = [
    {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9},
    {"image_id": 1, "category_id": 2, "bbox": [40, 40, 10, 10], "score": 0.2},
    {"image_id": 2, "category_id": 2, "bbox": [30, 30, 20, 20], "score": 0.8},
]


def _cfg(tmp_path):
    return load_config(None, [f"work_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path / 'ml.db'}"])


def test_grid_detections_filters_and_names():
    grid = grid_detections(RESULTS, CATEGORIES, [2, 1], min_score=0.3)
    assert grid[0] == [{"bbox": [30, 30, 20, 20], "score": 0.8, "name": "dog", "split": "base"}]
    assert [d["name"] for d in grid[1]] == ["cat"] and grid[1][0]["split"] == "novel"
    with pytest.raises(ValueError, match="category_id 9"):
        grid_detections([{**RESULTS[0], "category_id": 9}], CATEGORIES, [1])


def test_log_evaluation_opens_a_run_with_everything(tmp_path):
    cfg = _cfg(tmp_path)
    metrics = evaluate("coco", _gt(), RESULTS)
    images = [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)]
    run_id = log_evaluation(cfg, metrics, run_name="eval-test", images=images,
                            detections=grid_detections(RESULTS, CATEGORIES, [1, 2]))
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "eval-test" and run.info.status == "FINISHED"
    assert run.data.metrics["ap50_novel"] == pytest.approx(metrics.ap50_novel)
    assert run.data.metrics["ap50_base"] == pytest.approx(metrics.ap50_base)
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert names == {f"eval/{n}" for n in ("per_class_ap.txt", "per_class_ap.csv", "per_class_ap.png", "pr_curves.png", "detections.png")}
    csv = client.download_artifacts(run_id, "eval/per_class_ap.csv", str(tmp_path))
    assert "cat" in open(csv).read()


def test_log_evaluation_goes_into_an_open_run(tmp_path):
    cfg = _cfg(tmp_path)
    tracker = tracker_from_config(cfg)
    metrics = evaluate("coco", _gt(), RESULTS)
    with tracker.start_run("job") as run_id:
        assert log_evaluation(cfg, metrics, tracker=tracker, step=7) == run_id
    client = MlflowClient(cfg.tracking.uri)
    assert len(client.search_runs([tracker.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "ap50_all")] == [7]
    with pytest.raises(ValueError, match="2 images but 1 detection lists"):
        log_evaluation(cfg, metrics, tracker=tracker, images=[np.zeros((4, 4, 3), np.uint8)] * 2, detections=[[]])


def test_disabled_tracking_logs_nothing(tmp_path):
    cfg = load_config(None, [f"work_dir={tmp_path}", "tracking.enabled=false"])
    assert log_evaluation(cfg, evaluate("coco", _gt(), RESULTS)) is None
    assert not (tmp_path / "mlflow.db").exists()


def test_eval_cli_logs_to_mlflow(tmp_path, capsys):
    import json

    gt, res = tmp_path / "gt.json", tmp_path / "res.json"
    gt.write_text(json.dumps(_gt()))
    res.write_text(json.dumps(RESULTS))
    uri = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["eval", "--dataset", str(gt), "--results", str(res), "--log", "--tracking-uri", uri, f"work_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    run_id = out.strip().split()[-1]
    assert MlflowClient(uri).get_run(run_id).info.run_name == "eval-res"
