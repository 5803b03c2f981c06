"""Evaluation of a detector over a dataset split with the full vocabulary (base + novel).

The generalized OVD protocol (docs/methods.md, "Shared benchmark definitions"): every
class of the split, base and novel, is in the vocabulary at test time; the detector
keeps ``eval.detections_per_image`` boxes per image after a per-class score threshold
and NMS (torchvision ``RoIHeads.postprocess_detections``); the evaluator scores at
most the benchmark's 100 (COCO, shapes) or 300 (LVIS) per image. Images are decoded
by a ``DataLoader`` (``train.loader_workers`` processes) while the model runs; a file
that cannot be decoded is skipped and listed in :attr:`EvalOutput.skipped`, so one bad
image does not end an evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from ovdlab.methods.base import Vocabulary
from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.data.catalog import OVDDataset
from ovdlab.platform.data.images import read_image
from ovdlab.platform.detector.inference import detections_to_coco, predict_images
from ovdlab.platform.detector.model import OVDDetector
from ovdlab.platform.evaluation import evaluate
from ovdlab.platform.evaluation.coco_eval import SplitMetrics
from ovdlab.platform.evaluation.lvis_eval import LVISMetrics
from ovdlab.platform.progress import progress as progress_bar

log = logging.getLogger(__name__)

Metrics = SplitMetrics | LVISMetrics

@dataclass
class EvalOutput:
    """Metrics, the COCO results they were computed from, and the images skipped."""

    metrics: Metrics
    results: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)


class _DecodedImages(Dataset):
    """``(image_id, HxWx3 uint8 or None, error or None)`` per image, decoded in loader workers."""

    def __init__(self, dataset: OVDDataset, image_ids: Sequence[int]) -> None:
        self.dataset = dataset
        self.image_ids = list(image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int) -> tuple[int, np.ndarray | None, str | None]:
        image_id = self.image_ids[idx]
        decoded = read_image(self.dataset.image_path(image_id))
        return image_id, decoded.image, decoded.error


def _as_list(batch: list[tuple[int, np.ndarray | None, str | None]]) -> list[tuple[int, np.ndarray | None, str | None]]:
    return batch


def detect_split(
    cfg: ExperimentConfig,
    model: OVDDetector,
    dataset: OVDDataset,
    vocab: Vocabulary,
    image_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """COCO results of ``model`` on ``dataset`` (vocabulary row k = ``dataset.category_ids[k]``).

    Returns (results, skipped images). ``vocab`` must have one row per category of the
    dataset, in category-id order (``dataset.class_names``).
    """
    category_ids = list(dataset.category_ids)
    if vocab.size != len(category_ids):
        raise ValueError(
            f"evaluation vocabulary has {vocab.size} rows but {dataset.ann_json} has {len(category_ids)} categories"
        )
    ids = list(dataset.image_ids if image_ids is None else image_ids)
    loader = DataLoader(
        _DecodedImages(dataset, ids),
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.train.loader_workers,
        collate_fn=_as_list,
    )
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    bar = progress_bar(total=len(ids), desc=f"evaluate {dataset.ann_json.name}", unit="img") if progress else None
    for batch in loader:
        good = [(i, img) for i, img, err in batch if img is not None]
        for image_id, _, err in batch:
            if err is not None:
                skipped.append({"image_id": str(image_id), "error": err})
                log.warning("evaluation skips image %s: %s", image_id, err)
        if good:
            dets = predict_images(model, [img for _, img in good], vocab, cfg.eval, cfg.model.min_size, cfg.model.max_size)
            results.extend(detections_to_coco(dets, [i for i, _ in good], category_ids))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results, skipped


def evaluate_model(
    cfg: ExperimentConfig, model: OVDDetector, dataset: OVDDataset, vocab: Vocabulary, progress: bool = True
) -> EvalOutput:
    """Run :func:`detect_split` over the whole split and score it with the dataset's protocol."""
    results, skipped = detect_split(cfg, model, dataset, vocab, progress=progress)
    if len(skipped) == len(dataset):
        raise RuntimeError(f"no image of {dataset.ann_json} could be decoded (first error: {skipped[0]['error']})")
    metrics = evaluate(cfg.dataset.kind, dataset.ann_json, results)
    return EvalOutput(metrics=metrics, results=results, skipped=skipped)


def evaluate_checkpoint(checkpoint: str | Path, split: str = "val", cfg: ExperimentConfig | None = None) -> EvalOutput:
    """Load a training checkpoint and evaluate it on ``split`` with the full vocabulary.

    The config stored in the checkpoint is used unless ``cfg`` is given; the text bank
    is computed by the configured teacher and prompt recipe (cached in the work dir).
    """
    from ovdlab.platform.data.catalog import load_dataset
    from ovdlab.platform.predict import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, cfg=cfg)
    dataset = load_dataset(predictor.cfg, split)  # type: ignore[arg-type]
    return evaluate_model(predictor.cfg, predictor.model, dataset, predictor.vocabulary(dataset.class_names, cache=True))
