"""Pseudo-labelled boxes: the file a retrieval stage writes and a training phase reads.

LP-OVOD (Pham et al. WACV 2024, Sec. 3.2) labels the training proposals nearest to each
novel class's text embedding with that class and trains its probe on them. The file is
a small JSON in COCO's vocabulary, so it can be opened next to the annotations::

    {"categories": [{"id": 7, "name": "red star"}, ...],
     "annotations": [{"image_id": 12, "category_id": 7, "bbox": [x, y, w, h],
                      "score": 0.93, "similarity": 0.81}, ...],
     "source": {...}}

``bbox`` is in the original image's pixels (the training data path resizes and flips
it with the image); ``score`` is the proposal's objectness, ``similarity`` the cosine to
the class's text embedding; ``source`` records how the labels were made.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovdlab.platform.data._jsonio import read_json, write_json_atomic


@dataclass(frozen=True)
class PseudoLabels:
    """Pseudo-labelled boxes by image, and the classes they name (``{id: name}``)."""

    categories: dict[int, str]
    by_image: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_boxes(self) -> int:
        return sum(len(anns) for anns in self.by_image.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "categories": [{"id": cid, "name": name} for cid, name in self.categories.items()],
            "annotations": [ann for image_id in sorted(self.by_image) for ann in self.by_image[image_id]],
            "source": self.source,
        }


def write_pseudo_labels(labels: PseudoLabels, path: str | Path) -> Path:
    """Write ``labels`` as JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    write_json_atomic(path, labels.to_json())
    return path


def load_pseudo_labels(path: str | Path) -> PseudoLabels:
    """Read and check a pseudo-label file; a malformed one is one error naming the entry."""
    path = Path(path)
    data = read_json(path, "pseudo-label file (train.pseudo_labels, written by a retrieval stage)")
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for i, ann in enumerate(data["annotations"]):
            if int(ann["category_id"]) not in categories:
                raise ValueError(f"annotation {i} names category {ann['category_id']}, not among the file's categories")
            x, y, w, h = (float(v) for v in ann["bbox"])
            if not (w > 0 and h > 0):
                raise ValueError(f"annotation {i} has an empty bbox {ann['bbox']}")
            by_image[int(ann["image_id"])].append({**ann, "bbox": [x, y, w, h]})
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a pseudo-label file: {err}") from None
    return PseudoLabels(categories, dict(by_image), dict(data.get("source", {})))
