"""OVDDataset validation and the config-driven load/ensure helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovdlab.platform.config import ExperimentConfig, ShapesConfig, build_config
from ovdlab.platform.data.catalog import OVDDataset, ensure_dataset, load_dataset

CATEGORIES = [
    {"id": 7, "name": "train", "split": "base"},
    {"id": 1, "name": "person", "split": "base"},
    {"id": 5, "name": "airplane", "split": "novel"},
]


def _ann(ann_id: int, image_id: int, category_id: int, bbox: object) -> dict:
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0, "area": 1.0}
    if bbox is not None:
        ann["bbox"] = bbox
    return ann


def _dataset_json(tmp_path: Path) -> Path:
    images = [
        {"id": 30, "file_name": "c.jpg", "width": 100, "height": 50},
        {"id": 10, "file_name": "a.jpg", "width": 100, "height": 50},
        {"id": 20, "file_name": "sub/b.jpg", "width": 100, "height": 50},
    ]
    annotations = [
        _ann(1, 10, 1, [10, 10, 20, 20]),  # valid
        _ann(2, 10, 5, [90, 40, 20, 20]),  # partly outside -> clipped to [90, 40, 10, 10]
        _ann(3, 10, 7, [10, 10, 0, 5]),  # zero area
        _ann(4, 10, 7, [10, 10, 5, -3]),  # negative height
        _ann(5, 20, 1, [150, 10, 10, 10]),  # fully outside
        _ann(6, 20, 3, [1, 1, 5, 5]),  # unknown category
        _ann(7, 20, 1, None),  # missing bbox
        _ann(8, 99, 1, [1, 1, 5, 5]),  # unknown image
        _ann(9, 20, 1, [1, 2, 3]),  # malformed bbox
        _ann(10, 20, 7, [0, 0, 100, 50]),  # whole image, valid
    ]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def test_dataset_views(tmp_path: Path) -> None:
    ds = OVDDataset(_dataset_json(tmp_path), tmp_path / "imgs")
    assert len(ds) == 3 and ds.image_ids == (10, 20, 30)
    assert [c["id"] for c in ds.categories] == [1, 5, 7] and ds.category_ids == (1, 5, 7)
    assert ds.class_names == ["person", "airplane", "train"]
    assert ds.base_ids == (1, 7) and ds.novel_ids == (5,)
    assert ds.image_path(20) == tmp_path / "imgs" / "sub" / "b.jpg"
    assert ds.image_info(30)["file_name"] == "c.jpg"
    assert ds.annotations(30) == []
    with pytest.raises(KeyError, match="image id 99"):
        ds.annotations(99)


def test_invalid_annotations_are_recorded_not_lost(tmp_path: Path) -> None:
    ds = OVDDataset(_dataset_json(tmp_path), tmp_path)
    assert [a["id"] for a in ds.annotations(10)] == [1, 2]
    assert ds.annotations(10)[1]["bbox"] == [90.0, 40.0, 10.0, 10.0]
    assert [a["id"] for a in ds.annotations(20)] == [10]
    reasons = {p["ann_id"]: p["reason"] for p in ds.problems}
    assert set(reasons) == {3, 4, 5, 6, 7, 8, 9}
    assert "zero or negative area" in reasons[3] and "zero or negative area" in reasons[4]
    assert "outside" in reasons[5]
    assert "unknown category id 3" in reasons[6]
    assert "missing bbox" in reasons[7]
    assert "unknown image id 99" in reasons[8]
    assert "4 numbers" in reasons[9]
    assert {p["image_id"] for p in ds.problems if p["ann_id"] in (5, 6, 7, 9)} == {20}
    assert [c["ann_id"] for c in ds.clipped] == [2]
    ds.annotations(10)[0]["bbox"][0] = -1.0  # callers get copies
    assert ds.annotations(10)[0]["bbox"][0] == 10.0


def test_category_without_split_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.json"
    cats = [{"id": 1, "name": "person", "split": "base"}, {"id": 2, "name": "bicycle"}]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    with pytest.raises(ValueError, match=r"category 2 \('bicycle'\) has no 'split'"):
        OVDDataset(path, tmp_path)
    cats[1]["split"] = "seen"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    with pytest.raises(ValueError, match="split 'seen'"):
        OVDDataset(path, tmp_path)


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.json"):
        OVDDataset(tmp_path / "absent.json", tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        OVDDataset(tmp_path / "broken.json", tmp_path)
    (tmp_path / "noimg.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="image 1 lacks file_name, width, height"):
        OVDDataset(tmp_path / "noimg.json", tmp_path)


def _shapes_cfg(tmp_path: Path) -> ExperimentConfig:
    cfg = ExperimentConfig(work_dir=str(tmp_path / "work"))
    cfg.dataset.shapes = ShapesConfig(train_images=6, val_images=3, image_size=48)
    return cfg


def test_ensure_and_load_shapes(tmp_path: Path) -> None:
    cfg = _shapes_cfg(tmp_path)
    root = ensure_dataset(cfg)
    assert root == tmp_path.resolve() / "work" / "data" / "shapes"
    stamp = (root / "shapes.json").stat().st_mtime_ns
    assert ensure_dataset(cfg) == root and (root / "shapes.json").stat().st_mtime_ns == stamp
    train, val = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    assert len(train) == 6 and len(val) == 3
    assert train.problems == [] and val.problems == [] and train.clipped == []
    assert len(train.base_ids) == 12 and len(train.novel_ids) == 8
    assert sorted(train.class_names[train.category_ids.index(i)] for i in train.novel_ids) == sorted(cfg.dataset.shapes.novel)
    for image_id in train.image_ids:
        assert train.image_path(image_id).is_file()
        assert all(a["category_id"] in train.base_ids for a in train.annotations(image_id))
    with pytest.raises(ValueError, match="split"):
        load_dataset(cfg, "test")  # type: ignore[arg-type]


def test_shapes_paths_must_match_the_generated_layout(tmp_path: Path) -> None:
    cfg = _shapes_cfg(tmp_path)
    cfg.dataset.val_json = "annotations/test.json"
    with pytest.raises(FileNotFoundError, match="annotations/test.json not found after generating"):
        ensure_dataset(cfg)


@pytest.mark.parametrize(("kind", "command"), [("coco", "ovdlab data coco-ovd"), ("lvis", "ovdlab data lvis-ovd")])
def test_ensure_names_the_missing_file_and_the_command(tmp_path: Path, kind: str, command: str) -> None:
    root = tmp_path / kind
    cfg = build_config(
        {
            "work_dir": str(tmp_path),
            "dataset": {"kind": kind, "root": str(root), "train_json": "ann/train.json", "val_json": "ann/val.json", "shapes": None},
        }
    )
    with pytest.raises(FileNotFoundError) as info:
        ensure_dataset(cfg)
    assert str(root / "ann" / "train.json") in str(info.value) and command in str(info.value)
    (root / "ann").mkdir(parents=True)
    (root / "ann" / "train.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="image folder missing: .*images/train"):
        ensure_dataset(cfg)
    (root / "images" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"val annotations missing: .*val.json.*{command} --instances-val|val annotations missing: .*{command} --val"):
        ensure_dataset(cfg)
    (root / "ann" / "val.json").write_text("{}")
    (root / "images" / "val").mkdir(parents=True)
    assert ensure_dataset(cfg) == root
