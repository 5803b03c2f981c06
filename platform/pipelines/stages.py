"""Stage keys: what an offline stage's output depends on, hashed into its folder name.

A stage's output lives at a path derived from the content key of its inputs
(docs/architecture.md, "The flow"): the same inputs always map to the same folder, a
finished folder (its ``manifest.json`` written last) is reused instead of recomputed,
and an unfinished one is resumed. A sweep over a loss weight therefore shares one
region store among all its trials, while changing the teacher weights, the crop
recipe, the proposal settings or the annotations gives a new store.

The extraction key hashes: the annotation file's bytes (not its path, so moving a
dataset keeps its stores), the split, the proposal settings that matter for the
configured source plus the source's own fingerprint (an imported file's or a
checkpoint's digest, the CLIP vocabulary), the teacher's id and weights digest, the
crop recipe, the store schema version and :data:`EXTRACT_VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovdlab.platform.config import ExperimentConfig, ProposalsConfig, content_key, file_digest
from ovdlab.platform.store.schema import SCHEMA_VERSION

EXTRACT_VERSION = 2
"""Bump when the extraction code changes what it writes, so old stores are not reused."""
STORES_DIR = "stores"

# The proposal settings each source reads (others do not change its output).
_SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "gt": (),
    "file": ("per_image",),
    "clip": (
        "per_image",
        "nms_thresh",
        "anchor_stride",
        "anchor_sizes",
        "anchor_ratios",
        "drop_base_iou",
        "drop_base_argmax",
    ),
    "rpn": ("per_image",),
}


def proposal_settings(pcfg: ProposalsConfig) -> dict[str, Any]:
    """The source name and the fields of ``pcfg`` that source uses."""
    fields = pcfg.model_dump(mode="json")
    return {"source": pcfg.source, **{name: fields[name] for name in _SOURCE_FIELDS[pcfg.source]}}


@dataclass(frozen=True)
class StageSpec:
    """One keyed stage: its name, content key, output folder and the inputs hashed."""

    name: str
    key: str
    path: Path
    inputs: dict[str, Any]


def extraction_stage(
    cfg: ExperimentConfig,
    split: str,
    annotation_file: Path,
    teacher_id: str,
    teacher_digest: str,
    source_fingerprint: dict[str, Any],
) -> StageSpec:
    """The region-extraction stage of ``split``: key and ``work_dir/stores/<split>-<key>``."""
    inputs = {
        "stage": "extract",
        "version": EXTRACT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "annotation_digest": file_digest(Path(annotation_file)),
        "split": split,
        "proposals": proposal_settings(cfg.proposals),
        "source": source_fingerprint,
        "teacher_id": teacher_id,
        "teacher_digest": teacher_digest,
        "crop": cfg.store.crop,
    }
    key = content_key(inputs)
    return StageSpec("extract", key, store_path(cfg, split, key), inputs)


def store_path(cfg: ExperimentConfig, split: str, key: str) -> Path:
    """Where the region store of ``split`` with content key ``key`` lives."""
    return cfg.work_path(STORES_DIR, f"{split}-{key}")
