"""Pretrain the ``shapes-tiny`` CLIP teacher on object crops and their captions.

The analogue of web-scale CLIP pretraining for the shapes world: a small open_clip model
(``loading.TINY_CONFIG``) is trained contrastively (CLIP's symmetric InfoNCE with a
learnable logit scale, Radford et al. 2021, Fig. 3) on the crops of every object of the
training images paired with their captions (``annotations/captions_train.json``). Novel
classes are included -- their objects carry no box in ``train.json`` but, as for CLIP on
web data, they do appear in image-text pairs -- which is what makes the teacher
open-vocabulary for the detector.

Each epoch every object is cropped anew with one of the crop recipes of ``regions.py``
(plain, 1.5x, 1.2x zero-padded square) after a small box jitter, so the teacher sees every
view it will be asked about and proposals that are not tight. Zero-shot quality is
measured on the held-out ground-truth crops of ``annotations/val.json``: each crop is
classified among all class names with the ``photo`` prompt; accuracy is reported for base
and novel classes (headline numbers on ``plain`` crops, every recipe in ``by_crop``).

Measured on the default world (800 train images, 2799 captions; 747 validation boxes):
40 epochs of 128 pairs (840 steps) reach 95.1% base / 95.8% novel zero-shot accuracy on
plain crops (95.8/97.6 for 1x+1.5x, 95.0/98.8 for 1.2x-square) in 141 s on one core of
the 2-core development machine.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from ovdlab.platform.config import ExperimentConfig, TeacherConfig, content_key
from ovdlab.platform.data.catalog import OVDDataset, ensure_dataset
from ovdlab.platform.data.shapes import dataset_key
from ovdlab.platform.progress import progress
from ovdlab.platform.teacher.loading import (
    TINY_CONFIG,
    TINY_MODEL,
    Teacher,
    register_tiny_config,
    teachers_dir,
    wrap_model,
    write_checkpoint,
)
from ovdlab.platform.teacher.prompts import text_bank
from ovdlab.platform.teacher.regions import CROPS, embed_regions, image_tensor, roi_crops, view_boxes

log = logging.getLogger(__name__)

PRETRAIN_VERSION = 3
"""Bump when the training recipe changes, so cached teachers are retrained."""

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 40,
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 0.05,
    "warmup_frac": 0.05,
    "seed": 0,
}
"""What :func:`ensure_shapes_teacher` trains with (also the content key's parameters)."""

MAX_LOGIT_SCALE = math.log(100.0)

BACKGROUND_CAPTION = "a photo of the background"
"""Caption of the object-free crops the teacher also learns from. Web image-text pairs
describe scenes and surfaces too, so CLIP embeds an empty patch of wall or sky away from
object names; a teacher that saw only object crops embeds a proposal on empty
background next to some class (measured: 48.7% of background proposals nearest a novel
class), and ViLD then distills that class into background regions."""
BACKGROUND_TRIES = 20
BACKGROUND_MAX_COVER = 0.1


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _read_captions(dataset_root: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[str]], int]:
    """Per training image: uint8 image, xyxy boxes and captions of its objects."""
    cap_path = dataset_root / "annotations" / "captions_train.json"
    if not cap_path.is_file():
        raise FileNotFoundError(f"shapes captions not found: {cap_path} (generate the dataset first)")
    captions = json.loads(cap_path.read_text()).get("captions")
    if not captions:
        raise ValueError(f"{cap_path} has no captions")
    train = OVDDataset(dataset_root / "annotations" / "train.json", dataset_root / "images" / "train")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for item in captions:
        by_image.setdefault(int(item["image_id"]), []).append(item)
    images, boxes, texts = [], [], []
    for image_id in progress(sorted(by_image), desc="teacher: load crops", unit="img"):
        images.append(image_tensor(train.image_path(image_id)))
        boxes.append(torch.tensor([_xyxy(c["bbox"]) for c in by_image[image_id]], dtype=torch.float32))
        texts.append([str(c["caption"]) for c in by_image[image_id]])
    return images, boxes, texts, len(captions)


def _jitter(boxes: torch.Tensor, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Training crop boxes: each box gets one of the crop recipes of ``regions.py`` at random,
    after a small jitter (scale 0.9-1.1, centre shift up to 5% of the side), so the teacher
    learns every view it will be asked about, and proposals that are not tight."""
    n = boxes.shape[0]
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + (torch.rand(n, 2, generator=gen) - 0.5) * 0.1 * wh
    wh = wh * (0.9 + 0.2 * torch.rand(n, 1, generator=gen))
    jittered = torch.cat([centre - wh / 2, centre + wh / 2], dim=1)
    recipe = torch.randint(len(CROPS), (n,), generator=gen)
    out = torch.empty_like(jittered)
    for k, crop in enumerate(CROPS):
        chosen = recipe == k
        if chosen.any():
            views = view_boxes(jittered[chosen], crop, height, width)
            out[chosen] = views[-1]  # 1x+1.5x: its 1.5x view (the 1x view is the plain recipe)
    return out


def background_box(objects: torch.Tensor, height: int, width: int, gen: torch.Generator) -> torch.Tensor | None:
    """A random square of 12-45% of the image side that holds (almost) no object, or None.

    At most ``BACKGROUND_MAX_COVER`` of the square may lie on any one object's box;
    ``BACKGROUND_TRIES`` random draws, then the image gives no background crop this epoch.
    """
    side = min(height, width)
    for _ in range(BACKGROUND_TRIES):
        s = side * (0.12 + 0.33 * float(torch.rand((), generator=gen)))
        x0 = (width - s) * float(torch.rand((), generator=gen))
        y0 = (height - s) * float(torch.rand((), generator=gen))
        box = torch.tensor([x0, y0, x0 + s, y0 + s])
        lo = torch.maximum(objects[:, :2], box[:2])
        hi = torch.minimum(objects[:, 2:], box[2:])
        cover = (hi - lo).clamp(min=0).prod(dim=1) / (s * s)
        if objects.numel() == 0 or float(cover.max()) <= BACKGROUND_MAX_COVER:
            return box
    return None


def _epoch_pairs(
    images: list[torch.Tensor], boxes: list[torch.Tensor], size: int, mean, std, gen
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's crops and the index of each one's caption.

    Every object once (caption index = its position in the flattened captions), plus one
    background square per image captioned ``BACKGROUND_CAPTION`` (index -1).
    """
    crops, caption_index, offset = [], [], 0
    for image, image_boxes in zip(images, boxes):
        height, width = image.shape[1], image.shape[2]
        rois = _jitter(image_boxes, height, width, gen)
        index = list(range(offset, offset + len(image_boxes)))
        offset += len(image_boxes)
        background = background_box(image_boxes, height, width, gen)
        if background is not None:
            rois = torch.cat([rois, background[None]])
            index.append(-1)
        crops.append(roi_crops(image, rois, size, mean, std))
        caption_index.extend(index)
    return torch.cat(crops), torch.tensor(caption_index)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to 0 (CLIP's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only, as CLIP/open_clip training (no decay on gains, biases, scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "logit_scale" in name or "positional_embedding" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def zero_shot_accuracy(teacher: Teacher, dataset: OVDDataset, crop: str = "plain") -> dict[str, float]:
    """Accuracy of classifying each ground-truth crop among all class names (``photo`` prompt)."""
    bank = text_bank(teacher, dataset.class_names, "photo")
    ids = list(dataset.category_ids)
    novel = set(dataset.novel_ids)
    images, boxes, labels = [], [], []
    for image_id in dataset.image_ids:
        anns = [a for a in dataset.annotations(image_id) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        images.append(image_tensor(dataset.image_path(image_id)))
        boxes.append(torch.tensor([_xyxy(a["bbox"]) for a in anns], dtype=torch.float32))
        labels.extend(int(a["category_id"]) for a in anns)
    if not labels:
        raise ValueError(f"{dataset.ann_json}: no ground-truth boxes to evaluate the teacher on")
    emb = torch.cat(embed_regions(teacher, images, boxes, crop, teacher.batch_size))
    pred = (emb @ bank.embeddings.T).argmax(dim=1)
    predicted = torch.tensor(ids)[pred]
    truth = torch.tensor(labels)
    is_novel = torch.tensor([lab in novel for lab in labels])
    correct = (predicted == truth).float()

    def acc(mask: torch.Tensor) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    kind_of = {int(c["id"]): c.get("novel_kind") for c in dataset.categories}
    kinds = sorted({kind_of[i] for i in novel if kind_of[i]})
    by_kind = {f"acc_novel_{k}": acc(torch.tensor([kind_of[lab] == k for lab in labels])) for k in kinds}
    return {
        "acc_base": acc(~is_novel),
        "acc_novel": acc(is_novel),
        **by_kind,
        "acc_all": float(correct.mean()),
        "n_base": int((~is_novel).sum()),
        "n_novel": int(is_novel.sum()),
    }


def pretrain_shapes_teacher(
    dataset_root: Path,
    out_path: Path,
    epochs: int = PRETRAIN_DEFAULTS["epochs"],
    batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
    lr: float = PRETRAIN_DEFAULTS["lr"],
    weight_decay: float = PRETRAIN_DEFAULTS["weight_decay"],
    warmup_frac: float = PRETRAIN_DEFAULTS["warmup_frac"],
    seed: int = PRETRAIN_DEFAULTS["seed"],
) -> dict[str, Any]:
    """Train ``shapes-tiny`` on the crops and captions under ``dataset_root``; save to ``out_path``.

    Returns the zero-shot accuracy on the validation ground-truth crops (``acc_base``,
    ``acc_novel``, ``acc_all`` for the ``plain`` crop and ``by_crop`` for every recipe),
    the number of steps and the wall-clock seconds. The same numbers go into the
    checkpoint's JSON sidecar.
    """
    with _one_thread():
        return _pretrain(dataset_root, out_path, epochs, batch_size, lr, weight_decay, warmup_frac, seed)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the setting.

    The tiny model's matrices (128 crops x 5 tokens x 64 channels) are too small to gain
    from intra-op threads; measured on 2 shared cores, two threads made a training step
    5-15x slower (spin-waiting) than one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pretrain(
    dataset_root: Path,
    out_path: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_frac: float,
    seed: int,
) -> dict[str, Any]:
    dataset_root = Path(dataset_root)
    start = time.time()
    register_tiny_config()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    pp = open_clip.get_model_preprocess_cfg(model)
    size, mean, std = int(model.visual.image_size[0]), pp["mean"], pp["std"]

    images, boxes, texts, n = _read_captions(dataset_root)
    # The background caption last, so that caption index -1 picks it.
    tokens = tokenizer([t for ts in texts for t in ts] + [BACKGROUND_CAPTION])
    steps_per_epoch = max(1, (n + len(images)) // batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_frac * total))
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, warmup, total))
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress(total=total, desc="teacher: pretrain shapes-tiny", unit="step")
    last = float("nan")
    for _ in range(epochs):
        crops, caption_index = _epoch_pairs(images, boxes, size, mean, std, gen)
        # A crowded image may give no background square: wrap around to fill the epoch.
        order = torch.randperm(len(crops), generator=gen).repeat(2)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            img = F.normalize(model.encode_image(crops[idx]), dim=-1)
            # Captions repeat (a few hundred distinct ones): encode each distinct one once.
            unique, inverse = torch.unique(tokens[caption_index[idx]], dim=0, return_inverse=True)
            txt = F.normalize(model.encode_text(unique), dim=-1)[inverse]
            loss = loss_fn(img, txt, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            last = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}")
    bar.close()
    train_seconds = time.time() - start

    teacher = wrap_model(model, TINY_MODEL, TINY_MODEL, "cpu", TeacherConfig().batch_size)
    val = OVDDataset(dataset_root / "annotations" / "val.json", dataset_root / "images" / "val")
    by_crop = {crop: zero_shot_accuracy(teacher, val, crop) for crop in CROPS}
    shapes_meta = dataset_root / "shapes.json"
    result: dict[str, Any] = {
        **by_crop["plain"],
        "by_crop": by_crop,
        "final_loss": last,
        "steps": total,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - start, 1),
    }
    meta = {
        "kind": "shapes-pretrain",
        "model": TINY_MODEL,
        "model_cfg": TINY_CONFIG,
        "version": PRETRAIN_VERSION,
        "dataset_root": str(dataset_root),
        "dataset_key": json.loads(shapes_meta.read_text()).get("key") if shapes_meta.is_file() else None,
        "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                   "warmup_frac": warmup_frac, "seed": seed},
        "digest": teacher.digest,
        **result,
    }
    write_checkpoint(model, Path(out_path), meta)
    kinds = "".join(f", {k[len('acc_'):]} {v:.3f}" for k, v in result.items() if k.startswith("acc_novel_"))
    log.info(
        "shapes-tiny teacher: zero-shot acc base %.3f novel %.3f%s (%d steps, %.0f s) -> %s",
        result["acc_base"], result["acc_novel"], kinds, total, result["seconds"], out_path,
    )
    return result


def shapes_teacher_path(work_dir: Path, dataset_key: str, params: dict[str, Any] | None = None) -> Path:
    """``work_dir/teachers/shapes-tiny-<key>.pt``; the key covers data, architecture and recipe."""
    params = {**PRETRAIN_DEFAULTS, **(params or {})}
    key = content_key("shapes-teacher", PRETRAIN_VERSION, dataset_key, TINY_CONFIG, params)
    return teachers_dir(work_dir) / f"{TINY_MODEL}-{key}.pt"


def ensure_shapes_teacher(cfg: ExperimentConfig) -> Path:
    """The cached ``shapes-tiny`` checkpoint for ``cfg``'s shapes dataset, pretrained once if missing."""
    if cfg.dataset.kind != "shapes":
        raise ValueError(
            f"the shapes-tiny teacher is pretrained on the shapes world, not dataset.kind={cfg.dataset.kind!r}"
        )
    root = ensure_dataset(cfg)
    # The oracle world differs only in train.json's boxes; its captions and validation
    # split, all the teacher learns from and is scored on, are the same: one teacher.
    path = shapes_teacher_path(cfg.work_path(), dataset_key(cfg.dataset.shapes.model_copy(update={"oracle": False})))
    if path.is_file():
        return path
    log.info("pretraining the shapes-tiny teacher once -> %s", path)
    result = pretrain_shapes_teacher(root, path)
    if not (result["acc_base"] >= 0.9 and result["acc_novel"] >= 0.9):
        log.warning(
            "shapes-tiny teacher below the 90%% target: base %.3f novel %.3f", result["acc_base"], result["acc_novel"]
        )
    return path

