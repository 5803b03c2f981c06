"""Region store reader: one image's regions on demand, streaming batches, failures.

Only the index (image id -> part, row; a few bytes per image) is held in memory. A
lookup goes index -> part file -> row group -> row: the part's ``ParquetFile`` handle is
opened once (memory-mapped) and kept, the one row group holding the row is decoded
(row groups are cut at ~256 KiB for this, see ``writer.ROW_GROUP_BYTES``),
and a small LRU keeps recently decoded row groups for neighbouring lookups.

The reader pickles as its root and settings only; handles reopen lazily in the
receiving process (Ray workers, forked DataLoader workers).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from ovdlab.platform.store.schema import (
    FAILURES_DIR,
    INDEX_NAME,
    MANIFEST_NAME,
    DecodedRows,
    Failure,
    ImageRegions,
    Manifest,
    StoreError,
    decode_table,
)

# Row groups decoded together while streaming (~16 MB at the writer's 256 KiB groups):
# one call per group would pay the per-call overhead on tiny groups.
_STREAM_ROW_GROUPS = 64


@dataclass
class RegionBatch:
    """A block of regions from many images, flat: region ``j`` belongs to ``image_ids[j]``."""

    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray
    extras: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


class RegionStore:
    """Read access to a finalized region store.

    Args:
        root: the store folder (must hold ``manifest.json``).
        cache_row_groups: decoded row groups kept in an LRU (0 disables it).
    """

    def __init__(self, root: str | Path, cache_row_groups: int = 8) -> None:
        self.root = Path(root)
        self.cache_row_groups = int(cache_row_groups)
        self.manifest = Manifest.load(self.root)
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise StoreError(f"{index_path} not found although {MANIFEST_NAME} exists; finalize the store again")
        index = pq.read_table(index_path)
        self._ids = index.column("image_id").to_numpy()
        part_names = index.column("part").to_pylist()
        part_pos = {name: i for i, name in enumerate(self.manifest.parts)}
        unknown = sorted(set(part_names) - part_pos.keys())
        if unknown:
            raise StoreError(f"{index_path} names parts {unknown[:5]} missing from {MANIFEST_NAME}")
        self._part = np.array([part_pos[n] for n in part_names], dtype=np.int32)
        self._row = index.column("row").to_numpy().astype(np.int64)
        self._num_regions = index.column("num_regions").to_numpy().astype(np.int64)
        if self._ids.size and not (np.diff(self._ids) > 0).all():
            raise StoreError(f"{index_path}: image ids are not unique and sorted")
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._files: dict[int, pq.ParquetFile] = {}
        self._group_starts: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[tuple[int, int], DecodedRows] = OrderedDict()

    # -- pickling: only the root travels ---------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root), "cache_row_groups": self.cache_row_groups}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], cache_row_groups=state["cache_row_groups"])

    # -- mapping-like access ---------------------------------------------------------

    @staticmethod
    def is_complete(root: str | Path) -> bool:
        """True when ``finalize`` wrote the manifest (the last step of writing a store)."""
        return (Path(root) / MANIFEST_NAME).is_file()

    @property
    def image_ids(self) -> np.ndarray:
        """Sorted ids of the stored images (a read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def embed_dim(self) -> int:
        return self.manifest.embed_dim

    def __len__(self) -> int:
        return int(self._ids.size)

    def __contains__(self, image_id: object) -> bool:
        return self._position(image_id) is not None

    def num_regions(self, image_id: int) -> int:
        """Region count of one image, from the index (no part is read)."""
        return int(self._num_regions[self._require(image_id)])

    def _position(self, image_id: object) -> int | None:
        if isinstance(image_id, (bool, np.bool_)) or not isinstance(image_id, (int, np.integer)):
            return None
        pos = int(np.searchsorted(self._ids, image_id))
        return pos if pos < self._ids.size and self._ids[pos] == image_id else None

    def _require(self, image_id: int) -> int:
        pos = self._position(image_id)
        if pos is None:
            raise KeyError(f"image_id {image_id!r} is not in the region store at {self.root}")
        return pos

    def get(self, image_id: int) -> ImageRegions:
        """The regions of one image; raises ``KeyError`` naming the id if it is not stored."""
        pos = self._require(image_id)
        self._ensure_process()
        part, row = int(self._part[pos]), int(self._row[pos])
        starts = self._starts(part)
        group = int(np.searchsorted(starts, row, side="right")) - 1
        decoded = self._row_group(part, group)
        return decoded.row(row - int(starts[group]))

    def open_parts(self) -> "RegionStore":
        """Open every part and read its row-group layout now (a worker's warm-up); returns self."""
        self._ensure_process()
        for part in range(len(self.manifest.parts)):
            self._starts(part)
        return self

    def _ensure_process(self) -> None:
        """Drop handles inherited through ``fork``: each process maps the files itself."""
        if self._pid != os.getpid():
            self._reset_handles()

    def _file(self, part: int) -> pq.ParquetFile:
        handle = self._files.get(part)
        if handle is None:
            path = self.root / self.manifest.parts[part]
            try:
                handle = pq.ParquetFile(path, memory_map=True)
            except (OSError, ValueError) as err:
                raise StoreError(f"{path}: cannot open region part ({err})") from err
            self._files[part] = handle
        return handle

    def _starts(self, part: int) -> np.ndarray:
        starts = self._group_starts.get(part)
        if starts is None:
            meta = self._file(part).metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            self._group_starts[part] = starts
        return starts

    def _row_group(self, part: int, group: int) -> DecodedRows:
        key = (part, group)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        table = self._file(part).read_row_group(group, use_threads=False)
        decoded = decode_table(table, self.manifest.embed_dim, self.manifest.extras)
        if self.cache_row_groups > 0:
            self._cache[key] = decoded
            while len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        return decoded

    # -- streaming -------------------------------------------------------------------

    def iter_batches(
        self, batch_size_regions: int = 65536, dtype: type = np.float32
    ) -> Iterator[RegionBatch]:
        """All indexed regions in batches of exactly ``batch_size_regions`` (the last smaller).

        Streams part by part, a run of row groups at a time; memory stays near one batch
        plus one run (~16 MB). Rows a crash left duplicated (not in the index) are skipped, so
        every region is yielded once. ``dtype`` is float32 or float16 for embeddings.
        """
        if batch_size_regions < 1:
            raise ValueError(f"batch_size_regions must be >= 1, got {batch_size_regions}")
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"dtype must be float32 or float16, got {np.dtype(dtype)}")
        self._ensure_process()
        pending: list[RegionBatch] = []
        pending_n = 0
        for chunk in self._iter_region_chunks():
            pending.append(chunk)
            pending_n += len(chunk)
            if pending_n < batch_size_regions:
                continue
            merged = _concat_batches(pending, dtype)
            start = 0
            while pending_n - start >= batch_size_regions:
                yield _slice_batch(merged, start, start + batch_size_regions)
                start += batch_size_regions
            pending = [_slice_batch(merged, start, pending_n)] if start < pending_n else []
            pending_n -= start
        if pending_n:
            yield _concat_batches(pending, dtype)

    def _iter_region_chunks(self) -> Iterator[RegionBatch]:
        """Regions of the indexed rows, as views into decoded row groups (float16)."""
        for part in range(len(self.manifest.parts)):
            kept_rows = np.sort(self._row[self._part == part])
            if kept_rows.size == 0:
                continue
            handle = self._file(part)
            starts = np.append(self._starts(part), handle.metadata.num_rows)
            num_groups = handle.metadata.num_row_groups
            for g0 in range(0, num_groups, _STREAM_ROW_GROUPS):
                g1 = min(g0 + _STREAM_ROW_GROUPS, num_groups)
                lo, hi = int(starts[g0]), int(starts[g1])
                rows = kept_rows[(kept_rows >= lo) & (kept_rows < hi)] - lo
                if rows.size == 0:
                    continue
                table = handle.read_row_groups(list(range(g0, g1)))
                yield _regions_of_rows(decode_table(table, self.embed_dim, self.manifest.extras), rows)

    # -- failures --------------------------------------------------------------------

    def failures(self) -> list[Failure]:
        """Recorded failures of images that are not in the store, sorted by image id.

        Failures of images that a later attempt stored are left out, matching the
        manifest's ``counts["failures"]``.
        """
        out: set[Failure] = set()
        for path in sorted((self.root / FAILURES_DIR).glob("part-*.parquet")):
            for rec in pq.read_table(path).to_pylist():
                if rec["image_id"] not in self:
                    out.add(Failure(int(rec["image_id"]), rec["path"], rec["stage"], rec["error"]))
        return sorted(out, key=lambda f: (f.image_id, f.stage, f.path, f.error))

    def __repr__(self) -> str:
        c = self.manifest.counts
        return f"RegionStore({str(self.root)!r}, images={c['images']}, regions={c['regions']}, D={self.embed_dim})"


def _regions_of_rows(decoded: DecodedRows, rows: np.ndarray) -> RegionBatch:
    """The regions of the selected rows of a decoded row group, flattened (views when all rows)."""
    counts = decoded.offsets[rows + 1] - decoded.offsets[rows]
    take: slice | np.ndarray = slice(None)
    if rows.size != decoded.image_ids.size:
        spans = [np.arange(decoded.offsets[r], decoded.offsets[r + 1]) for r in rows.tolist()]
        take = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
    return RegionBatch(
        image_ids=np.repeat(decoded.image_ids[rows], counts),
        boxes=decoded.boxes[take],
        scores=decoded.scores[take],
        embeddings=decoded.embeddings[take],
        extras={k: v[take] for k, v in decoded.extras.items()},
    )


def _concat_batches(batches: list[RegionBatch], dtype: type) -> RegionBatch:
    """One new (writable) batch: the only copy a region makes, with the dtype conversion."""
    return RegionBatch(
        image_ids=np.concatenate([b.image_ids for b in batches]),
        boxes=np.concatenate([b.boxes for b in batches]),
        scores=np.concatenate([b.scores for b in batches]),
        embeddings=np.concatenate([b.embeddings for b in batches], dtype=dtype),
        extras={k: np.concatenate([b.extras[k] for b in batches]) for k in batches[0].extras},
    )


def _slice_batch(batch: RegionBatch, lo: int, hi: int) -> RegionBatch:
    return RegionBatch(
        image_ids=batch.image_ids[lo:hi],
        boxes=batch.boxes[lo:hi],
        scores=batch.scores[lo:hi],
        embeddings=batch.embeddings[lo:hi],
        extras={k: v[lo:hi] for k, v in batch.extras.items()},
    )


def is_complete(root: str | Path) -> bool:
    """Module-level alias of :meth:`RegionStore.is_complete`."""
    return RegionStore.is_complete(root)
