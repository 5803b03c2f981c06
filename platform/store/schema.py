"""Region store data format: rows, failures, manifest, and their Arrow/Parquet schemas.

One Parquet row per image (see ``docs/architecture.md`` "Data formats")::

    image_id    int64
    boxes       list<fixed_size_list<float32, 4>>   xyxy, original image pixels
    scores      list<float32>                       proposal objectness / score
    embeddings  list<fixed_size_list<float16, D>>   teacher region embeddings
    <extra>     list<float32>                       optional, e.g. EZSD ``confidence``

The nested fixed-size lists keep the store self-describing (pandas, DuckDB and Ray
Data read the embeddings as float arrays), unlike an opaque byte blob. Embeddings are
kept in float16 as LP-OVOD stores them, and read back as float16 (its reference reads
the fp16 file as fp32, a known defect, see ``docs/methods.md``).

Store folder layout::

    <root>/parts/part-<hash>.parquet      region rows, written atomically
    <root>/failures/part-<hash>.parquet   failure rows (image_id, path, stage, error)
    <root>/index.parquet                  image_id -> (part, row, num_regions)
    <root>/manifest.json                  written last by ``finalize``: store complete
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.parquet"
PARTS_DIR = "parts"
FAILURES_DIR = "failures"
TMP_SUFFIX = ".tmp"
BASE_COLUMNS = ("image_id", "boxes", "scores", "embeddings")
CONTENT_KEY_META = b"ovdlab.content_key"
REQUIRED_FIELDS = ("dataset", "split", "proposal_source", "teacher_id", "teacher_digest", "crop", "content_key")
RESERVED_FIELDS = ("schema_version", "embed_dim", "extras", "counts", "parts", "duplicates", "parquet")


class StoreError(RuntimeError):
    """A region store that cannot be written or read as asked; the message names the file."""


@dataclass
class ImageRegions:
    """The regions of one image: N boxes with their scores, embeddings and extra columns.

    Arrays are converted to the storage dtypes on construction (float32 boxes, scores
    and extras; float16 embeddings), so a float32 teacher output can be passed as is.
    ``validate`` checks shapes and values; the writer calls it before anything is
    written, so a bad row is reported with its image id instead of deep in Arrow.
    """

    image_id: int
    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.image_id, (bool, np.bool_)) or not isinstance(self.image_id, (int, np.integer)):
            raise ValueError(f"image_id must be an integer, got {self.image_id!r}")
        self.image_id = int(self.image_id)
        self.boxes = np.asarray(self.boxes, dtype=np.float32)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.embeddings = np.asarray(self.embeddings, dtype=np.float16)
        self.extras = {str(k): np.asarray(v, dtype=np.float32) for k, v in self.extras.items()}

    @property
    def num_regions(self) -> int:
        return int(self.scores.shape[0]) if self.scores.ndim == 1 else -1

    def validate(self, embed_dim: int, extra_names: Sequence[str] = ()) -> None:
        """Raise ``ValueError`` naming the image if shapes or values are unusable.

        N may be 0: an image without regions is still a row, so resume and the index
        know it was processed.
        """
        where = f"image {self.image_id}"
        if self.scores.ndim != 1:
            raise ValueError(f"{where}: scores must have shape [N], got {self.scores.shape}")
        n = self.scores.shape[0]
        if self.boxes.shape != (n, 4):
            raise ValueError(f"{where}: boxes must have shape [{n}, 4] (N from scores), got {self.boxes.shape}")
        if self.embeddings.shape != (n, embed_dim):
            raise ValueError(
                f"{where}: embeddings must have shape [{n}, {embed_dim}], got {self.embeddings.shape}"
            )
        if set(self.extras) != set(extra_names):
            raise ValueError(f"{where}: extras {sorted(self.extras)} differ from the store's {sorted(extra_names)}")
        for name, values in [("boxes", self.boxes), ("scores", self.scores), ("embeddings", self.embeddings)]:
            if not np.isfinite(values).all():
                raise ValueError(f"{where}: {name} has non-finite values (float16 overflow or NaN)")
        if n and ((self.boxes[:, 2] < self.boxes[:, 0]) | (self.boxes[:, 3] < self.boxes[:, 1])).any():
            bad = int(np.flatnonzero((self.boxes[:, 2] < self.boxes[:, 0]) | (self.boxes[:, 3] < self.boxes[:, 1]))[0])
            raise ValueError(f"{where}: box {bad} is not xyxy (x2 < x1 or y2 < y1): {self.boxes[bad].tolist()}")
        for name, values in self.extras.items():
            if values.shape != (n,):
                raise ValueError(f"{where}: extra column {name!r} must have shape [{n}], got {values.shape}")
            if not np.isfinite(values).all():
                raise ValueError(f"{where}: extra column {name!r} has non-finite values")


@dataclass(frozen=True)
class Failure:
    """An image the pipeline could not process; recorded so resume does not retry it forever."""

    image_id: int
    path: str
    stage: str
    error: str


@dataclass
class Manifest:
    """What ``manifest.json`` holds; its presence marks a finalized, complete store.

    ``fields`` are the caller's provenance fields (dataset, split, proposal source,
    teacher id and weights digest, crop recipe, content key, ...); they sit at the top
    level of the JSON next to the store's own keys.
    """

    embed_dim: int
    extras: list[str]
    fields: dict[str, Any]
    counts: dict[str, int]
    parts: list[str]
    duplicates: list[dict[str, Any]]
    parquet: dict[str, Any]
    schema_version: int = SCHEMA_VERSION

    @property
    def content_key(self) -> str:
        return str(self.fields["content_key"])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": self.schema_version}
        out.update(self.fields)
        out.update(
            embed_dim=self.embed_dim,
            extras=list(self.extras),
            counts=dict(self.counts),
            parts=list(self.parts),
            duplicates=list(self.duplicates),
            parquet=dict(self.parquet),
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        fields = {k: v for k, v in data.items() if k not in RESERVED_FIELDS}
        return cls(
            embed_dim=int(data["embed_dim"]),
            extras=list(data["extras"]),
            fields=fields,
            counts={k: int(v) for k, v in data["counts"].items()},
            parts=list(data["parts"]),
            duplicates=list(data["duplicates"]),
            parquet=dict(data["parquet"]),
            schema_version=int(data["schema_version"]),
        )

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise StoreError(f"{path} not found: the region store at {root} was not finalized")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{path}: not valid JSON: {err}") from err
        if data.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema_version {data.get('schema_version')!r}, this reader understands {SCHEMA_VERSION}"
            )
        return cls.from_dict(data)


def check_manifest_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The caller's provenance fields, checked: required keys present, none reserved, JSON-able."""
    missing = [k for k in REQUIRED_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"manifest fields missing {missing} (required: {list(REQUIRED_FIELDS)})")
    reserved = [k for k in fields if k in RESERVED_FIELDS]
    if reserved:
        raise ValueError(f"manifest fields {reserved} are reserved for the store itself")
    try:
        return json.loads(json.dumps(fields))
    except TypeError as err:
        raise ValueError(f"manifest fields must be JSON-serialisable: {err}") from err


def check_extra_names(names: Iterable[str]) -> tuple[str, ...]:
    """Extra column names: identifiers, unique, not one of the base columns."""
    out = tuple(names)
    for name in out:
        if not name.isidentifier() or name in BASE_COLUMNS:
            raise ValueError(f"extra column name {name!r} must be an identifier other than {BASE_COLUMNS}")
    if len(set(out)) != len(out):
        raise ValueError(f"extra column names repeat: {out}")
    return tuple(sorted(out))


def region_schema(embed_dim: int, extras: Sequence[str] = (), content_key: str | None = None) -> pa.Schema:
    """Arrow schema of a region part for embedding dim ``embed_dim``; one row per image."""
    if embed_dim < 1:
        raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
    fields = [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4)), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("embeddings", pa.list_(pa.list_(pa.float16(), embed_dim)), nullable=False),
    ]
    fields += [pa.field(name, pa.list_(pa.float32()), nullable=False) for name in extras]
    metadata = {CONTENT_KEY_META: content_key.encode()} if content_key is not None else None
    return pa.schema(fields, metadata=metadata)


def float_leaf_paths(extras: Sequence[str] = ()) -> list[str]:
    """Parquet leaf column paths of the float columns (for BYTE_STREAM_SPLIT encoding)."""
    return [
        "boxes.list.element.list.element",
        "scores.list.element",
        "embeddings.list.element.list.element",
        *[f"{name}.list.element" for name in extras],
    ]


FAILURE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)

INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("part", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("num_regions", pa.int32(), nullable=False),
    ]
)


def part_file_name(image_ids: Sequence[int], salt: str = "") -> str:
    """``part-<hash>.parquet`` from the sorted ids: the same batch always gets the same name."""
    blob = json.dumps([salt, sorted(int(i) for i in image_ids)], separators=(",", ":"))
    return f"part-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.parquet"


def _list_column(offsets: np.ndarray, values: np.ndarray, width: int | None) -> pa.Array:
    flat = pa.array(values.reshape(-1))
    inner = pa.FixedSizeListArray.from_arrays(flat, width) if width is not None else flat
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner)


def rows_to_table(rows: Sequence[ImageRegions], schema: pa.Schema, extras: Sequence[str]) -> pa.Table:
    """Columnar Arrow table of already validated rows (one concatenation per column)."""
    embed_dim = schema.field("embeddings").type.value_type.list_size
    counts = np.array([r.num_regions for r in rows], dtype=np.int64)
    if counts.sum() > np.iinfo(np.int32).max // max(embed_dim, 4):
        raise ValueError(f"{int(counts.sum())} regions are too many for one part; write smaller batches")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    columns: dict[str, pa.Array] = {
        "image_id": pa.array([r.image_id for r in rows], pa.int64()),
        "boxes": _list_column(offsets, _concat([r.boxes for r in rows], (0, 4), np.float32), 4),
        "scores": _list_column(offsets, _concat([r.scores for r in rows], (0,), np.float32), None),
        "embeddings": _list_column(
            offsets, _concat([r.embeddings for r in rows], (0, embed_dim), np.float16), embed_dim
        ),
    }
    for name in extras:
        columns[name] = _list_column(offsets, _concat([r.extras[name] for r in rows], (0,), np.float32), None)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _concat(arrays: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(empty_shape, dtype)


@dataclass
class DecodedRows:
    """A block of image rows as flat numpy arrays: row ``i`` owns regions ``offsets[i]:offsets[i+1]``."""

    image_ids: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray
    extras: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        arrays = [self.image_ids, self.offsets, self.boxes, self.scores, self.embeddings, *self.extras.values()]
        return sum(a.nbytes for a in arrays)

    def row(self, i: int) -> ImageRegions:
        """Row ``i`` as an :class:`ImageRegions` with its own (writable) copies of the arrays."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return ImageRegions(
            image_id=int(self.image_ids[i]),
            boxes=self.boxes[lo:hi].copy(),
            scores=self.scores[lo:hi].copy(),
            embeddings=self.embeddings[lo:hi].copy(),
            extras={k: v[lo:hi].copy() for k, v in self.extras.items()},
        )


def _flat_values(column: pa.ChunkedArray | pa.Array, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets relative to the first row, flat leaf values) of a list column ``depth`` levels deep."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    offsets = offsets - offsets[0]
    values = arr.flatten()
    for _ in range(depth - 1):
        values = values.flatten()
    return offsets, values.to_numpy(zero_copy_only=False)


def decode_table(table: pa.Table, embed_dim: int, extras: Sequence[str]) -> DecodedRows:
    """Arrow rows -> :class:`DecodedRows` without a Python object per region."""
    offsets, boxes = _flat_values(table.column("boxes"), 2)
    _, scores = _flat_values(table.column("scores"), 1)
    _, embeddings = _flat_values(table.column("embeddings"), 2)
    return DecodedRows(
        image_ids=table.column("image_id").to_numpy(),
        offsets=offsets.astype(np.int64),
        boxes=boxes.reshape(-1, 4),
        scores=scores,
        embeddings=embeddings.reshape(-1, embed_dim),
        extras={name: _flat_values(table.column(name), 1)[1] for name in extras},
    )


def failures_to_table(failures: Sequence[Failure]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"image_id": int(f.image_id), "path": str(f.path), "stage": str(f.stage), "error": str(f.error)} for f in failures],
        schema=FAILURE_SCHEMA,
    )
