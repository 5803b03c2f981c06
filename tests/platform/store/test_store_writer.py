"""Region store writer: round trip, empty images, resume after a crash, failures, manifest."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from ovdlab.platform.store import (
    Failure,
    ImageRegions,
    RegionStore,
    RegionStoreWriter,
    StoreError,
    is_complete,
)
from ovdlab.platform.store.bench import synthetic_rows
from ovdlab.platform.store.writer import row_group_bounds

D = 16
FIELDS = {
    "dataset": "shapes",
    "split": "train",
    "proposal_source": "gt",
    "teacher_id": "shapes-tiny",
    "teacher_digest": "abc123",
    "crop": "plain",
    "content_key": "k0",
}


def rows(ids, n=5, dim=D, seed=0, extras=("confidence",)):
    return synthetic_rows(list(ids), n, dim, np.random.default_rng(seed), extras=extras)


def writer(root, dim=D, extras=("confidence",), **kw):
    return RegionStoreWriter(root, dim, dict(FIELDS, **kw.pop("fields", {})), extras=extras, **kw)


def assert_same(a: ImageRegions, b: ImageRegions) -> None:
    assert a.image_id == b.image_id
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.embeddings.dtype == b.embeddings.dtype == np.float16
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.extras.keys() == b.extras.keys()
    for k in a.extras:
        np.testing.assert_array_equal(a.extras[k], b.extras[k])


def test_round_trip_is_exact(tmp_path):
    written = rows(range(10), n=7)
    float32_emb = {r.image_id: r.embeddings for r in written}
    w = writer(tmp_path)
    w.write_part(written[:6])
    w.write_part(written[6:])
    w.finalize()
    store = RegionStore(tmp_path)
    assert len(store) == 10
    for row in written:
        got = store.get(row.image_id)
        assert_same(got, row)
        assert got.boxes.dtype == got.scores.dtype == got.extras["confidence"].dtype == np.float32
        np.testing.assert_array_equal(got.embeddings, float32_emb[row.image_id].astype(np.float16))


def test_float32_embeddings_are_stored_as_float16(tmp_path):
    emb = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    row = ImageRegions(7, np.array([[0, 0, 5, 5]] * 3), np.array([0.1, 0.5, 0.9]), emb)
    w = writer(tmp_path, extras=())
    w.write_part([row])
    w.finalize()
    got = RegionStore(tmp_path).get(7)
    np.testing.assert_array_equal(got.embeddings, emb.astype(np.float16))


def test_image_without_regions_is_a_row(tmp_path):
    empty = ImageRegions(3, np.zeros((0, 4)), np.zeros(0), np.zeros((0, D)), {"confidence": np.zeros(0)})
    w = writer(tmp_path)
    w.write_part([empty, *rows([1, 2])])
    manifest = w.finalize()
    assert manifest.counts["images"] == 3
    assert manifest.counts["regions"] == 10
    store = RegionStore(tmp_path)
    got = store.get(3)
    assert got.boxes.shape == (0, 4) and got.scores.shape == (0,) and got.embeddings.shape == (0, D)
    assert got.extras["confidence"].shape == (0,)
    assert store.num_regions(3) == 0
    assert 3 in w.done_image_ids()


def test_store_of_only_empty_images(tmp_path):
    empties = [ImageRegions(i, np.zeros((0, 4)), np.zeros(0), np.zeros((0, D))) for i in range(4)]
    w = writer(tmp_path, extras=())
    w.write_part(empties)
    assert w.finalize().counts == {"images": 4, "regions": 0, "failures": 0, "parts": 1, "duplicates": 0}
    assert sum(len(b) for b in RegionStore(tmp_path).iter_batches(8)) == 0


def test_same_batch_rewrites_the_same_file(tmp_path):
    batch = rows(range(5))
    w = writer(tmp_path)
    first = w.write_part(batch)
    content = first.read_bytes()
    second = w.write_part(list(reversed(batch)))
    assert first == second
    assert second.read_bytes() == content
    assert len(list((tmp_path / "parts").iterdir())) == 1


def test_resume_after_crash_indexes_every_image_once(tmp_path):
    w = writer(tmp_path)
    part_a = w.write_part(rows(range(0, 5), seed=1))
    part_b = w.write_part(rows(range(3, 8), seed=2))  # a regrouped rerun: 3 and 4 again
    w.write_failures([Failure(9, "img/9.jpg", "decode", "truncated file")])
    leftover = tmp_path / "parts" / f".{part_a.name}.deadbeef.tmp"
    leftover.write_bytes(b"half a parquet file")

    resumed = writer(tmp_path)  # a new process after the crash
    assert resumed.done_image_ids() == {0, 1, 2, 3, 4, 5, 6, 7, 9}
    manifest = resumed.finalize()

    assert not leftover.exists()
    assert manifest.counts["images"] == 8
    assert manifest.counts["duplicates"] == 2
    kept, dropped = sorted([part_a, part_b], key=lambda p: p.name)
    assert manifest.duplicates == [
        {"image_id": i, "kept": f"parts/{kept.name}", "dropped": f"parts/{dropped.name}"} for i in (3, 4)
    ]
    store = RegionStore(tmp_path)
    assert store.image_ids.tolist() == list(range(8))
    kept_rows = {r.image_id: r for r in (rows(range(0, 5), seed=1) if kept == part_a else rows(range(3, 8), seed=2))}
    for i in (3, 4):
        assert_same(store.get(i), kept_rows[i])
    seen = np.concatenate([b.image_ids for b in store.iter_batches(7)])
    assert np.bincount(seen).tolist() == [5] * 8
    assert manifest.counts["regions"] == 40


def test_failures_table(tmp_path):
    w = writer(tmp_path)
    w.write_part(rows([1, 2]))
    failures = [
        Failure(5, "img/5.jpg", "decode", "cannot identify image file"),
        Failure(4, "img/4.jpg", "embed", "CUDA out of memory"),
        Failure(2, "img/2.jpg", "decode", "timeout"),  # later succeeded: resolved
    ]
    path = w.write_failures(failures)
    assert path.parent.name == "failures"
    assert w.write_failures([]) is None
    manifest = w.finalize()
    assert manifest.counts["failures"] == 2
    assert RegionStore(tmp_path).failures() == sorted(failures[:2], key=lambda f: f.image_id)
    assert pq.read_table(path).num_rows == 3


def test_manifest_is_written_last_and_holds_provenance(tmp_path):
    w = writer(tmp_path, fields={"notes": {"proposals_per_image": 5}})
    w.write_part(rows(range(4)))
    assert not is_complete(tmp_path)
    with pytest.raises(StoreError, match="not finalized"):
        RegionStore(tmp_path)
    manifest = w.finalize()
    assert is_complete(tmp_path) and RegionStore.is_complete(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    for key, value in FIELDS.items():
        assert data[key] == value
    assert data["notes"] == {"proposals_per_image": 5}
    assert data["schema_version"] == 1
    assert data["embed_dim"] == D
    assert data["extras"] == ["confidence"]
    assert data["counts"] == {"images": 4, "regions": 20, "failures": 0, "parts": 1, "duplicates": 0}
    assert data["parts"] == [str(p.relative_to(tmp_path)) for p in (tmp_path / "parts").glob("part-*.parquet")]
    assert manifest.content_key == "k0"
    assert RegionStore(tmp_path).manifest == manifest
    w.write_part(rows([10]))  # the store changes: complete again only after finalize
    assert not is_complete(tmp_path)
    assert w.finalize().counts["images"] == 5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: ImageRegions(1, r.boxes, r.scores, r.embeddings[:, :4], r.extras), r"image 1: embeddings"),
        (lambda r: ImageRegions(1, r.boxes[:2], r.scores, r.embeddings, r.extras), r"image 1: boxes"),
        (lambda r: ImageRegions(1, r.boxes, r.scores[:, None], r.embeddings, r.extras), r"image 1: scores"),
        (lambda r: ImageRegions(1, r.boxes, np.full(5, np.nan), r.embeddings, r.extras), r"image 1: scores has non-finite"),
        (lambda r: ImageRegions(1, r.boxes, r.scores, np.where(r.embeddings > 0, np.inf, 0), r.extras), r"image 1: embeddings has non-finite"),
        (lambda r: ImageRegions(1, r.boxes[:, [2, 1, 0, 3]], r.scores, r.embeddings, r.extras), r"image 1: box 0 is not xyxy"),
        (lambda r: ImageRegions(1, r.boxes, r.scores, r.embeddings, {}), r"image 1: extras"),
        (lambda r: ImageRegions(1, r.boxes, r.scores, r.embeddings, {"confidence": np.ones(4)}), r"image 1: extra column 'confidence'"),
    ],
)
def test_bad_rows_are_rejected_naming_the_image(tmp_path, make, message):
    w = writer(tmp_path)
    with pytest.raises(ValueError, match=message):
        w.write_part([make(rows([1])[0])])
    assert not list((tmp_path / "parts").iterdir())


def test_bad_batches_and_settings_are_rejected(tmp_path):
    w = writer(tmp_path)
    with pytest.raises(ValueError, match=r"\[3\] appear more than once"):
        w.write_part(rows([3, 4]) + rows([3]))
    assert w.write_part([]) is None
    with pytest.raises(ValueError, match="image_id must be an integer"):
        ImageRegions("7", np.zeros((0, 4)), np.zeros(0), np.zeros((0, D)))
    with pytest.raises(ValueError, match="missing .*content_key"):
        RegionStoreWriter(tmp_path, D, {k: v for k, v in FIELDS.items() if k != "content_key"})
    with pytest.raises(ValueError, match="reserved"):
        RegionStoreWriter(tmp_path, D, dict(FIELDS, counts=3))
    with pytest.raises(ValueError, match="extra column name"):
        RegionStoreWriter(tmp_path, D, FIELDS, extras=("scores",))


def test_writer_refuses_a_different_store(tmp_path):
    w = writer(tmp_path)
    w.write_part(rows([1]))
    w.finalize()
    with pytest.raises(StoreError, match="different store"):
        writer(tmp_path, fields={"content_key": "other"})
    other_dim = tmp_path / "other"
    writer(other_dim).write_part(rows([1]))
    with pytest.raises(StoreError, match=r"schema differs.*embeddings: list<element: fixed_size_list<element: halffloat>\[16\]>"):
        writer(other_dim, dim=2 * D).done_image_ids()
    with pytest.raises(StoreError, match="content key"):
        writer(other_dim, fields={"content_key": "other"}).done_image_ids()


def test_unreadable_part_is_named(tmp_path):
    w = writer(tmp_path)
    (tmp_path / "parts" / "part-broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="part-broken.parquet"):
        w.done_image_ids()


def test_row_groups_are_cut_by_size(tmp_path):
    assert row_group_bounds([1, 1, 1, 1, 1], region_bytes=10, target_bytes=20) == [(0, 2), (2, 4), (4, 5)]
    assert row_group_bounds([5, 0, 0, 1], region_bytes=10, target_bytes=20) == [(0, 1), (1, 3), (3, 4)]
    assert row_group_bounds([], region_bytes=10, target_bytes=20) == []
    w = writer(tmp_path, extras=(), row_group_bytes=3 * 5 * (2 * D + 20))
    path = w.write_part(rows(range(10), extras=()))
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 3, 3, 1]


def test_store_bytes_close_to_raw_float16_payload(tmp_path):
    dim, images, regions = 512, 48, 60
    w = RegionStoreWriter(tmp_path, dim, FIELDS)
    w.write_part(synthetic_rows(range(images), regions, dim, np.random.default_rng(0)))
    w.finalize()
    stored = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert stored <= 1.1 * images * regions * dim * 2


def test_finalize_is_repeatable_and_writer_pickles(tmp_path):
    w = pickle.loads(pickle.dumps(writer(tmp_path)))  # as a Ray actor receives it
    w.write_part(rows(range(3)))
    first = w.finalize()
    index_bytes = (tmp_path / "index.parquet").read_bytes()
    assert w.finalize() == first
    assert (tmp_path / "index.parquet").read_bytes() == index_bytes


def test_finalize_checks_the_expected_ids(tmp_path):
    w = writer(tmp_path)
    w.write_part(rows([1, 2]))
    w.write_failures([Failure(3, "img/3.jpg", "decode", "bad")])
    with pytest.raises(StoreError, match=r"1 expected images neither stored nor failed \[4\]"):
        w.finalize(expected_image_ids=[1, 2, 3, 4])
    with pytest.raises(StoreError, match=r"1 images not in the expected ids \[3\]"):
        w.finalize(expected_image_ids=[1, 2])
    assert not is_complete(tmp_path)
    assert w.finalize(expected_image_ids=range(1, 4)).counts["failures"] == 1
