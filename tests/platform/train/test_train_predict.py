"""Prediction on an arbitrary vocabulary (API and CLI), checkpoint evaluation, MLflow lookup."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from ovdlab.platform.cli import main
from ovdlab.platform.data.catalog import OVDDataset, load_dataset
from ovdlab.platform.detector.backbone_pretraining import resolve_backbone_weights
from ovdlab.platform.predict import (
    MIN_PICTURE_SIDE,
    Predictor,
    parse_vocab,
    save_outputs,
    showcase,
    showcase_image,
    shown_detections,
)
from ovdlab.platform.tracking import tracker_from_config
from ovdlab.platform.train.evaluate import detect_split, evaluate_checkpoint
from ovdlab.platform.train.trainer import report_checkpoint, train_in_process

VOCAB = ["red circle", "purple star", "blue square", "a toaster"]


@pytest.fixture(scope="module")
def trained(make_tiny_cfg, tmp_path_factory):
    """A checkpoint after a few in-process steps (evaluated at its last step)."""
    cfg = make_tiny_cfg(tmp_path_factory.mktemp("predict") / "work", ["train.max_iter=6", "train.checkpoint_period=6"])
    storage = cfg.work_path("inproc")
    train_in_process(cfg, storage)
    checkpoint = sorted(storage.glob("checkpoint_*"))[-1]
    image = load_dataset(cfg, "val").image_path(load_dataset(cfg, "val").image_ids[0])
    return cfg, checkpoint, image


def test_predict_api_on_an_arbitrary_vocabulary(trained, tmp_path):
    cfg, checkpoint, image = trained
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert predictor.cfg.model == resolve_backbone_weights(cfg).model  # the run's config: base-crops as its file
    assert predictor.teacher.digest == predictor.meta["teacher_digest"]  # the teacher used in training
    dets = predictor.predict(image, VOCAB, score_thresh=0.0)
    assert dets, "a zero threshold keeps the detector's top boxes"
    width, height = Image.open(image).size
    for det in dets:
        assert det["label"] in VOCAB
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert 0.0 <= det["score"] <= 1.0
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    assert len(dets) <= cfg.eval.detections_per_image
    assert predictor.predict(image, VOCAB, score_thresh=1.0) == []

    json_path, png_path = save_outputs(dets, image, tmp_path / "out", seen=predictor.train_classes)
    payload = json.loads(json_path.read_text())
    assert payload["detections"] == dets and (payload["width"], payload["height"]) == (width, height)
    with Image.open(png_path) as picture:
        assert picture.mode == "RGB" and max(picture.size) >= MIN_PICTURE_SIDE


def test_predict_cli_writes_json_and_picture(trained, tmp_path, capsys):
    _, checkpoint, image = trained
    out = tmp_path / "cli"
    code = main(["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--vocab", "red circle, purple star",
                 "--out", str(out), "--score-thresh", "0"])
    assert code == 0
    payload = json.loads((out / "detections.json").read_text())
    assert {d["label"] for d in payload["detections"]} <= {"red circle", "purple star"}
    assert (out / "detections.png").stat().st_size > 0
    assert "detection(s)" in capsys.readouterr().out


def test_predict_cli_bad_input_names_the_problem(trained, tmp_path, capsys):
    _, checkpoint, _ = trained
    missing = tmp_path / "nope.png"
    assert main(["predict", "--checkpoint", str(checkpoint), "--image", str(missing), "--vocab", "a", "--out", str(tmp_path)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "none"), "--image", str(missing), "--vocab", "a", "--out", str(tmp_path)]) == 1
    assert f"checkpoint {tmp_path / 'none'} does not exist; expected an ovdlab checkpoint folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="names no class"):
        parse_vocab(" , ")
    with pytest.raises(ValueError, match="more than once"):
        parse_vocab("a,b,a")


def test_evaluate_checkpoint_uses_the_full_vocabulary(trained):
    cfg, checkpoint, _ = trained
    out = evaluate_checkpoint(checkpoint)
    val = load_dataset(cfg, "val")
    assert {r["category_id"] for r in out.results} <= set(val.category_ids)
    assert len({c.category_id for c in out.metrics.per_class}) == len(val.category_ids)
    assert 0.0 <= out.metrics.ap50_all <= 100.0 and out.skipped == []


def test_predictor_from_mlflow_run(trained, tmp_path):
    cfg, checkpoint, image = trained
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path / 'ml.db'}"})})
    tracker = tracker_from_config(cfg)
    with tracker.start_run("predict-lookup") as run_id:
        metrics, _ = report_checkpoint(cfg, checkpoint, tracker, step=6)
    assert 0.0 <= metrics.ap50_all <= 100.0
    direct = Predictor.from_mlflow_run(run_id, cfg, device="cpu")
    assert direct.checkpoint == checkpoint
    # Without the local folder the run's logged checkpoint artifacts are used.
    moved = tmp_path / "moved"
    shutil.move(str(checkpoint), moved)
    try:
        remote = Predictor.from_mlflow_run(run_id, cfg, device="cpu")
        assert remote.checkpoint != checkpoint
        assert remote.predict(image, VOCAB, score_thresh=0.0) == direct.predict(image, VOCAB, score_thresh=0.0)
    finally:
        shutil.move(str(moved), checkpoint)


def test_evaluation_skips_and_names_an_undecodable_image(trained, tmp_path):
    cfg, checkpoint, _ = trained
    val = load_dataset(cfg, "val")
    images = tmp_path / "images"
    shutil.copytree(val.image_dir, images)
    broken_id = val.image_ids[1]
    broken = images / val.image_path(broken_id).name
    broken.write_bytes(broken.read_bytes()[:40])
    copy = OVDDataset(val.ann_json, images)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    results, skipped = detect_split(cfg, predictor.model, copy, predictor.vocabulary(copy.class_names))
    assert [s["image_id"] for s in skipped] == [str(broken_id)] and str(broken) in skipped[0]["error"]
    assert broken_id not in {r["image_id"] for r in results}
    assert {r["image_id"] for r in results} <= set(val.image_ids)


def test_embedding_geometry_of_a_checkpoint_on_ground_truth_boxes(trained, capsys):
    """``ovdlab embeddings``: the detector's region embeddings and the teacher's crop
    embeddings of every ground-truth box of the first images, one line each."""
    from ovdlab.platform.evaluation.embedding_geometry import measure_checkpoint

    cfg, checkpoint, _ = trained
    val = load_dataset(cfg, "val")
    boxes = [[a for a in val.annotations(i) if not a.get("iscrowd")] for i in val.image_ids]
    objects = sum(len(b) for b in [b for b in boxes if b][:2])
    measured = measure_checkpoint(Predictor.from_checkpoint(checkpoint, device="cpu"), val, max_images=2, teacher=True)
    assert set(measured) == {"detector", "teacher"}
    for geometry in measured.values():
        assert geometry.objects == objects and 0.0 <= geometry.shared_length <= 1.0 + 1e-6
        assert 0.0 <= geometry.base_named_novel <= 100.0 - geometry.base_right + 1e-6
    assert main(["embeddings", "--checkpoint", str(checkpoint), "--max-images", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("detector: ") and f"{objects} objects" in out and "teacher" not in out


def test_showcase_draws_an_image_with_a_base_object_and_a_held_out_concept(trained, tmp_path):
    cfg, checkpoint, _ = trained
    val = load_dataset(cfg, "val")
    image_id = showcase_image(val, "concept")
    cats = {c["id"]: c for c in val.categories}
    shown = [cats[a["category_id"]] for a in val.annotations(image_id)]
    assert any(c["split"] == "base" for c in shown) and any(c.get("novel_kind") == "concept" for c in shown)
    json_path, png = showcase(Predictor.from_checkpoint(checkpoint, device="cpu"), val, tmp_path)
    assert png.is_file() and json.loads(json_path.read_text())["image"] == str(val.image_path(image_id))
    with pytest.raises(LookupError, match="no image shows both"):
        showcase_image(val, "no-such-kind")


def test_a_picture_shows_each_object_once_with_its_best_label():
    dets = [
        {"box": [10, 10, 50, 50], "score": 0.4, "label": "red square"},
        {"box": [11, 10, 50, 51], "score": 0.8, "label": "red circle"},  # the same object, better
        {"box": [60, 60, 90, 90], "score": 0.3, "label": "blue star"},
    ]
    assert [d["label"] for d in shown_detections(dets)] == ["red circle", "blue star"]
    assert shown_detections([]) == []
