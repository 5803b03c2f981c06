"""Which benchmark protocol a ground-truth file calls for: COCO or LVIS.

The two protocols score the same results very differently (LVIS is federated: a
detection of a class neither annotated nor listed as negative in its image is not
scored; COCO scores every detection), so evaluating an LVIS file the COCO way gives
plausible but wrong numbers without any error. The file itself says which it is: LVIS
categories carry a ``frequency`` (r/c/f) and LVIS images the ``neg_category_ids`` /
``not_exhaustive_category_ids`` lists (``ovdlab data lvis-ovd`` keeps both), COCO
files have neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ovdlab.platform.evaluation.common import load_json_input

BenchmarkProtocol = Literal["coco", "lvis"]

KIND_PROTOCOL: dict[str, BenchmarkProtocol] = {"coco": "coco", "shapes": "coco", "lvis": "lvis"}
"""The protocol each dataset kind is scored with (shapes is a COCO-format world)."""

AUTO = "auto"
"""The kind that means "whatever the ground truth is"."""

LVIS_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


def _lvis_markers(dataset: dict[str, Any]) -> list[str]:
    """The LVIS-only fields found in ``dataset``, as phrases for error messages."""
    markers = []
    if any(isinstance(c, dict) and "frequency" in c for c in dataset.get("categories") or []):
        markers.append("categories with 'frequency'")
    for key in LVIS_IMAGE_FIELDS:
        if any(isinstance(img, dict) and key in img for img in dataset.get("images") or []):
            markers.append(f"images with {key!r}")
    return markers


def detect_protocol(gt: Path | str | dict) -> BenchmarkProtocol:
    """``"lvis"`` when the ground truth has any LVIS-only field, else ``"coco"``.

    Any one marker is enough: a file with some but not all of them is a broken LVIS
    file, which the LVIS evaluator then refuses naming what is missing, rather than a
    COCO file to be scored without its federated lists.
    """
    dataset = load_json_input(gt, "ground truth")
    if not isinstance(dataset, dict):
        raise TypeError(f"ground truth must be a COCO/LVIS-format dict or a path to one, got {type(dataset).__name__}")
    return "lvis" if _lvis_markers(dataset) else "coco"


def resolve_kind(kind: str, dataset: dict[str, Any], where: str = "the ground truth") -> str:
    """The dataset kind to score ``dataset`` as: the detected protocol for ``"auto"``, else ``kind``.

    An explicit kind whose protocol contradicts the file is refused rather than obeyed,
    since its scores would look valid. ``where`` names the ground truth in the error.
    """
    if kind != AUTO and kind not in KIND_PROTOCOL:
        raise ValueError(f"unknown dataset kind {kind!r}; expected {AUTO!r} or one of {sorted(KIND_PROTOCOL)}")
    detected = detect_protocol(dataset)
    if kind == AUTO:
        return detected
    if KIND_PROTOCOL[kind] != detected:
        found = ", ".join(_lvis_markers(dataset)) if detected == "lvis" else "no LVIS fields (frequency, neg_category_ids)"
        raise ValueError(
            f"dataset kind {kind!r} asks for the {KIND_PROTOCOL[kind].upper()} protocol but {where} is "
            f"{detected.upper()}-format ({found}); use kind {detected!r}, or {AUTO!r} to follow the file"
        )
    return kind
