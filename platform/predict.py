"""Open-vocabulary prediction: a trained checkpoint, an image, any list of class names.

The detector classifies region embeddings against whatever text bank it is given
(docs/architecture.md), so the vocabulary at prediction time is free: the names are
embedded by the checkpoint's teacher with its prompt recipe (``teacher.prompt``), the
bank is installed with ``set_vocabulary`` and the image goes through the same resize
as evaluation. Boxes come back in the image's own pixels.

    predictor = Predictor.from_checkpoint("work/runs/<run>/checkpoint_...")
    dets = predictor.predict("image.png", ["red circle", "purple star"])
    save_outputs(dets, "image.png", "out/", seen=predictor.train_classes)

A checkpoint carries its resolved config (``config.yaml``), so the path alone (the
folder or its ``model.pt``) is enough; :meth:`Predictor.from_mlflow_run` finds the
checkpoint a training run logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ovdlab.methods.base import Vocabulary
from ovdlab.platform.config import ExperimentConfig, calibrate
from ovdlab.platform.data.catalog import OVDDataset
from ovdlab.platform.data.images import load_image
from ovdlab.platform.detector.inference import predict_images
from ovdlab.platform.detector.model import OVDDetector
from ovdlab.platform.evaluation.plots import one_label_per_object
from ovdlab.platform.teacher.loading import Teacher
from ovdlab.platform.train.checkpoint import CONFIG_FILE, MODEL_FILE, load_model_checkpoint

log = logging.getLogger(__name__)

DEFAULT_SCORE_THRESH = 0.3
"""Prediction shows confident boxes; evaluation keeps every box above ``eval.score_thresh``."""
DETECTIONS_JSON = "detections.json"
PICTURE = "detections.png"
SEEN_COLOR = (31, 119, 180)
NEW_COLOR = (214, 39, 40)
MIN_PICTURE_SIDE = 256


def parse_vocab(text: str) -> list[str]:
    """``"red circle, purple star"`` -> ``["red circle", "purple star"]``; duplicates are errors."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"vocabulary {text!r} names no class; give comma-separated names, e.g. 'red circle,blue star'")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"vocabulary names {dupes} more than once")
    return names


class Predictor:
    """A trained detector plus the teacher that embeds vocabularies for it."""

    def __init__(
        self, cfg: ExperimentConfig, model: OVDDetector, teacher: Teacher, meta: dict[str, Any], checkpoint: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.model = model.eval()
        self.teacher = teacher
        self.meta = meta
        self.checkpoint = checkpoint

    @property
    def train_classes(self) -> list[str]:
        """Class names the detector was trained on (the rest of any vocabulary is new to it)."""
        return list(self.meta.get("train_classes", []))

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, cfg: ExperimentConfig | None = None, device: str | torch.device | None = None
    ) -> "Predictor":
        """Load a checkpoint folder or its ``model.pt`` (own config unless ``cfg`` is given) onto ``device``.

        ``device`` None picks CUDA when available. The teacher is the very file used in
        training when the checkpoint names one that still exists, else the config's; a
        teacher whose weights differ from those used in training gives a warning (the
        text embeddings would not be the ones the detector learned against).
        """
        from ovdlab.platform.train.loop import build_model, checkpoint_classes
        from ovdlab.platform.train.trainer import load_training_teacher

        ckpt = load_model_checkpoint(path, cfg)
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher_file = Path(ckpt.meta["teacher_checkpoint"]) if ckpt.meta.get("teacher_checkpoint") else None
        if teacher_file is not None and not teacher_file.is_file():
            log.warning("teacher checkpoint %s of %s is gone; loading the teacher the config names", teacher_file, ckpt.path)
            teacher_file = None
        teacher, _ = load_training_teacher(ckpt.cfg, str(dev), checkpoint=teacher_file)
        digest = ckpt.meta.get("teacher_digest")
        if digest and digest != teacher.digest:
            log.warning(
                "teacher %s has weights digest %s but %s was trained with %s; predictions may be off",
                teacher.teacher_id, teacher.digest, ckpt.path, digest,
            )
        embed_dim = int(ckpt.meta.get("embed_dim", teacher.embed_dim))
        if embed_dim != teacher.embed_dim:
            raise ValueError(
                f"{ckpt.path} was trained against {embed_dim}-d text embeddings but teacher "
                f"{teacher.teacher_id} gives {teacher.embed_dim}-d"
            )
        cfg = calibrate(ckpt.cfg, teacher.logit_scale)  # a given cfg may leave it to the teacher
        model = build_model(cfg, embed_dim, checkpoint_classes(ckpt.meta, embed_dim))
        model.load_state_dict(ckpt.state_dict)
        return cls(cfg, model.to(dev), teacher, ckpt.meta, ckpt.path)

    @classmethod
    def from_mlflow_run(
        cls, run_id: str, cfg: ExperimentConfig, device: str | torch.device | None = None
    ) -> "Predictor":
        """The final checkpoint of a training run: its ``checkpoint`` folder when that
        exists here, else the ``checkpoint/`` artifacts the run logged (``cfg`` only says
        where the tracking store is)."""
        from ovdlab.platform.tracking import tracker_from_config

        tracker = tracker_from_config(cfg)
        if not tracker.enabled:
            raise ValueError("tracking.enabled is false; cannot look up an MLflow run")
        run = tracker.client.get_run(run_id)
        local = run.data.tags.get("checkpoint")
        if local and (Path(local) / MODEL_FILE).is_file() and (Path(local) / CONFIG_FILE).is_file():
            return cls.from_checkpoint(local, device=device)
        names = {Path(a.path).name for a in tracker.client.list_artifacts(run_id, "checkpoint")}
        if not {MODEL_FILE, CONFIG_FILE} <= names:
            raise FileNotFoundError(
                f"MLflow run {run_id} in {tracker.uri} has no usable checkpoint: tag checkpoint={local!r} "
                f"is not a checkpoint folder here and the run logged no checkpoint/{MODEL_FILE} + {CONFIG_FILE} "
                f"(was the training completed?)"
            )
        folder = tracker.client.download_artifacts(run_id, "checkpoint")
        return cls.from_checkpoint(folder, device=device)

    def text_embeddings(self, names: Sequence[str], cache: bool = False) -> torch.Tensor:
        """``[C, D]`` embeddings of ``names`` under the config's prompt recipe (cached in the work dir if asked)."""
        from ovdlab.platform.teacher.prompts import cached_text_bank, text_bank

        names = list(names)
        recipe = self.cfg.teacher.prompt
        if cache:
            bank = cached_text_bank(self.teacher, names, recipe, self.cfg.work_path("text_banks"))
        else:
            bank = text_bank(self.teacher, names, recipe)
        return bank.embeddings

    def vocabulary(self, names: Sequence[str], cache: bool = False) -> Vocabulary:
        """``names`` embedded (see :meth:`text_embeddings`), novel = not among the classes
        this detector was trained on (``train_classes`` of its checkpoint)."""
        return Vocabulary.against(self.text_embeddings(names, cache), list(names), self.train_classes)

    def predict_array(
        self, image: np.ndarray, vocab: Sequence[str], score_thresh: float = DEFAULT_SCORE_THRESH
    ) -> list[dict[str, Any]]:
        """Detections on an ``H x W x 3`` uint8 image (see :meth:`predict`)."""
        vocab = list(vocab)
        if not vocab:
            raise ValueError("the vocabulary is empty; give at least one class name")
        eval_cfg = self.cfg.eval.model_copy(update={"score_thresh": score_thresh, "batch_size": 1})
        det = predict_images(self.model, [image], self.vocabulary(vocab), eval_cfg, self.cfg.model.min_size,
                             self.cfg.model.max_size)[0]
        out = []
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            out.append({"box": [round(v, 2) for v in box], "score": round(float(score), 4), "label": vocab[label]})
        return sorted(out, key=lambda d: -d["score"])

    def predict(
        self, image_path: str | Path, vocab: Sequence[str], score_thresh: float = DEFAULT_SCORE_THRESH
    ) -> list[dict[str, Any]]:
        """Detections on an image file: ``{"box": [x1, y1, x2, y2] (original pixels), "score", "label"}``.

        Boxes scoring below ``score_thresh`` are dropped; NMS and the per-image cap are the
        config's ``eval`` settings. An unreadable file raises ``ImageDecodeError`` naming it.
        """
        return self.predict_array(load_image(image_path), vocab, score_thresh)


def shown_detections(detections: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The detections a picture shows, best first (:func:`one_label_per_object`); ``detections.json`` keeps all."""
    keep = one_label_per_object([d["box"] for d in detections], [float(d["score"]) for d in detections])
    return [detections[i] for i in keep]


def draw_detections(image: np.ndarray, detections: Sequence[dict[str, Any]], seen: Sequence[str] = ()) -> Image.Image:
    """The image with labelled boxes (:func:`shown_detections`); classes in ``seen`` (trained on) blue, new ones red.

    Images smaller than ``MIN_PICTURE_SIDE`` are enlarged by a whole factor (nearest
    neighbour) so that the labels stay readable; the best-scoring box is drawn last, on top.
    """
    picture = Image.fromarray(image).convert("RGB")
    factor = max(1, -(-MIN_PICTURE_SIDE // max(picture.size)))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    seen_set = set(seen)
    for det in reversed(shown_detections(detections)):
        x1, y1, x2, y2 = (float(v) * factor for v in det["box"])
        color = SEEN_COLOR if det["label"] in seen_set else NEW_COLOR
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        height = bottom - top + 2
        y = y1 - height if y1 >= height else y1 + 1  # above the box, or inside it at the top edge
        draw.rectangle([x1, y, x1 + right - left + 2, y + height], fill=color)
        draw.text((x1 + 1, y), text, fill=(255, 255, 255), font=font)
    return picture


def save_outputs(
    detections: Sequence[dict[str, Any]], image: str | Path | np.ndarray, out_dir: str | Path, seen: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write ``detections.json`` and ``detections.png`` (labelled boxes) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    array = load_image(image) if isinstance(image, (str, Path)) else image
    json_path = out / DETECTIONS_JSON
    payload = {
        "image": str(image) if isinstance(image, (str, Path)) else None,
        "width": int(array.shape[1]),
        "height": int(array.shape[0]),
        "detections": list(detections),
    }
    json_path.write_text(json.dumps(payload, indent=1))
    png_path = out / PICTURE
    draw_detections(array, detections, seen).save(png_path)
    return json_path, png_path


def showcase_image(dataset: OVDDataset, kind: str = "concept") -> int:
    """The first image showing a base object and a novel class of ``kind`` (a demo picture).

    The categories must carry ``split`` and, for novel ones, ``novel_kind`` (the shapes
    world's tags); raises ``LookupError`` when no image shows both.
    """
    cats = {int(c["id"]): c for c in dataset.categories}
    for image_id in dataset.image_ids:
        tags = [cats[int(a["category_id"])] for a in dataset.annotations(image_id)]
        has_base = any(c.get("split") == "base" for c in tags)
        if has_base and any(c.get("novel_kind") == kind for c in tags):
            return int(image_id)
    raise LookupError(f"{dataset.ann_json}: no image shows both a base class and a novel {kind!r} class")


def showcase(predictor: Predictor, dataset: OVDDataset, out_dir: str | Path, kind: str = "concept") -> tuple[Path, Path]:
    """Detections of :func:`showcase_image` with every class of ``dataset`` in the vocabulary.

    Trained classes are drawn blue, the rest red (:func:`draw_detections`), so the
    picture shows at a glance whether a held-out concept is found and named.
    """
    image_id = showcase_image(dataset, kind)
    path = dataset.image_path(image_id)
    vocab = [str(c["name"]) for c in dataset.categories]
    return save_outputs(predictor.predict(path, vocab), path, out_dir, seen=predictor.train_classes)
