"""A backbone pretrained once on base-class crops: the shapes world's ImageNet.

Detectors for COCO and LVIS start from an ImageNet-pretrained ResNet; none of the four
methods trains its backbone from scratch. The shapes world has no ImageNet, so
``model.backbone_weights: base-crops`` makes one from the world itself: the ResNet is
trained as a classifier of the **base-class** ground-truth crops of the training split
(novel boxes never, also in the oracle world, so every method and the oracle share one
backbone), then handed to the detector like any weights file -- ``FrozenBatchNorm2d``
and ``model.trainable_layers``, as torchvision's ``fasterrcnn_resnet50_fpn`` treats
ImageNet weights.

Recipe: a square window 1.2x the box's longer side (the object and a little context),
resized to 64 px (about the objects' own scale: 12-45% of a 128 px image), a small
jitter of the window and a horizontal flip each epoch; ImageNet normalization (what the
detector applies); softmax cross-entropy; AdamW with a one-cycle schedule. The result
is cached under ``<work_dir>/backbones/`` by a key over the world (base boxes only), the
architecture and the recipe, with a JSON sidecar holding the classes and the accuracy
on the validation split's base crops.

Measured on the default world (ResNet-18, 1632 base crops, 4 epochs): see
docs/benchmarks.md, "Backbone".
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovdlab.platform.config import BASE_CROP_BACKBONE, ExperimentConfig, content_key
from ovdlab.platform.data.catalog import OVDDataset, ensure_dataset
from ovdlab.platform.data.shapes import dataset_key
from ovdlab.platform.progress import progress
from ovdlab.platform.teacher.regions import image_tensor, roi_crops

log = logging.getLogger(__name__)

BACKBONES_SUBDIR = "backbones"
PRETRAIN_VERSION = 1
"""Bump when the recipe changes, so cached backbones are retrained."""

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 4,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "crop_size": 64,
    "context": 1.2,
    "seed": 0,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_crops(dataset: OVDDataset, context: float) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Per image with base objects: uint8 image, square xyxy windows, class indices; the class names.

    Only categories tagged ``base``: a novel box (present in the oracle world's training
    file) would leak the novel classes into every method's backbone.
    """
    base = sorted(int(i) for i in dataset.base_ids)
    index = {cat: k for k, cat in enumerate(base)}
    names = {int(c["id"]): str(c["name"]) for c in dataset.categories}
    images, windows, labels = [], [], []
    for image_id in progress(list(dataset.image_ids), desc="backbone: load base crops", unit="img"):
        anns = [a for a in dataset.annotations(image_id) if int(a["category_id"]) in index and not a.get("iscrowd")]
        if not anns:
            continue
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        centre = boxes[:, :2] + boxes[:, 2:] / 2
        half = boxes[:, 2:].max(dim=1, keepdim=True).values * context / 2
        images.append(image_tensor(dataset.image_path(image_id)))
        windows.append(torch.cat([centre - half, centre + half], dim=1))
        labels.append(torch.tensor([index[int(a["category_id"])] for a in anns]))
    return images, windows, labels, [names[c] for c in base]


def _epoch_crops(images: list[torch.Tensor], windows: list[torch.Tensor], size: int, gen: torch.Generator) -> torch.Tensor:
    """Every window cut anew: centre and side jittered by up to 5%, flipped half the time."""
    out = []
    for image, boxes in zip(images, windows):
        side = boxes[:, 2:3] - boxes[:, 0:1]
        shift = (torch.rand(len(boxes), 4, generator=gen) - 0.5) * 0.1 * side
        crops = roi_crops(image, boxes + shift, size, IMAGENET_MEAN, IMAGENET_STD)
        flip = torch.rand(len(boxes), generator=gen) < 0.5
        crops[flip] = crops[flip].flip(-1)
        out.append(crops)
    return torch.cat(out)


@torch.no_grad()
def _accuracy(net: nn.Module, crops: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    net.eval()
    hits = sum(int((net(crops[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
               for i in range(0, len(crops), batch_size))
    net.train()
    return hits / max(1, len(crops))


def pretrain_backbone(net: nn.Module, train: OVDDataset, val: OVDDataset, params: dict[str, Any]) -> dict[str, Any]:
    """Train ``net`` (a torchvision ResNet with BatchNorm) on base crops; returns what was measured.

    ``net.fc`` is replaced by a classifier over the base classes; the caller keeps
    everything but ``fc`` (:func:`save_backbone`).
    """
    start = time.time()
    gen = torch.Generator().manual_seed(int(params["seed"]))
    torch.manual_seed(int(params["seed"]))
    images, windows, labels, classes = base_crops(train, params["context"])
    if not labels:
        raise ValueError(f"{train.ann_json}: no base-class boxes to pretrain the backbone on")
    targets = torch.cat(labels)
    net.fc = nn.Linear(net.fc.in_features, len(classes))
    size, batch_size = int(params["crop_size"]), int(params["batch_size"])
    steps_per_epoch = max(1, len(targets) // batch_size)
    total = int(params["epochs"]) * steps_per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, params["lr"], total_steps=total, pct_start=0.1)
    net.train()
    bar = progress(total=total, desc="backbone: pretrain on base crops", unit="step")
    for _ in range(int(params["epochs"])):
        crops = _epoch_crops(images, windows, size, gen)
        order = torch.randperm(len(targets), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(net(crops[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    val_images, val_windows, val_labels, _ = base_crops(val, params["context"])
    val_crops = torch.cat([roi_crops(i, w, size, IMAGENET_MEAN, IMAGENET_STD) for i, w in zip(val_images, val_windows)])
    return {
        "classes": classes,
        "train_crops": len(targets),
        "steps": total,
        "final_loss": round(loss.item(), 4),
        "val_base_crops": len(val_crops),
        "val_accuracy": round(_accuracy(net, val_crops, torch.cat(val_labels), batch_size), 4),
        "seconds": round(time.time() - start, 1),
    }


def save_backbone(net: nn.Module, path: Path, meta: dict[str, Any]) -> Path:
    """The ResNet's state dict without ``fc`` (what ``backbone._load_weights`` reads) + a JSON sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items() if not k.startswith("fc.")}, tmp)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def base_crop_backbone_path(cfg: ExperimentConfig) -> Path:
    """``<work_dir>/backbones/<arch>-base-crops-<key>.pt``; the oracle world shares its world's key."""
    world = dataset_key(cfg.dataset.shapes.model_copy(update={"oracle": False}))
    key = content_key("base-crop-backbone", PRETRAIN_VERSION, world, cfg.model.backbone, PRETRAIN_DEFAULTS)
    return cfg.work_path(BACKBONES_SUBDIR, f"{cfg.model.backbone}-{BASE_CROP_BACKBONE}-{key}.pt")


def ensure_base_crop_backbone(cfg: ExperimentConfig) -> Path:
    """The cached base-crop backbone of ``cfg``'s world, pretrained once if missing."""
    from ovdlab.platform.detector.backbone import build_resnet

    if cfg.dataset.kind != "shapes":
        raise ValueError(
            f"model.backbone_weights={BASE_CROP_BACKBONE} pretrains on the shapes world, not dataset.kind="
            f"{cfg.dataset.kind!r}; give COCO and LVIS an ImageNet weights file"
        )
    path = base_crop_backbone_path(cfg)
    if path.is_file():
        return path
    root = ensure_dataset(cfg)
    train = OVDDataset(root / "annotations" / "train.json", root / "images" / "train")
    val = OVDDataset(root / "annotations" / "val.json", root / "images" / "val")
    log.info("pretraining the %s backbone once on base-class crops -> %s", cfg.model.backbone, path)
    net = build_resnet(cfg.model.model_copy(update={"backbone_weights": None, "trainable_layers": 5}))
    result = pretrain_backbone(net, train, val, PRETRAIN_DEFAULTS)
    meta = {"kind": "base-crop-backbone", "version": PRETRAIN_VERSION, "arch": cfg.model.backbone,
            "params": PRETRAIN_DEFAULTS, **result}
    log.info("backbone: %d base crops, validation accuracy %.3f (%.0f s)",
             result["train_crops"], result["val_accuracy"], result["seconds"])
    return save_backbone(net, path, meta)


def resolve_backbone_weights(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``model.backbone_weights: base-crops`` replaced by the cached file's path.

    Run on the driver before training: the workers, the checkpoint's config and every
    later load of the model see a plain weights file.
    """
    if cfg.model.backbone_weights != BASE_CROP_BACKBONE:
        return cfg
    path = ensure_base_crop_backbone(cfg)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone_weights": str(path)})})
