"""COCO 48/17 open-vocabulary conversion on a tiny hand-made instances file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovdlab.platform.data.coco_ovd import BASE_CLASSES, BASE_IDS, NOVEL_CLASSES, NOVEL_IDS, convert_coco_ovd

# Transcribed from the OVR-CNN split in docs/methods.md ("Shared benchmark definitions").
DOC_BASE = {
    1, 2, 3, 4, 7, 8, 9, 15, 16, 19, 20, 23, 24, 25, 27, 31, 33, 34, 35, 38, 42, 44, 48, 50,
    51, 52, 53, 54, 55, 56, 57, 59, 60, 62, 65, 70, 72, 73, 74, 75, 78, 79, 80, 82, 84, 85, 86, 90,
}  # fmt: skip
DOC_NOVEL = {5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87}
EXCLUDED = {10: "traffic light", 11: "fire hydrant", 13: "stop sign"}


def test_split_matches_the_benchmark_definition() -> None:
    assert len(BASE_IDS) == 48 and len(NOVEL_IDS) == 17
    assert set(BASE_IDS) == DOC_BASE and set(NOVEL_IDS) == DOC_NOVEL
    assert isinstance(BASE_IDS, tuple) and isinstance(NOVEL_IDS, tuple)
    assert not set(BASE_IDS) & set(NOVEL_IDS)
    assert BASE_CLASSES[72] == "tv" and NOVEL_CLASSES[5] == "airplane" and NOVEL_CLASSES[63] == "couch"


def _instances() -> dict:
    names = {**BASE_CLASSES, **NOVEL_CLASSES, **EXCLUDED}
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in sorted(names.items(), reverse=True)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in (1, 2, 3)]
    seg = [[10.0, 10.0, 50.0, 10.0, 50.0, 50.0]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0, "segmentation": seg},
        {"id": 2, "image_id": 1, "category_id": 17, "bbox": [60, 10, 40, 40], "area": 1600, "iscrowd": 0, "segmentation": seg},
        {"id": 3, "image_id": 2, "category_id": 10, "bbox": [5, 5, 10, 30], "area": 300, "iscrowd": 0, "segmentation": seg},
        {"id": 4, "image_id": 2, "category_id": 90, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1, "segmentation": {"counts": "x", "size": [480, 640]}},
        {"id": 5, "image_id": 3, "category_id": 87, "bbox": [1, 1, 9, 9], "area": 81, "iscrowd": 0, "segmentation": seg},
    ]  # fmt: skip
    return {"info": {"year": 2017}, "licenses": [{"id": 1}], "images": images, "annotations": anns, "categories": categories}


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_instances()))
    return path


def test_train_keeps_images_and_only_base_boxes(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "train.json"
    counts = convert_coco_ovd(src, out, "train")
    data = json.loads(out.read_text())
    assert [a["id"] for a in data["annotations"]] == [1, 4]
    assert counts == {
        "images": 3,
        "annotations": 2,
        "base_annotations": 2,
        "novel_annotations": 0,
        "dropped_annotations": 3,
        "categories": 65,
        "base_categories": 48,
        "novel_categories": 17,
    }
    assert [i["id"] for i in data["images"]] == [1, 2, 3]
    assert [c["id"] for c in data["categories"]] == sorted(DOC_BASE | DOC_NOVEL)
    assert {c["id"] for c in data["categories"] if c["split"] == "base"} == DOC_BASE
    assert {c["id"] for c in data["categories"] if c["split"] == "novel"} == DOC_NOVEL
    assert data["annotations"][1] == _instances()["annotations"][3]  # kept intact, segmentation included
    assert data["info"] == {"year": 2017} and data["licenses"] == [{"id": 1}]


def test_val_keeps_the_65_classes_and_drops_the_other_15(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "val.json"
    counts = convert_coco_ovd(src, out, "val")
    data = json.loads(out.read_text())
    assert [a["id"] for a in data["annotations"]] == [1, 2, 4, 5]
    assert counts["dropped_annotations"] == 1 and counts["novel_annotations"] == 2 and counts["base_annotations"] == 2
    assert len(data["categories"]) == 65 and not {c["id"] for c in data["categories"]} & set(EXCLUDED)


def test_output_loads_in_pycocotools(src: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    out = tmp_path / "val.json"
    convert_coco_ovd(src, out, "val")
    coco = COCO(str(out))
    assert len(coco.getCatIds()) == 65 and coco.getAnnIds(imgIds=[1]) == [1, 2]


def test_contiguous_ids_are_rejected(tmp_path: Path) -> None:
    data = _instances()
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    data["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(names)]  # 1..N, not COCO numbering
    path = tmp_path / "contiguous.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"contiguous.json.*(missing ids|do not follow COCO numbering)"):
        convert_coco_ovd(path, tmp_path / "o.json", "train")


def test_renamed_category_is_rejected(tmp_path: Path) -> None:
    data = _instances()
    for c in data["categories"]:
        if c["id"] == 5:
            c["name"] = "bus"
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="5 is 'bus', expected 'airplane'"):
        convert_coco_ovd(path, tmp_path / "o.json", "val")


def test_missing_category_is_rejected(tmp_path: Path) -> None:
    data = _instances()
    data["categories"] = [c for c in data["categories"] if c["id"] != 87]
    path = tmp_path / "short.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing ids \[87\] \(scissors\)"):
        convert_coco_ovd(path, tmp_path / "o.json", "val")


def test_bad_inputs(src: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        convert_coco_ovd(tmp_path / "nope.json", tmp_path / "o.json", "train")
    with pytest.raises(ValueError, match="mode"):
        convert_coco_ovd(src, tmp_path / "o.json", "test")  # type: ignore[arg-type]
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        convert_coco_ovd(tmp_path / "list.json", tmp_path / "o.json", "train")
    assert not (tmp_path / "o.json").exists()
