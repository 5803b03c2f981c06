"""DetectionDataset over a real OVDDataset and RegionStore written in a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovdlab.platform.data.catalog import OVDDataset
from ovdlab.platform.data.images import ImageDecodeError
from ovdlab.platform.detector.data import DetectionDataset, collate_fn, targets_to
from ovdlab.platform.store import ImageRegions, RegionStore, RegionStoreWriter

EMBED = 8
H, W = 60, 80
GT_BOX = [10, 20, 30, 45]  # xyxy, category 3 (base)
DISTILL_BOX = [41, 5, 77, 33]  # xyxy, first store region of image 1


def write_png(path: Path, boxes: list[list[int]]) -> None:
    """Black image; box c is a filled rectangle in channel c."""
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    for channel, (x1, y1, x2, y2) in enumerate(boxes):
        pixels[y1:y2, x1:x2, channel] = 255
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("detector_data")
    images = root / "images"
    images.mkdir()
    write_png(images / "1.png", [GT_BOX, DISTILL_BOX])
    write_png(images / "2.png", [])
    Image.new("RGB", (W, H + 1)).save(images / "4.png")
    (images / "3.png").write_bytes(b"not a png")
    x1, y1, x2, y2 = GT_BOX
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in (1, 2, 3, 4)],
        "categories": [
            {"id": 1, "name": "one", "split": "base"},
            {"id": 2, "name": "two", "split": "novel"},
            {"id": 3, "name": "three", "split": "base"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [50, 40, 20, 15], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 0},  # novel: dropped
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 50, 30, 10], "iscrowd": 1},  # crowd: dropped
            {"id": 14, "image_id": 3, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0},
        ],
    }
    ann = root / "train.json"
    ann.write_text(json.dumps(coco))

    manifest = {
        "dataset": "toy",
        "split": "train",
        "proposal_source": "gt",
        "teacher_id": "toy",
        "teacher_digest": "0",
        "crop": "plain",
        "content_key": "abc123",
    }
    writer = RegionStoreWriter(root / "store", EMBED, manifest, extras=("confidence",))
    rng = np.random.default_rng(0)
    rows = [
        ImageRegions(
            1,
            np.array([DISTILL_BOX, [0, 0, 20, 20], [70, 50, 100, 90], [90, 0, 120, 10], [5, 5, 25, 40]], np.float32),
            np.ones(5, np.float32),
            rng.standard_normal((5, EMBED)),
            {"confidence": np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)},
        ),
        ImageRegions(
            2,
            np.array([[1, 2, 30, 40]], np.float32),
            np.ones(1, np.float32),
            rng.standard_normal((1, EMBED)),
            {"confidence": np.array([0.25], np.float32)},
        ),
    ]
    writer.write_part(rows)
    writer.finalize()
    return OVDDataset(ann, images), RegionStore(root / "store"), rows


def item(world, image_id, **kwargs):
    dataset, store, _ = world
    args = dict(class_ids=list(dataset.base_ids), train=False, min_size=120, max_size=1000, store=store)
    ds = DetectionDataset(dataset, **{**args, **kwargs})
    return ds[ds.image_ids.index(image_id)]


def drawn_box(channel: torch.Tensor) -> list[int]:
    ys, xs = torch.where(channel > 0.5)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_labels_map_to_vocabulary_indexes(world):
    dataset, _, _ = world
    _, target = item(world, 1, class_ids=[3, 1])
    assert target["labels"].tolist() == [1, 2]  # cat 3 -> index 0, cat 1 -> index 1; novel and crowd dropped
    _, target = item(world, 1, class_ids=[1, 2, 3])
    assert sorted(target["labels"].tolist()) == [1, 2, 3]  # a vocabulary with the novel class keeps it
    with pytest.raises(ValueError, match="duplicates"):
        DetectionDataset(dataset, [1, 1], train=False, min_size=64, max_size=64)


def test_boxes_and_distill_boxes_follow_resize_to_the_pixel(world):
    image, target = item(world, 1, class_ids=[3, 1])
    assert image.shape == (3, 120, 160) and image.dtype == torch.float32 and image.max() <= 1.0
    assert target["scale"] == (2.0, 2.0) and target["orig_size"] == (H, W) and not target["flipped"]
    assert target["image_id"] == 1
    assert drawn_box(image[0]) == target["boxes"][0].tolist() == [2 * v for v in GT_BOX]
    assert drawn_box(image[1]) == target["distill_boxes"][0].tolist() == [2 * v for v in DISTILL_BOX]


def test_distill_boxes_flipped_with_the_image(world):
    image, target = item(world, 1, class_ids=[3, 1], train=True, flip_prob=1.0)
    assert target["flipped"]
    assert drawn_box(image[0]) == target["boxes"][0].tolist()
    assert drawn_box(image[1]) == target["distill_boxes"][0].tolist()
    x1, y1, x2, y2 = DISTILL_BOX
    assert target["distill_boxes"][0].tolist() == [2 * (W - x2), 2 * y1, 2 * (W - x1), 2 * y2]


def test_random_flip_flag_matches_the_pixels(world):
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        image, target = item(world, 1, class_ids=[3, 1], train=True)
        seen.add(target["flipped"])
        assert drawn_box(image[1]) == target["distill_boxes"][0].tolist()
    assert seen == {True, False}


def test_store_regions_clipped_weighted_and_capped(world):
    _, _, rows = world
    _, target = item(world, 1)
    # region 4 ([90, 0, 120, 10]) lies outside the 80 px wide image and is dropped; region 3 clipped
    assert len(target["distill_boxes"]) == 4
    assert target["distill_boxes"][2].tolist() == [140.0, 100.0, 160.0, 120.0]
    assert target["distill_weights"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.5])
    expected = torch.from_numpy(rows[0].embeddings[[0, 1, 2, 4]].astype(np.float32))
    assert target["distill_embeddings"].dtype == torch.float32
    assert torch.equal(target["distill_embeddings"], expected)

    _, capped = item(world, 1, max_distill=2)  # evaluation: the store's first ones
    assert capped["distill_weights"].tolist() == pytest.approx([0.9, 0.8])
    torch.manual_seed(0)
    picks = {tuple(item(world, 1, max_distill=2, train=True, flip_prob=0.0)[1]["distill_weights"].tolist()) for _ in range(8)}
    assert len(picks) > 1 and all(len(p) == 2 for p in picks)  # training: random subsets


def test_ground_truth_rows_are_all_distilled_and_only_proposals_are_capped(world, tmp_path):
    """EZSD's store (ground truth first, flagged): every ground-truth row every step, at most
    ``max_distill`` proposals, random or the store's first (``distill_order``)."""
    manifest = {"dataset": "toy", "split": "train", "proposal_source": "clip", "teacher_id": "toy",
                "teacher_digest": "0", "crop": "plain", "content_key": "gt123"}
    writer = RegionStoreWriter(tmp_path / "store", EMBED, manifest, extras=("confidence", "ground_truth"))
    boxes = np.array([GT_BOX, [50, 40, 70, 55], [0, 0, 20, 20], [30, 30, 60, 50], [5, 5, 25, 40]], np.float32)
    writer.write_part([ImageRegions(1, boxes, np.ones(5, np.float32), np.random.default_rng(1).standard_normal((5, EMBED)),
                                    {"confidence": np.array([1.0, 1.0, 0.7, 0.6, 0.5], np.float32),
                                     "ground_truth": np.array([1, 1, 0, 0, 0], np.float32)})])
    writer.finalize()
    store = RegionStore(tmp_path / "store")
    torch.manual_seed(0)
    random_picks = set()
    for _ in range(10):
        weights = item(world, 1, store=store, max_distill=1, train=True, flip_prob=0.0)[1]["distill_weights"].tolist()
        assert len(weights) == 3 and weights[:2] == [1.0, 1.0]
        random_picks.add(weights[2])
    assert len(random_picks) > 1
    for _ in range(3):
        first = item(world, 1, store=store, max_distill=1, train=True, flip_prob=0.0, distill_order="first")[1]
        assert first["distill_weights"].tolist() == pytest.approx([1.0, 1.0, 0.7])


def test_image_without_annotations_is_kept_with_its_regions(world):
    dataset, store, _ = world
    ds = DetectionDataset(dataset, list(dataset.base_ids), train=False, min_size=64, max_size=200, store=store)
    assert len(ds) == 4
    _, target = ds[ds.image_ids.index(2)]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["distill_boxes"].shape == (1, 4) and target["distill_weights"].tolist() == [0.25]


def test_no_store_or_image_missing_from_store_gives_no_distill_keys(world):
    _, target = item(world, 1, store=None)
    assert "distill_boxes" not in target
    dataset, store, _ = world
    assert 3 not in store


def test_corrupt_or_resized_image_raises_naming_the_file(world):
    with pytest.raises(ImageDecodeError, match="3.png"):
        item(world, 3)
    with pytest.raises(ImageDecodeError, match=r"4.png: decoded size 80x61 differs from the annotation file's 80x60"):
        item(world, 4)


def test_collate_and_move(world):
    dataset, store, _ = world
    ds = DetectionDataset(dataset, list(dataset.base_ids), train=False, min_size=64, max_size=200, store=store)
    images, targets = collate_fn([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and all(isinstance(t, dict) for t in targets)
    moved = targets_to(targets, "cpu")
    assert moved[0]["image_id"] == targets[0]["image_id"] and torch.equal(moved[0]["boxes"], targets[0]["boxes"])


def test_pseudo_labels_join_the_targets_flipped_and_resized_and_select_the_images(world):
    """A probe's pseudo-labelled boxes (original pixels) go through the image's own flip and
    resize (LP-OVOD's reference left its proposals unscaled and unflipped); only images
    with a pseudo-label are used."""
    dataset, _, _ = world
    x1, y1, x2, y2 = DISTILL_BOX  # drawn in channel 1 of image 1: a "novel" object
    pseudo = {1: [{"image_id": 1, "category_id": 2, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.9}]}
    ds = DetectionDataset(dataset, [3, 1, 2], train=True, min_size=120, max_size=1000, flip_prob=1.0,
                          pseudo_labels=pseudo)
    assert ds.image_ids == [1]
    image, target = ds[0]
    assert target["flipped"] and target["labels"].tolist() == [1, 2, 3, 3]  # ann 12 of category 2, then the pseudo-label
    assert drawn_box(image[1]) == target["boxes"][3].tolist() == [2 * (W - x2), 2 * y1, 2 * (W - x1), 2 * y2]
    with pytest.raises(ValueError, match="no image of the dataset has a pseudo-label"):
        DetectionDataset(dataset, [3, 1, 2], train=True, min_size=64, max_size=64, pseudo_labels={99: []})
