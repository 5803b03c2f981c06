"""The driver's side of a training job: run names, worker inputs checked, dataset problems recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ovdlab.platform.data.catalog import load_dataset
from ovdlab.platform.tracking import Tracker
from ovdlab.platform.train.trainer import (
    check_worker_inputs,
    log_dataset_problems,
    prepare_training,
    run_dir_for,
    run_name_for,
)


def test_run_name_is_readable_and_stable(tiny_cfg_factory):
    cfg = tiny_cfg_factory()
    name = run_name_for(cfg)
    assert name == f"vild-text-shapes-{cfg.content_hash()[:8]}"
    assert run_name_for(tiny_cfg_factory()) == name
    assert run_name_for(tiny_cfg_factory(["train.lr=0.05"])) != name
    assert run_name_for(tiny_cfg_factory(["tracking.run_name=mine"])) == "mine"
    assert run_name_for(tiny_cfg_factory(["train.vocabulary=all"])).startswith("vild-text-oracle-shapes-")


def test_missing_worker_input_is_one_clear_error_before_the_trainer(tiny_cfg_factory):
    cfg = tiny_cfg_factory()
    prepared = prepare_training(cfg, run_dir_for(cfg))
    check_worker_inputs(prepared)
    prepared.text_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"training inputs missing before the trainer starts: text bank: /"):
        check_worker_inputs(prepared)
    prepared.datasets["val"].ann_json = Path("annotations/val.json")
    with pytest.raises(ValueError, match="must be absolute paths.*val annotations: annotations/val.json"):
        check_worker_inputs(prepared)


def test_skipped_annotations_are_counted_and_listed_in_the_run(tiny_cfg_factory, tmp_path):
    """Before, dropped annotations lived only in ``OVDDataset.problems``."""
    cfg = tiny_cfg_factory()
    prepare_training(cfg, run_dir_for(cfg))
    ann_path = Path(cfg.dataset.train_json)
    data = json.loads(ann_path.read_text())
    first = data["annotations"][0]
    data["annotations"] += [
        {**first, "id": 9001, "bbox": [1, 1, -3, 4]},
        {**first, "id": 9002, "bbox": [1, 1, float("nan"), 4]},
        {**first, "id": 9003, "category_id": 999},
    ]
    bad = tmp_path / "train_bad.json"
    bad.write_text(json.dumps(data))
    train = load_dataset(cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"train_json": str(bad)})}), "train")
    assert train.problem_counts() == {"invalid_bbox": 2, "unknown_category": 1}

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "problems", artifact_location=(tmp_path / "a").as_uri())
    with tracker.start_run("r") as run_id:
        log_dataset_problems(tracker, {"train": train, "val": load_dataset(cfg, "val")})
    client = MlflowClient(tracker.uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["problems/train_annotations_skipped"] == 3
    assert metrics["problems/train_invalid_bbox"] == 2 and metrics["problems/train_unknown_category"] == 1
    assert metrics["problems/val_annotations_skipped"] == 0
    table = json.loads(Path(client.download_artifacts(run_id, "problems/annotations_train.json", str(tmp_path))).read_text())
    assert sorted(p["ann_id"] for p in table["skipped"]) == [9001, 9002, 9003]
    assert {p["kind"] for p in table["skipped"]} == {"invalid_bbox", "unknown_category"}


def test_oracle_trains_every_class_and_needs_novel_boxes(tiny_cfg_factory):
    """The ceiling row: novel boxes in train.json (``dataset.shapes.oracle``) and every class trained."""
    from ovdlab.platform.data.catalog import ensure_dataset
    from ovdlab.platform.train.trainer import training_classes

    plain = tiny_cfg_factory()
    ensure_dataset(plain)
    train_set = load_dataset(plain, "train")
    assert training_classes(plain, train_set) == list(train_set.base_ids)
    wrong = tiny_cfg_factory(["train.vocabulary=all"])
    with pytest.raises(ValueError, match="needs novel boxes .* dataset.shapes.oracle=true"):
        training_classes(wrong, train_set)
    oracle = tiny_cfg_factory(["train.vocabulary=all", "dataset.shapes.oracle=true", "dataset.root=data/shapes-oracle"])
    ensure_dataset(oracle)
    oracle_set = load_dataset(oracle, "train")
    assert training_classes(oracle, oracle_set) == list(oracle_set.category_ids)
    assert len(oracle_set.category_ids) > len(oracle_set.base_ids)


def test_pseudo_labelled_classes_train_but_stay_novel():
    """A probe's training bank lists base classes then the pseudo-labelled ones: the latter
    train (they are in the training vocabulary) yet stay novel in both vocabularies, since
    they never had a ground-truth box; every other evaluation class is novel too."""
    import torch

    from ovdlab.platform.train.loop import banks_vocabularies, checkpoint_classes

    banks = {
        "train": {"names": ["red circle", "blue square", "red star"], "embeddings": torch.eye(3, 4),
                  "pseudo": ["red star"]},
        "eval": {"names": ["red circle", "red star", "blue square", "green cross"], "embeddings": torch.eye(4)},
    }
    train, evaluation = banks_vocabularies(banks)
    assert train.is_novel.tolist() == [False, False, True] and train.names[2] == "red star"
    assert evaluation.is_novel.tolist() == [False, True, False, True]
    built = checkpoint_classes({"eval_classes": list(evaluation.names), "train_classes": ["red circle", "blue square"]}, 4)
    assert built.names == evaluation.names and built.is_novel.tolist() == evaluation.is_novel.tolist()
    assert checkpoint_classes({}, 4) is None


def test_pseudo_label_file_must_name_evaluated_classes(tmp_path, tiny_cfg_factory):
    from ovdlab.platform.data.catalog import ensure_dataset
    from ovdlab.platform.data.pseudo_labels import PseudoLabels, load_pseudo_labels, write_pseudo_labels
    from ovdlab.platform.train.trainer import pseudo_label_classes

    cfg = tiny_cfg_factory()
    ensure_dataset(cfg)
    val = load_dataset(cfg, "val")
    novel = list(val.novel_ids)[:2]
    path = write_pseudo_labels(PseudoLabels({cid: f"c{cid}" for cid in novel}, {1: [
        {"image_id": 1, "category_id": novel[0], "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9, "similarity": 0.5}]}),
        tmp_path / "p.json")
    assert load_pseudo_labels(path).by_image[1][0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    with_file = cfg.model_copy(update={"train": cfg.train.model_copy(update={"pseudo_labels": str(path)})})
    assert pseudo_label_classes(with_file, val, list(val.base_ids)) == sorted(novel, key=list(val.category_ids).index)
    assert pseudo_label_classes(cfg, val, list(val.base_ids)) == []
    bad = write_pseudo_labels(PseudoLabels({999: "unknown"}), tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"category ids \[999\]"):
        pseudo_label_classes(with_file.model_copy(update={"train": cfg.train.model_copy(update={"pseudo_labels": str(bad)})}),
                             val, list(val.base_ids))
    (tmp_path / "broken.json").write_text('{"categories": [{"id": 1, "name": "a"}], "annotations": [{"image_id": 1}]}')
    with pytest.raises(ValueError, match="not a pseudo-label file"):
        load_pseudo_labels(tmp_path / "broken.json")
