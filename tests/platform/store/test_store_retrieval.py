"""LP-OVOD retrieval over a region store equals an exact brute-force numpy search."""

from __future__ import annotations

import numpy as np
import pytest

from ovdlab.platform.store import RegionStore, RegionStoreWriter, retrieve_topk
from ovdlab.platform.store.bench import synthetic_rows

D = 32
FIELDS = {
    "dataset": "shapes", "split": "train", "proposal_source": "file", "teacher_id": "t",
    "teacher_digest": "d", "crop": "1x+1.5x", "content_key": "retrieval",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    rng = np.random.default_rng(0)
    writer = RegionStoreWriter(root, D, FIELDS, row_group_bytes=2048)
    for lo in range(0, 60, 20):
        writer.write_part(synthetic_rows(range(lo, lo + 20), 15, D, rng))
    writer.finalize()
    return RegionStore(root)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(store, text, k, min_score):
    """All regions at once: cosine of normalized vectors, top k by similarity, store order on ties."""
    (everything,) = list(store.iter_batches(10**9))
    keep = np.flatnonzero(everything.scores >= min_score)
    sims = unit(text) @ unit(everything.embeddings[keep].astype(np.float64)).T
    out = []
    for c in range(text.shape[0]):
        order = np.lexsort((np.arange(keep.size), -sims[c]))[:k]
        out.append([(int(everything.image_ids[keep[j]]), everything.boxes[keep[j]], float(everything.scores[keep[j]]), sims[c, j]) for j in order])
    return out


@pytest.mark.parametrize("batch_size, k, min_score", [(64, 10, 0.6), (1000, 25, 0.0), (7, 3, 0.9)])
def test_retrieval_equals_brute_force(store, batch_size, k, min_score):
    text = unit(np.random.default_rng(1).standard_normal((6, D)))
    got = retrieve_topk(store, text, k=k, min_score=min_score, batch_size_regions=batch_size)
    want = brute_force(store, text, k, min_score)
    assert len(got) == 6
    for got_c, want_c in zip(got, want):
        assert [r.image_id for r in got_c] == [w[0] for w in want_c]
        np.testing.assert_array_equal(np.stack([r.box for r in got_c]), np.stack([w[1] for w in want_c]))
        assert [r.score for r in got_c] == [w[2] for w in want_c]
        np.testing.assert_allclose([r.similarity for r in got_c], [w[3] for w in want_c], atol=1e-5)
        assert all(r.score >= min_score for r in got_c)


def test_score_floor_limits_the_candidates(store):
    (everything,) = list(store.iter_batches(10**9))
    floor = float(np.sort(everything.scores)[-5])  # exactly 5 regions pass
    text = unit(np.random.default_rng(2).standard_normal((3, D)))
    got = retrieve_topk(store, text, k=100, min_score=floor)
    assert [len(c) for c in got] == [5, 5, 5]
    assert all(r.score >= floor for c in got for r in c)
    assert retrieve_topk(store, text, k=5, min_score=1.5) == [[], [], []]


def test_finds_a_planted_region(tmp_path):
    rng = np.random.default_rng(4)
    rows = synthetic_rows(range(10), 8, D, rng)
    target = unit(rng.standard_normal((1, D)))[0]
    rows[6].embeddings[3] = target.astype(np.float16)
    rows[6].scores[3] = 0.95
    writer = RegionStoreWriter(tmp_path, D, FIELDS)
    writer.write_part(rows)
    writer.finalize()
    (best, *_), = retrieve_topk(RegionStore(tmp_path), target[None] * 3.0, k=2)  # unnormalized text is fine
    assert best.image_id == 6 and best.similarity == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_array_equal(best.box, rows[6].boxes[3])


def test_bad_text_embeddings_are_rejected(store):
    with pytest.raises(ValueError, match=r"shape \[C, 32\]"):
        retrieve_topk(store, np.ones((2, 16)))
    with pytest.raises(ValueError, match=r"rows \[1\] are all zero"):
        retrieve_topk(store, np.stack([np.ones(D), np.zeros(D)]))
    with pytest.raises(ValueError, match="k must be"):
        retrieve_topk(store, np.ones((1, D)), k=0)
