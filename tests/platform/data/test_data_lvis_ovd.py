"""LVIS v1 open-vocabulary conversion (base = f + c, novel = r) on a tiny fake file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovdlab.platform.data.lvis_ovd import convert_lvis_ovd

FREQ = {1: "f", 2: "c", 3: "r", 4: "r", 5: "f"}


def _lvis() -> dict:
    cats = [{"id": i, "name": f"cat{i}", "frequency": f, "synset": f"s{i}.n.01"} for i, f in sorted(FREQ.items(), reverse=True)]
    images = [
        {"id": 10, "width": 100, "height": 80, "coco_url": "u/000000000010.jpg", "neg_category_ids": [3], "not_exhaustive_category_ids": [4]},
        {"id": 11, "width": 100, "height": 80, "coco_url": "u/000000000011.jpg", "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ]  # fmt: skip
    anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "segmentation": [[0, 0, 10, 0, 10, 10]]},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100, "segmentation": [[5, 5, 15, 5, 15, 15]]},
        {"id": 3, "image_id": 11, "category_id": 2, "bbox": [1, 1, 3, 3], "area": 9, "segmentation": [[1, 1, 4, 1, 4, 4]]},
        {"id": 4, "image_id": 11, "category_id": 4, "bbox": [2, 2, 3, 3], "area": 9, "segmentation": [[2, 2, 5, 2, 5, 5]]},
        {"id": 5, "image_id": 11, "category_id": 5, "bbox": [3, 3, 3, 3], "area": 9, "segmentation": [[3, 3, 6, 3, 6, 6]]},
    ]  # fmt: skip
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_train_drops_rare_annotations(tmp_path: Path) -> None:
    src = _write(tmp_path / "lvis_train.json", _lvis())
    counts = convert_lvis_ovd(src, tmp_path / "out" / "train.json", "train")
    data = json.loads((tmp_path / "out" / "train.json").read_text())
    assert [a["id"] for a in data["annotations"]] == [1, 3, 5]
    assert counts == {
        "images": 2,
        "annotations": 3,
        "base_annotations": 3,
        "novel_annotations": 0,
        "dropped_annotations": 2,
        "categories": 5,
        "base_categories": 3,
        "novel_categories": 2,
    }
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5]
    for cat in data["categories"]:
        assert cat["frequency"] == FREQ[cat["id"]]
        assert cat["split"] == ("novel" if FREQ[cat["id"]] == "r" else "base")
        assert cat["synset"] == f"s{cat['id']}.n.01"
    # Images keep every field and gain file_name <folder>/<file> from their coco_url.
    assert data["images"] == [{**im, "file_name": im["coco_url"]} for im in _lvis()["images"]]


def test_val_keeps_everything_tagged(tmp_path: Path) -> None:
    src = _write(tmp_path / "lvis_val.json", _lvis())
    counts = convert_lvis_ovd(src, tmp_path / "val.json", "val")
    data = json.loads((tmp_path / "val.json").read_text())
    assert data["annotations"] == _lvis()["annotations"]
    assert counts["novel_annotations"] == 2 and counts["base_annotations"] == 3 and counts["dropped_annotations"] == 0
    assert {c["id"] for c in data["categories"] if c["split"] == "novel"} == {3, 4}


def test_output_loads_in_lvis_api(tmp_path: Path) -> None:
    from lvis import LVIS

    src = _write(tmp_path / "lvis_val.json", _lvis())
    convert_lvis_ovd(src, tmp_path / "val.json", "val")
    lvis = LVIS(str(tmp_path / "val.json"))
    assert sorted(lvis.get_cat_ids()) == [1, 2, 3, 4, 5] and len(lvis.get_ann_ids()) == 5


def test_missing_frequency_names_the_category(tmp_path: Path) -> None:
    data = _lvis()
    del data["categories"][1]["frequency"]  # category 4
    src = _write(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match=r"bad.json: category id 4 \('cat4'\) has no 'frequency'"):
        convert_lvis_ovd(src, tmp_path / "o.json", "train")
    data["categories"][1]["frequency"] = "x"
    _write(src, data)
    with pytest.raises(ValueError, match="frequency 'x'"):
        convert_lvis_ovd(src, tmp_path / "o.json", "train")
    assert not (tmp_path / "o.json").exists()


def test_unknown_category_and_bad_mode(tmp_path: Path) -> None:
    data = _lvis()
    data["annotations"][0]["category_id"] = 99
    src = _write(tmp_path / "unknown.json", data)
    with pytest.raises(ValueError, match="unknown category_id, e.g. id 1"):
        convert_lvis_ovd(src, tmp_path / "o.json", "val")
    with pytest.raises(ValueError, match="mode"):
        convert_lvis_ovd(src, tmp_path / "o.json", "both")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        convert_lvis_ovd(tmp_path / "missing.json", tmp_path / "o.json", "val")


def test_images_are_named_by_their_coco_url_folder(tmp_path: Path) -> None:
    """LVIS v1 has no file_name; its val images come from COCO's train2017 and val2017."""
    data = _lvis()
    data["images"][0]["coco_url"] = "http://images.cocodataset.org/train2017/000000000010.jpg"
    data["images"][1]["file_name"] = "kept.jpg"
    out = tmp_path / "o.json"
    convert_lvis_ovd(_write(tmp_path / "in.json", data), out, "val")
    images = json.loads(out.read_text())["images"]
    assert images[0]["file_name"] == "train2017/000000000010.jpg" and images[1]["file_name"] == "kept.jpg"
    del data["images"][0]["coco_url"]
    with pytest.raises(ValueError, match="neither file_name nor coco_url"):
        convert_lvis_ovd(_write(tmp_path / "in.json", data), out, "val")
