"""Proposals imported from a file, as OLN (Kim et al. 2021) and LP-OVOD distribute them.

OLN is an mmdetection project; ``tools/test.py --out proposals.pkl`` writes a pickle
holding a list with one ``[N, 5]`` array (x1, y1, x2, y2, objectness) per image, in the
order of the annotation file's ``images`` list (mmdetection's ``CustomDataset``
``load_proposals`` reads it back the same way; LP-OVOD loads its OLN proposals so).
Accepted layouts, in a pickle (``.pkl``/``.pickle``) or JSON (``.json``) file:

- a list of per-image entries in annotation-file image order (OLN/mmdetection);
- a list of records ``{"image_id": id, "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}``;
- a mapping from image id (int, or its decimal string) or image file name to an entry.

An entry is an ``[N, 5]`` array (or nested list), a ``{"boxes", "scores"}`` mapping, or
a one-element list of ``[N, 5]`` (mmdetection's per-class result with a single class).
Every entry is validated on load: real numbers (integer or float dtype), finite values,
``x2 > x1``, ``y2 > y1``, five columns;
the first violation raises :class:`ProposalFileError` naming the file, image and row.

Pickles are read with an unpickler that admits only numpy arrays, dtypes, scalars and
plain containers, so a proposal file cannot run code when it is loaded.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ovdlab.platform.config import file_digest
from ovdlab.platform.proposals.base import Proposals

if TYPE_CHECKING:
    from ovdlab.platform.data.catalog import OVDDataset

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pkl", ".pickle")
JSON_SUFFIXES = (".json",)
REAL_DTYPE_KINDS = "iuf"
"""numpy dtype kinds of proposal values: signed and unsigned integers, floats."""

_PICKLE_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }
)


class ProposalFileError(ValueError):
    """A proposal file that cannot be used; the message names the file, image and row."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers only (no arbitrary callables)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a proposal file holds arrays only")


def read_proposal_file(path: Path) -> Any:
    """The raw object stored in a pickle or JSON proposal file."""
    if not path.is_file():
        raise ProposalFileError(f"proposal file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in PICKLE_SUFFIXES:
            return _ArrayUnpickler(io.BytesIO(path.read_bytes())).load()
        if suffix in JSON_SUFFIXES:
            return json.loads(path.read_text())
    except (pickle.UnpicklingError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProposalFileError(f"{path}: cannot read proposals: {type(err).__name__}: {err}") from err
    raise ProposalFileError(f"{path}: unknown proposal file type {suffix!r}; use .pkl/.pickle or .json")


def _real_array(value: Any, where: str) -> np.ndarray:
    """``value`` as float64, refusing any dtype but real integers and floats.

    ``np.asarray(value, dtype=float)`` would turn booleans, numeric strings, datetimes
    (as epoch counts) and object arrays into numbers, and drop the imaginary part of
    complex ones, so a file of the wrong kind would load as plausible boxes.
    """
    try:
        array = np.asarray(value)
    except ValueError as err:  # ragged nesting
        raise ProposalFileError(f"{where}: not a numeric array ({err})") from err
    if array.dtype.kind not in REAL_DTYPE_KINDS:
        raise ProposalFileError(f"{where}: values must be real integers or floats, got dtype {array.dtype}")
    return array.astype(np.float64)


def _entry_array(entry: Any, where: str) -> np.ndarray:
    """One image's entry -> float32 [N, 5] (not yet value-checked)."""
    if isinstance(entry, dict):
        if "boxes" not in entry or "scores" not in entry:
            raise ProposalFileError(f"{where}: a mapping entry needs 'boxes' and 'scores', got keys {sorted(entry)}")
        boxes = _real_array(entry["boxes"], f"{where} 'boxes'")
        scores = _real_array(entry["scores"], f"{where} 'scores'")
        if boxes.size == 0 and scores.size == 0:
            return np.zeros((0, 5), np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ProposalFileError(f"{where}: 'boxes' must be [N, 4], got shape {boxes.shape}")
        if scores.shape != (boxes.shape[0],):
            raise ProposalFileError(f"{where}: 'scores' must be [{boxes.shape[0]}], got shape {scores.shape}")
        return np.concatenate([boxes, scores[:, None]], axis=1).astype(np.float32)
    if isinstance(entry, (list, tuple)) and len(entry) == 1 and np.ndim(entry[0]) == 2:
        entry = entry[0]
    array = _real_array(entry, where)
    if array.size == 0:
        return np.zeros((0, 5), np.float32)
    if array.ndim != 2 or array.shape[1] != 5:
        raise ProposalFileError(f"{where}: expected an [N, 5] array (x1, y1, x2, y2, score), got shape {array.shape}")
    return array.astype(np.float32)


def validate_entry(array: np.ndarray, where: str) -> np.ndarray:
    """Raise naming the first bad row: non-finite values, ``x2 <= x1`` or ``y2 <= y1``."""
    if not len(array):
        return array
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ProposalFileError(f"{where} row {row}: non-finite value {array[row].tolist()}")
    bad = (array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ProposalFileError(f"{where} row {row}: box {array[row, :4].tolist()} needs x2 > x1 and y2 > y1")
    return array


def annotation_file_order(ann_json: Path) -> list[int]:
    """Image ids in the order of the annotation file's ``images`` list (mmdetection's order)."""
    data = json.loads(Path(ann_json).read_text())
    return [int(img["id"]) for img in data["images"]]


def parse_proposals(
    raw: Any, path: Path, image_ids: Iterable[int], file_names: dict[str, int], file_order: list[int] | None
) -> dict[int, np.ndarray]:
    """Normalise any accepted layout to ``{image_id: float32 [N, 5]}``, validated.

    ``file_names`` maps image file names to ids; ``file_order`` is the annotation
    file's image order, needed only by the plain-list (mmdetection) layout.
    """
    known = set(int(i) for i in image_ids)
    out: dict[int, np.ndarray] = {}
    unknown: list[Any] = []

    def add(image_id: int, entry: Any, where: str) -> None:
        if image_id not in known:
            unknown.append(image_id)
            return
        if image_id in out:
            raise ProposalFileError(f"{path}: image {image_id} appears twice")
        out[image_id] = validate_entry(_entry_array(entry, where), where)

    if isinstance(raw, dict):
        for key, entry in raw.items():
            if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.strip().isdigit()):
                image_id = int(key)
            elif isinstance(key, str) and Path(key).name in file_names:
                image_id = file_names[Path(key).name]
            else:
                unknown.append(key)
                continue
            add(image_id, entry, f"{path}: image {image_id} (key {key!r})")
    elif isinstance(raw, (list, tuple)):
        if raw and all(isinstance(e, dict) and "image_id" in e for e in raw):
            for i, entry in enumerate(raw):
                add(int(entry["image_id"]), entry, f"{path}: image {entry['image_id']} (record {i})")
        else:
            if file_order is None:
                raise ProposalFileError(f"{path}: a plain list needs the annotation file's image order")
            if len(raw) != len(file_order):
                raise ProposalFileError(
                    f"{path}: {len(raw)} entries but the annotation file lists {len(file_order)} images; "
                    "an OLN/mmdetection list must have one entry per image in that order"
                )
            for i, (image_id, entry) in enumerate(zip(file_order, raw)):
                add(image_id, entry, f"{path}: image {image_id} (entry {i})")
    else:
        raise ProposalFileError(f"{path}: expected a list or a mapping of per-image proposals, got {type(raw).__name__}")
    if unknown:
        log.warning("%s: %d entries name images not in the dataset (ignored), e.g. %s", path, len(unknown), unknown[:5])
    return out


class ImportedProposalSource:
    """Proposals read from a file; the ``per_image`` highest-scoring boxes of each image.

    An image without an entry in the file raises ``KeyError`` naming it when proposed
    (the pipeline records that as the image's failure); an entry with no boxes is an
    image with no proposals.
    """

    name = "file"
    extra_names: tuple[str, ...] = ()
    needs_accelerator = False

    def __init__(self, path: str | Path, proposals: dict[int, np.ndarray], per_image: int, digest: str) -> None:
        self.path = Path(path)
        self.proposals = proposals
        self.per_image = int(per_image)
        self.digest = digest

    @classmethod
    def from_dataset(cls, path: str | Path, dataset: "OVDDataset", per_image: int) -> "ImportedProposalSource":
        """Read and validate ``path`` against ``dataset``'s images."""
        path = Path(path).expanduser().resolve()
        raw = read_proposal_file(path)
        plain_list = isinstance(raw, (list, tuple)) and not (raw and all(isinstance(e, dict) for e in raw))
        order = annotation_file_order(dataset.ann_json) if plain_list else None
        file_names = {Path(dataset.image_info(i)["file_name"]).name: i for i in dataset.image_ids}
        proposals = parse_proposals(raw, path, dataset.image_ids, file_names, order)
        missing = len(dataset.image_ids) - len(proposals)
        if missing:
            log.warning("%s: no proposals for %d of %d images (they will be recorded as failures)", path, missing, len(dataset.image_ids))
        return cls(path, proposals, per_image, file_digest(path))

    def fingerprint(self) -> dict[str, Any]:
        return {"file_digest": self.digest}

    def propose(self, image: np.ndarray, image_id: int, annotations: list[dict[str, Any]]) -> Proposals:
        try:
            array = self.proposals[int(image_id)]
        except KeyError:
            raise KeyError(f"proposal file {self.path} has no entry for image {image_id}") from None
        return Proposals(array[:, :4], array[:, 4]).top_k(self.per_image)
