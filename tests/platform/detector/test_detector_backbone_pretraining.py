"""The base-crop backbone (``model.backbone_weights: base-crops``): base classes only,
pretrained once per world, resolved to a file on the driver, loaded like ImageNet weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from ovdlab.platform.config import ShapesConfig, load_config
from ovdlab.platform.data.catalog import OVDDataset
from ovdlab.platform.data.shapes import generate_shapes
from ovdlab.platform.detector import backbone_pretraining as bp
from ovdlab.platform.detector.backbone import build_resnet


def _split(root: Path, split: str) -> OVDDataset:
    return OVDDataset(root / "annotations" / f"{split}.json", root / "images" / split)


@pytest.fixture(scope="module")
def oracle_world(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("oracle"), ShapesConfig(train_images=8, val_images=4, oracle=True))


def test_base_crops_never_take_novel_boxes(oracle_world):
    train = _split(oracle_world, "train")
    novel_boxes = sum(int(a["category_id"]) in train.novel_ids for i in train.image_ids for a in train.annotations(i))
    assert novel_boxes > 0  # the oracle world has them: the filter is what keeps them out
    _, windows, labels, classes = bp.base_crops(train, context=1.2)
    base_boxes = sum(int(a["category_id"]) in train.base_ids for i in train.image_ids for a in train.annotations(i))
    assert sum(len(w) for w in windows) == base_boxes == len(torch.cat(labels))
    names = {int(c["id"]): c["name"] for c in train.categories}
    assert classes == [names[i] for i in sorted(train.base_ids)]
    # Square windows 1.2x the longer side, centred on the box.
    first = train.annotations([i for i in train.image_ids if any(int(a["category_id"]) in train.base_ids
                                                                 for a in train.annotations(i))][0])
    box = next(a["bbox"] for a in first if int(a["category_id"]) in train.base_ids)
    side = 1.2 * max(box[2], box[3])
    assert torch.allclose(windows[0][0, 2:] - windows[0][0, :2], torch.tensor([side, side]))


@pytest.fixture
def tiny_cfg(tmp_path, tiny_overrides):
    def make(overrides=()):
        return load_config("experiments/vild_text_shapes",
                           [f"work_dir={tmp_path / 'work'}", *tiny_overrides, "model.backbone_weights=base-crops", *overrides])
    return make


def test_base_crops_is_a_name_not_a_path(tiny_cfg):
    cfg = tiny_cfg()
    assert cfg.model.backbone_weights == "base-crops"
    with pytest.raises(ValueError, match="names a pretraining"):
        build_resnet(cfg.model)


def test_pretrained_once_and_loaded_like_imagenet_weights(tiny_cfg, monkeypatch):
    monkeypatch.setitem(bp.PRETRAIN_DEFAULTS, "epochs", 1)
    calls = []
    real = bp.pretrain_backbone
    monkeypatch.setattr(bp, "pretrain_backbone", lambda *a: calls.append(1) or real(*a))
    cfg = tiny_cfg()
    resolved = bp.resolve_backbone_weights(cfg)
    path = Path(resolved.model.backbone_weights)
    assert path.is_file() and path.parent == cfg.work_path("backbones") and len(calls) == 1
    meta = bp.json.loads(path.with_suffix(".json").read_text())
    assert meta["classes"] and 0.0 <= meta["val_accuracy"] <= 1.0 and meta["train_crops"] > 0
    # Cached: again, and for the oracle world (same images, base boxes only), no retraining.
    assert bp.resolve_backbone_weights(cfg) == resolved
    oracle = tiny_cfg(["dataset.shapes.oracle=true", "dataset.root=data/shapes-oracle", "train.vocabulary=all"])
    assert bp.base_crop_backbone_path(oracle) == path and len(calls) == 1
    net = build_resnet(resolved.model)
    state = torch.load(path, weights_only=True)
    loaded = net.state_dict()  # FrozenBatchNorm2d keeps no num_batches_tracked
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert isinstance(net.bn1, FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="shapes world"):
        bp.ensure_base_crop_backbone(cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"kind": "coco"})}))


def test_prepare_training_hands_workers_the_file(tiny_cfg, monkeypatch):
    from ovdlab.platform.train.trainer import prepare_training, run_dir_for

    monkeypatch.setitem(bp.PRETRAIN_DEFAULTS, "epochs", 1)
    cfg = tiny_cfg()
    prepared = prepare_training(cfg, run_dir_for(cfg))
    assert Path(prepared.cfg.model.backbone_weights).is_file()
