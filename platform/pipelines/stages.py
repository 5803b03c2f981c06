"""Stage keys: what an offline stage's output depends on, hashed into its folder name.

A stage's output lives at a path derived from the content key of its inputs
(docs/architecture.md, "The flow"): the same inputs always map to the same folder, a
finished folder (its ``manifest.json`` written last) is reused instead of recomputed,
and an unfinished one is resumed. A sweep over a loss weight therefore shares one
region store among all its trials, while changing the teacher weights, the crop
recipe, the proposal settings or the annotations gives a new store.

The extraction key hashes: the annotation file's bytes, the images' fingerprint
(:func:`images_fingerprint`: their folder and each file's name, size and modification
time, so repaired or replaced images give a new store), the split, the proposal settings
that matter for the configured source plus the source's own fingerprint (an imported
file's or a checkpoint's digest, the CLIP vocabulary), the teacher's id and weights
digest, the crop recipe, the store schema version and :data:`EXTRACT_VERSION`. A
finished store whose manifest records other inputs than the request's is refused
(:func:`check_store_inputs`), never reused.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ovdlab.platform.config import ExperimentConfig, ProposalsConfig, content_key, file_digest
from ovdlab.platform.store.schema import SCHEMA_VERSION

EXTRACT_VERSION = 3
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


class StoreMismatchError(ValueError):
    """A finished store at a request's path records other inputs than the request."""


def images_fingerprint(image_dir: Path, file_names: Iterable[str]) -> dict[str, Any]:
    """Folder, count and a digest of (name, size, mtime) of every image: cheap, one ``stat`` each.

    A missing file enters as size -1, so restoring it changes the fingerprint too.
    """
    h = hashlib.sha256()
    count = 0
    for name in file_names:
        try:
            st = os.stat(Path(image_dir) / name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\0-1\n".encode())
        count += 1
    return {"image_dir": str(image_dir), "count": count, "digest": h.hexdigest()[:16]}


def check_store_inputs(path: Path, recorded: dict[str, Any] | None, requested: dict[str, Any]) -> None:
    """Refuse a finished store whose recorded stage inputs differ from ``requested``.

    The folder name is the key of the inputs, so a difference means the folder was
    written by other code (an older version) or edited by hand: reusing it would hand
    the trainer regions of other images or another teacher.
    """
    if recorded == requested:
        return
    recorded = recorded or {}
    diff = sorted(k for k in set(recorded) | set(requested) if recorded.get(k) != requested.get(k))
    details = "; ".join(f"{k}: store has {recorded.get(k)!r}, request has {requested.get(k)!r}" for k in diff)
    raise StoreMismatchError(
        f"region store {path} was made from other inputs than this request ({details}); "
        f"it is not reused. Move or delete the folder to extract it again."
    )


def extraction_stage(
    cfg: ExperimentConfig,
    split: str,
    annotation_file: Path,
    images: dict[str, Any],
    teacher_id: str,
    teacher_digest: str,
    source_fingerprint: dict[str, Any],
) -> StageSpec:
    """The region-extraction stage of ``split``: key and ``work_dir/stores/<split>-<key>``.

    ``images`` is the split's :func:`images_fingerprint`.
    """
    inputs = {
        "stage": "extract",
        "version": EXTRACT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "annotation_digest": file_digest(Path(annotation_file)),
        "images": images,
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
