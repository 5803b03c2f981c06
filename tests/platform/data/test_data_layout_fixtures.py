"""The smoke fixtures are the real layouts: COCO's 48/17 split by original ids, LVIS's
rare = novel with images named from coco_url, files where the dataset configs look."""

from __future__ import annotations

from pathlib import Path

from ovdlab.platform.config import load_config
from ovdlab.platform.data.catalog import ensure_dataset, load_dataset
from ovdlab.platform.data.coco_ovd import BASE_IDS, NOVEL_IDS
from ovdlab.platform.data.images import load_image
from ovdlab.platform.data.layout_fixtures import LVIS_SAMPLE, write_coco_layout, write_lvis_layout


def _check(dataset) -> None:
    for image_id in dataset.image_ids:
        image = load_image(dataset.image_path(image_id))
        info = dataset.image_info(image_id)
        assert image.shape[:2] == (info["height"], info["width"])
        for ann in dataset.annotations(image_id):
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= info["width"] and y + h <= info["height"]


def test_coco_layout_loads_through_the_coco_config(tmp_path: Path) -> None:
    layout = write_coco_layout(tmp_path / "coco", train_images=4, val_images=3)
    cfg = load_config("experiments/lp_ovod_coco", [f"dataset.root={layout.root}"])
    ensure_dataset(cfg)
    train, val = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    assert train.ann_json == layout.train_json and tuple(train.base_ids) == BASE_IDS
    assert tuple(val.novel_ids) == NOVEL_IDS and len(val.image_ids) == 3
    assert not any(a["category_id"] in NOVEL_IDS for i in train.image_ids for a in train.annotations(i))
    _check(train)
    _check(val)


def test_lvis_layout_loads_through_the_lvis_config(tmp_path: Path) -> None:
    layout = write_lvis_layout(tmp_path / "lvis", train_images=4, val_images=3)
    cfg = load_config("experiments/lp_ovod_lvis", [f"dataset.root={layout.root}"])
    ensure_dataset(cfg)
    val = load_dataset(cfg, "val")
    assert set(val.novel_ids) == {cid for cid, _, freq in LVIS_SAMPLE if freq == "r"}
    assert str(val.image_path(val.image_ids[0])).endswith("coco/val2017/000000100001.jpg")
    _check(load_dataset(cfg, "train"))
    _check(val)
