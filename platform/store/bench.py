"""Micro benchmark of a region store: bytes per region and single-image lookup latency.

``measure_store`` is what ``jobs/bench_extract.py`` reports for a real store;
``python -m ovdlab.platform.store.bench`` writes synthetic stores (unit-norm Gaussian
embeddings, the hardest case for compression) and measures them, to choose the
Parquet settings in ``writer.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from ovdlab.platform.store.reader import RegionStore
from ovdlab.platform.store.schema import ImageRegions, Manifest
from ovdlab.platform.store.writer import ROW_GROUP_BYTES, RegionStoreWriter


def measure_store(root: str | Path, lookups: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Size and lookup numbers of the finalized store at ``root``.

    ``bytes_ratio`` is all files of the store over the raw float16 embedding payload
    (regions x D x 2 bytes), so boxes, scores, index and Parquet overhead all count
    against it. Lookups are ``get`` of uniformly random stored ids through a fresh
    reader whose part handles are opened before timing (file opening is a one-time
    cost per process), so nearly every lookup decodes a row group. The lookup's thread
    CPU time is reported too: on a shared machine it moves less than wall time.
    """
    root = Path(root)
    store = RegionStore(root)
    counts = store.manifest.counts
    regions, dim = counts["regions"], store.embed_dim
    store_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    raw = regions * dim * 2
    out: dict[str, Any] = {
        "images": counts["images"],
        "regions": regions,
        "embed_dim": dim,
        "row_group_bytes": store.manifest.parquet.get("row_group_bytes"),
        "compression": store.manifest.parquet.get("compression"),
        "store_bytes": store_bytes,
        "raw_fp16_bytes": raw,
        "bytes_per_region": store_bytes / regions if regions else float("nan"),
        "bytes_ratio": store_bytes / raw if raw else float("nan"),
    }
    if len(store) == 0:
        return out
    store.open_parts()
    rng = np.random.default_rng(seed)
    ids = rng.choice(store.image_ids, size=lookups, replace=True)
    times, cpu = np.empty(lookups), np.empty(lookups)
    for i, image_id in enumerate(ids.tolist()):
        t0, c0 = time.perf_counter(), time.thread_time()
        store.get(image_id)
        times[i], cpu[i] = time.perf_counter() - t0, time.thread_time() - c0
    t0 = time.perf_counter()
    streamed = sum(len(b) for b in store.iter_batches(65536, dtype=np.float16))
    out.update(
        lookup_p50_ms=float(np.percentile(times, 50) * 1e3),
        lookup_p99_ms=float(np.percentile(times, 99) * 1e3),
        lookup_mean_ms=float(times.mean() * 1e3),
        lookup_cpu_p50_ms=float(np.percentile(cpu, 50) * 1e3),
        iter_regions_per_s=streamed / (time.perf_counter() - t0),
    )
    return out


def synthetic_rows(
    image_ids: Sequence[int], regions_per_image: int, embed_dim: int, rng: np.random.Generator,
    extras: Sequence[str] = (),
) -> list[ImageRegions]:
    """Random but realistic rows: unit-norm embeddings, xyxy boxes inside 640x480, scores in (0, 1)."""
    rows = []
    for image_id in image_ids:
        n = regions_per_image
        emb = rng.standard_normal((n, embed_dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        xy = rng.uniform(0, 480, (n, 2))
        wh = rng.uniform(1, 160, (n, 2))
        rows.append(
            ImageRegions(
                image_id=int(image_id),
                boxes=np.concatenate([xy, xy + wh], axis=1),
                scores=rng.uniform(0, 1, n),
                embeddings=emb,
                extras={name: rng.uniform(0, 1, n) for name in extras},
            )
        )
    return rows


def write_synthetic_store(
    root: str | Path, images: int, regions_per_image: int, embed_dim: int,
    rows_per_part: int = 512, seed: int = 0, **writer_kwargs: Any,
) -> Manifest:
    """Fill ``root`` with a synthetic store of ``images`` images and finalize it."""
    fields = {
        "dataset": "synthetic", "split": "bench", "proposal_source": "random", "teacher_id": "none",
        "teacher_digest": "none", "crop": "plain", "content_key": f"bench-{images}-{regions_per_image}-{embed_dim}",
    }
    writer = RegionStoreWriter(root, embed_dim, fields, **writer_kwargs)
    rng = np.random.default_rng(seed)
    for start in tqdm(range(0, images, rows_per_part), desc=f"write D={embed_dim}", leave=False):
        ids = range(start, min(start + rows_per_part, images))
        writer.write_part(synthetic_rows(ids, regions_per_image, embed_dim, rng))
    return writer.finalize()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="measure synthetic region stores")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--row-group-kib", type=int, nargs="+", default=[ROW_GROUP_BYTES // 1024])
    parser.add_argument("--compressions", nargs="+", default=["zstd"])
    parser.add_argument("--lookups", type=int, default=1000)
    args = parser.parse_args(argv)
    for dim in args.dims:
        for compression in args.compressions:
            for kib in args.row_group_kib:
                with tempfile.TemporaryDirectory() as tmp:
                    write_synthetic_store(
                        tmp, args.images, args.regions, dim, row_group_bytes=kib * 1024, compression=compression
                    )
                    print(json.dumps(measure_store(tmp, lookups=args.lookups)), flush=True)


if __name__ == "__main__":
    main()
