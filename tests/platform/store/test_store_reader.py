"""Region store reader: lookups, missing ids, streaming batches, pickling, benchmark numbers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from ovdlab.platform.store import ImageRegions, RegionStore, RegionStoreWriter
from ovdlab.platform.store.bench import measure_store, synthetic_rows

D = 8
FIELDS = {
    "dataset": "shapes", "split": "val", "proposal_source": "rpn", "teacher_id": "t",
    "teacher_digest": "d", "crop": "1x+1.5x", "content_key": "reader",
}


@pytest.fixture(scope="module")
def store_and_rows(tmp_path_factory):
    """23 images over 3 parts with 0..9 regions each, small row groups (several per part)."""
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    rows = []
    for image_id in range(100, 123):
        rows += synthetic_rows([image_id], int(rng.integers(0, 10)), D, rng, extras=("confidence",))
    writer = RegionStoreWriter(root, D, FIELDS, extras=("confidence",), row_group_bytes=200)
    for lo in range(0, len(rows), 9):
        writer.write_part(rows[lo : lo + 9])
    writer.finalize()
    return root, {r.image_id: r for r in rows}


def test_get_and_mapping_protocol(store_and_rows):
    root, rows = store_and_rows
    store = RegionStore(root)
    assert len(store) == len(rows)
    assert store.image_ids.tolist() == sorted(rows)
    assert 100 in store and np.int64(122) in store
    assert 99 not in store and "100" not in store and True not in store
    for image_id in [117, 100, 122, 117]:
        got, want = store.get(image_id), rows[image_id]
        np.testing.assert_array_equal(got.boxes, want.boxes)
        np.testing.assert_array_equal(got.embeddings, want.embeddings)
        np.testing.assert_array_equal(got.extras["confidence"], want.extras["confidence"])
        assert store.num_regions(image_id) == len(want.scores)


def test_lookups_do_not_share_memory_with_the_cache(store_and_rows):
    root, rows = store_and_rows
    store = RegionStore(root, cache_row_groups=2)
    image_id = next(i for i, r in rows.items() if len(r.scores))
    store.get(image_id).embeddings[:] = 0
    np.testing.assert_array_equal(store.get(image_id).embeddings, rows[image_id].embeddings)
    for i in rows:
        store.get(i)
    assert len(store._cache) <= 2


def test_missing_id_raises_key_error_naming_it(store_and_rows):
    store = RegionStore(store_and_rows[0])
    with pytest.raises(KeyError, match="image_id 4242 is not in the region store"):
        store.get(4242)
    with pytest.raises(KeyError, match="4242"):
        store.num_regions(4242)


@pytest.mark.parametrize("batch_size", [1, 5, 16, 1000])
def test_iter_batches_yields_every_region_once(store_and_rows, batch_size):
    root, rows = store_and_rows
    batches = list(RegionStore(root).iter_batches(batch_size, dtype=np.float16))
    total = sum(len(r.scores) for r in rows.values())
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert sum(len(b) for b in batches) == total
    ids = np.concatenate([b.image_ids for b in batches])
    emb = np.concatenate([b.embeddings for b in batches])
    boxes = np.concatenate([b.boxes for b in batches])
    conf = np.concatenate([b.extras["confidence"] for b in batches])
    assert emb.dtype == np.float16
    for image_id, row in rows.items():
        mine = ids == image_id
        np.testing.assert_array_equal(emb[mine], row.embeddings)
        np.testing.assert_array_equal(boxes[mine], row.boxes)
        np.testing.assert_array_equal(conf[mine], row.extras["confidence"])


def test_iter_batches_float32_and_bad_arguments(store_and_rows):
    store = RegionStore(store_and_rows[0])
    batch = next(store.iter_batches(4))
    assert batch.embeddings.dtype == np.float32 and batch.embeddings.shape == (4, D)
    with pytest.raises(ValueError, match="batch_size_regions"):
        next(store.iter_batches(0))
    with pytest.raises(ValueError, match="dtype"):
        next(store.iter_batches(4, dtype=np.int8))


def test_pickle_round_trip_reopens_lazily(store_and_rows):
    root, rows = store_and_rows
    store = RegionStore(root)
    store.get(105)
    assert store._files
    blob = pickle.dumps(store)
    assert len(blob) < 1000  # the root and settings, not the index, handles or cache
    clone = pickle.loads(blob)
    assert not clone._files and not clone._cache
    np.testing.assert_array_equal(clone.get(105).embeddings, rows[105].embeddings)
    assert clone.manifest == store.manifest and len(clone) == len(store)


def test_duplicate_rows_are_invisible_to_readers(tmp_path):
    writer = RegionStoreWriter(tmp_path, D, FIELDS, row_group_bytes=100)
    rng = np.random.default_rng(3)
    writer.write_part(synthetic_rows([1, 2, 3], 4, D, rng))
    writer.write_part(synthetic_rows([2, 3, 4], 6, D, rng))
    writer.finalize()
    store = RegionStore(tmp_path)
    ids = np.concatenate([b.image_ids for b in store.iter_batches(3)])
    assert sorted(set(ids.tolist())) == [1, 2, 3, 4]
    assert all((ids == i).sum() == store.num_regions(i) for i in (1, 2, 3, 4))
    assert sum(store.num_regions(i) for i in (1, 2, 3, 4)) == store.manifest.counts["regions"] == len(ids)


def test_measure_store_reports_size_and_latency(store_and_rows):
    numbers = measure_store(store_and_rows[0], lookups=50)
    assert numbers["images"] == 23 and numbers["embed_dim"] == D
    assert numbers["raw_fp16_bytes"] == numbers["regions"] * D * 2
    assert numbers["bytes_ratio"] == pytest.approx(numbers["store_bytes"] / numbers["raw_fp16_bytes"])
    assert 0 < numbers["lookup_p50_ms"] <= numbers["lookup_p99_ms"]
    assert numbers["iter_regions_per_s"] > 0


def test_constructing_image_regions_coerces_dtypes():
    row = ImageRegions(np.int64(5), [[0, 0, 1, 1]], [0.5], np.ones((1, D)), {"c": [1.0]})
    assert row.image_id == 5 and type(row.image_id) is int
    assert row.boxes.dtype == np.float32 and row.embeddings.dtype == np.float16
    assert row.extras["c"].dtype == np.float32
