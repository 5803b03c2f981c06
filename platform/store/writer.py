"""Region store writer: atomic Parquet parts, failure records, resume, finalize.

Many writers (one per Ray Data actor) may write parts into the same ``root`` at once;
one ``finalize`` call at the end builds the index and writes ``manifest.json``, whose
presence is what marks the store complete (see :func:`RegionStore.is_complete`).

Crash safety: every file is written to a hidden ``.tmp`` file in the same folder,
fsynced, then renamed over its final name, so a part is either complete or absent.
Part names are a hash of their sorted image ids, so a rerun of the same batch replaces
the earlier file with an identical one instead of adding a second copy.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ovdlab.platform.store.schema import (
    CONTENT_KEY_META,
    FAILURES_DIR,
    INDEX_NAME,
    INDEX_SCHEMA,
    MANIFEST_NAME,
    PARTS_DIR,
    SCHEMA_VERSION,
    TMP_SUFFIX,
    Failure,
    ImageRegions,
    Manifest,
    StoreError,
    check_extra_names,
    check_manifest_fields,
    failures_to_table,
    float_leaf_paths,
    part_file_name,
    region_schema,
    rows_to_table,
)

log = logging.getLogger(__name__)

# Chosen with ``python -m ovdlab.platform.store.bench`` (2,000 images x 100 synthetic
# unit-norm regions): zstd over BYTE_STREAM_SPLIT floats stores a 512-d region in
# 0.91x its raw float16 bytes and a 64-d one in 1.00x (uncompressed, lz4 or snappy:
# ~1.03x and ~1.2x). A lookup decodes one whole row group, and decoding the nested
# lists costs ~5 ns per value, so row groups are cut by size, not by row count: 16
# images of 100 x 512 regions per group took ~5 ms per lookup, 256 KiB groups (2 such
# images) ~1 ms; 512 KiB groups gain 5% in size and double the lookup time.
COMPRESSION = "zstd"
ROW_GROUP_BYTES = 256 * 1024


def row_group_bounds(num_regions: Sequence[int], region_bytes: int, target_bytes: int) -> list[tuple[int, int]]:
    """Greedy [lo, hi) row ranges of about ``target_bytes`` each (at least one row each).

    A row costs ``max(N, 1) * region_bytes`` so images without regions still pack.
    """
    bounds: list[tuple[int, int]] = []
    lo, size = 0, 0
    for i, n in enumerate(num_regions):
        cost = max(int(n), 1) * region_bytes
        if i > lo and size + cost > target_bytes:
            bounds.append((lo, i))
            lo, size = i, 0
        size += cost
    if lo < len(num_regions):
        bounds.append((lo, len(num_regions)))
    return bounds


class RegionStoreWriter:
    """Writes region rows and failures under ``root``; ``finalize`` completes the store.

    Args:
        root: store folder (created if missing).
        embed_dim: D of the float16 embeddings.
        manifest: the caller's provenance fields, kept in ``manifest.json``; must hold
            ``dataset, split, proposal_source, teacher_id, teacher_digest, crop,
            content_key`` and may hold more (JSON values).
        extras: names of the optional per-region float32 columns every row carries
            (e.g. ``("confidence",)`` for EZSD).
        row_group_bytes: target decoded size of a Parquet row group (whole images,
            at least one); a lookup decodes one row group.
        compression: Parquet codec.

    The writer holds only paths and settings, so it pickles to Ray actors as is.
    """

    def __init__(
        self,
        root: str | Path,
        embed_dim: int,
        manifest: dict[str, Any],
        *,
        extras: Sequence[str] = (),
        row_group_bytes: int = ROW_GROUP_BYTES,
        compression: str = COMPRESSION,
    ) -> None:
        if row_group_bytes < 1:
            raise ValueError(f"row_group_bytes must be >= 1, got {row_group_bytes}")
        self.root = Path(root)
        self.embed_dim = int(embed_dim)
        self.fields = check_manifest_fields(manifest)
        self.extras = check_extra_names(extras)
        self.schema = region_schema(self.embed_dim, self.extras, str(self.fields["content_key"]))
        self.row_group_bytes = int(row_group_bytes)
        self.compression = compression
        self._check_existing_manifest()
        (self.root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / FAILURES_DIR).mkdir(parents=True, exist_ok=True)

    def _check_existing_manifest(self) -> None:
        path = self.root / MANIFEST_NAME
        if not path.is_file():
            return
        old = Manifest.load(self.root)
        mine = (self.fields["content_key"], self.embed_dim, list(self.extras))
        theirs = (old.fields.get("content_key"), old.embed_dim, list(old.extras))
        if mine != theirs:
            raise StoreError(
                f"{path} describes a different store (content_key, embed_dim, extras) = {theirs}, "
                f"this writer has {mine}; use another root"
            )

    # -- writing ---------------------------------------------------------------------

    def write_part(self, rows: Sequence[ImageRegions]) -> Path | None:
        """Validate and write one part atomically; returns its path (None for no rows).

        Rows are sorted by image id, so the file depends only on the batch's content.
        Writing after ``finalize`` removes ``manifest.json``: the store is incomplete
        again until the next ``finalize``.
        """
        if not rows:
            return None
        for row in rows:
            if not isinstance(row, ImageRegions):
                raise TypeError(f"write_part takes ImageRegions rows, got {type(row).__name__}")
            row.validate(self.embed_dim, self.extras)
        ordered = sorted(rows, key=lambda r: r.image_id)
        ids = [r.image_id for r in ordered]
        repeated = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
        if repeated:
            raise ValueError(f"image ids {repeated} appear more than once in one part")
        table = rows_to_table(ordered, self.schema, self.extras)
        path = self.root / PARTS_DIR / part_file_name(ids)
        self._invalidate_manifest()
        region_bytes = 2 * self.embed_dim + 4 * (5 + len(self.extras))
        bounds = row_group_bounds([r.num_regions for r in ordered], region_bytes, self.row_group_bytes)
        _atomic_write(path, lambda f: self._write_row_groups(f, table, bounds))
        return path

    def _write_row_groups(self, sink: Any, table: pa.Table, bounds: list[tuple[int, int]]) -> None:
        with pq.ParquetWriter(
            sink,
            table.schema,
            compression=self.compression,
            use_dictionary=False,
            use_byte_stream_split=float_leaf_paths(self.extras),
            write_statistics=["image_id"],
        ) as out:
            for lo, hi in bounds:
                out.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)

    def write_failures(self, failures: Sequence[Failure]) -> Path | None:
        """Record failed images in a ``failures/`` part (atomic, named by hash); None for none."""
        if not failures:
            return None
        ordered = sorted(failures, key=lambda f: (int(f.image_id), f.stage, f.path, f.error))
        table = failures_to_table(ordered)
        path = self.root / FAILURES_DIR / part_file_name([f.image_id for f in ordered], salt="failures")
        self._invalidate_manifest()
        _atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
        return path

    def _invalidate_manifest(self) -> None:
        (self.root / MANIFEST_NAME).unlink(missing_ok=True)

    # -- resume ----------------------------------------------------------------------

    def done_image_ids(self) -> set[int]:
        """Ids in complete parts plus failed ids: the pipeline skips these on resume.

        Failed images count as done so a bad file is not retried on every resume;
        delete ``failures/`` to retry them.
        """
        done: set[int] = set()
        for path in self._part_paths():
            self._check_part_schema(path)
            done.update(_read_int_column(path, "image_id"))
        for path in self._failure_paths():
            done.update(_read_int_column(path, "image_id"))
        return done

    def _part_paths(self) -> list[Path]:
        return sorted(p for p in (self.root / PARTS_DIR).glob("part-*.parquet") if p.is_file())

    def _failure_paths(self) -> list[Path]:
        return sorted(p for p in (self.root / FAILURES_DIR).glob("part-*.parquet") if p.is_file())

    def _check_part_schema(self, path: Path) -> None:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{path}: unreadable region part ({err}); delete it and resume") from err
        got = {f.name: f.type for f in schema}
        expected = {f.name: f.type for f in self.schema}
        if schema.names != self.schema.names or any(got[n] != expected[n] for n in expected):
            diffs = [
                f"{n}: {got.get(n, 'missing')} (this store: {expected.get(n, 'none')})"
                for n in sorted(got.keys() | expected.keys())
                if got.get(n) != expected.get(n)
            ]
            raise StoreError(f"{path}: schema differs from this store's: {'; '.join(diffs)}")
        key = (schema.metadata or {}).get(CONTENT_KEY_META)
        if key != self.schema.metadata[CONTENT_KEY_META]:
            raise StoreError(
                f"{path}: written for content key {key!r}, this store is {self.fields['content_key']!r}"
            )

    # -- finalize --------------------------------------------------------------------

    def finalize(self, expected_image_ids: Iterable[int] | None = None) -> Manifest:
        """Index every image exactly once and write ``manifest.json`` last.

        With ``expected_image_ids`` (the dataset split's ids) every expected image must
        be stored or recorded as failed, and no other image may be stored; otherwise a
        ``StoreError`` names the missing or unexpected ids and no manifest is written.

        Leftover ``.tmp`` files of crashed writes are removed. If a crash left one image
        in two parts (batches regrouped on resume), the row in the part whose file name
        sorts first is kept, the other is left out of the index (readers never see it)
        and the pair is listed under ``duplicates`` in the manifest. Failures of images
        that later succeeded are not counted.
        """
        self._remove_tmp_files()
        entries: dict[int, tuple[str, int, int]] = {}
        duplicates: list[dict[str, Any]] = []
        parts = self._part_paths()
        for path in tqdm(parts, desc="index region parts", unit="part", leave=False, disable=len(parts) < 8):
            self._check_part_schema(path)
            rel = f"{PARTS_DIR}/{path.name}"
            table = pq.read_table(path, columns=["image_id", "scores"])
            ids = table.column("image_id").to_numpy()
            counts = table.column("scores").combine_chunks().value_lengths().to_numpy()
            for row, (image_id, n) in enumerate(zip(ids.tolist(), counts.tolist())):
                if image_id in entries:
                    duplicates.append({"image_id": image_id, "kept": entries[image_id][0], "dropped": rel})
                    continue
                entries[image_id] = (rel, row, n)
        if duplicates:
            log.warning(
                "region store %s: %d images were in two parts; kept the first part's row for each: %s",
                self.root, len(duplicates), [d["image_id"] for d in duplicates][:20],
            )
        failed = set()
        for path in self._failure_paths():
            failed.update(_read_int_column(path, "image_id"))
        unresolved = failed - entries.keys()
        if expected_image_ids is not None:
            self._check_expected({int(i) for i in expected_image_ids}, entries.keys(), unresolved)
        self._write_index(entries)
        manifest = Manifest(
            embed_dim=self.embed_dim,
            extras=list(self.extras),
            fields=dict(self.fields),
            counts={
                "images": len(entries),
                "regions": int(sum(n for _, _, n in entries.values())),
                "failures": len(unresolved),
                "parts": len(parts),
                "duplicates": len(duplicates),
            },
            parts=[f"{PARTS_DIR}/{p.name}" for p in parts],
            duplicates=duplicates,
            parquet={
                "compression": self.compression,
                "row_group_bytes": self.row_group_bytes,
                "byte_stream_split": True,
            },
            schema_version=SCHEMA_VERSION,
        )
        text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False)
        _atomic_write(self.root / MANIFEST_NAME, lambda f: f.write(text.encode()))
        return manifest

    def _check_expected(self, expected: set[int], stored: Iterable[int], failed: set[int]) -> None:
        stored = set(stored)
        missing = sorted(expected - stored - failed)
        unexpected = sorted((stored | failed) - expected)
        if missing or unexpected:
            raise StoreError(
                f"region store {self.root} is not complete: {len(missing)} expected images neither stored nor "
                f"failed {missing[:10]}, {len(unexpected)} images not in the expected ids {unexpected[:10]}"
            )

    def _remove_tmp_files(self) -> None:
        for folder in (self.root, self.root / PARTS_DIR, self.root / FAILURES_DIR):
            for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                log.warning("region store %s: removing %s left by an interrupted write", self.root, tmp.name)
                tmp.unlink(missing_ok=True)

    def _write_index(self, entries: dict[int, tuple[str, int, int]]) -> None:
        ids = np.array(sorted(entries), dtype=np.int64)
        table = pa.Table.from_arrays(
            [
                pa.array(ids, pa.int64()),
                pa.array([entries[i][0] for i in ids.tolist()], pa.string()),
                pa.array([entries[i][1] for i in ids.tolist()], pa.int32()),
                pa.array([entries[i][2] for i in ids.tolist()], pa.int32()),
            ],
            schema=INDEX_SCHEMA,
        )
        _atomic_write(self.root / INDEX_NAME, lambda f: pq.write_table(table, f, compression="zstd"))


def _read_int_column(path: Path, column: str) -> list[int]:
    try:
        return pq.read_table(path, columns=[column]).column(column).to_numpy().tolist()
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: unreadable ({err}); delete it and resume") from err


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through ``write(file)`` into a hidden tmp file, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
