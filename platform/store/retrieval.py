"""LP-OVOD retrieval: top-K stored regions per class by cosine similarity to its text embedding.

Pham et al. (WACV 2024), Sec. 3.2: for each novel class, search the CLIP embeddings
of the training proposals whose objectness is >= 0.6 with the class text embedding
(faiss inner product on L2-normalized vectors) and keep the top K = 100 as
pseudo-labelled boxes. The reference builds one index over a memory-mapped tensor of
every proposal with hard-coded paths; here the store is streamed with
``iter_batches``: each batch of filtered, normalized regions goes into a fresh
``faiss.IndexFlatIP``, its top K per class are merged into a running top K. The result
equals one exact search over all regions while memory stays at one batch (COCO train
proposals do not fit in memory as float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from ovdlab.platform.store.reader import RegionStore


@dataclass(frozen=True)
class Retrieved:
    """One retrieved region: its image, box (xyxy, original pixels), proposal score, cosine."""

    image_id: int
    box: np.ndarray
    score: float
    similarity: float


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalize rows in float32; all-zero rows stay zero (cosine 0 with everything)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _check_text(text_embeddings: np.ndarray, embed_dim: int) -> np.ndarray:
    text = np.asarray(text_embeddings, dtype=np.float32)
    if text.ndim != 2 or text.shape[1] != embed_dim:
        raise ValueError(f"text_embeddings must have shape [C, {embed_dim}] (store D), got {text.shape}")
    if not np.isfinite(text).all():
        raise ValueError("text_embeddings has non-finite values")
    zero = np.flatnonzero(np.linalg.norm(text, axis=1) == 0)
    if zero.size:
        raise ValueError(f"text_embeddings rows {zero.tolist()} are all zero; cosine is undefined")
    return np.ascontiguousarray(normalize_rows(text))


def retrieve_topk(
    store: RegionStore,
    text_embeddings: np.ndarray,
    k: int = 100,
    min_score: float = 0.6,
    batch_size_regions: int = 262144,
) -> list[list[Retrieved]]:
    """Per class (row of ``text_embeddings``), the ``k`` most similar regions with score >= ``min_score``.

    Text rows are L2-normalized here as well (a no-op for a text bank). Lists are
    sorted by decreasing similarity (ties: store order); a class gets fewer than ``k``
    when fewer regions pass the score floor.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    text = _check_text(text_embeddings, store.embed_dim)
    num_classes = text.shape[0]
    best = _TopK.empty(num_classes)
    seen = 0
    total = store.manifest.counts["regions"]
    with tqdm(total=total, desc="retrieve top-k", unit="region", leave=False, disable=total < 1_000_000) as bar:
        for batch in store.iter_batches(batch_size_regions, dtype=np.float32):
            bar.update(len(batch))
            keep = np.flatnonzero(batch.scores >= min_score)
            if keep.size == 0:
                continue
            index = faiss.IndexFlatIP(store.embed_dim)
            index.add(np.ascontiguousarray(normalize_rows(batch.embeddings[keep])))
            sim, local = index.search(text, min(k, keep.size))
            rows = keep[local]
            found = _TopK(
                sim=sim,
                pos=local.astype(np.int64) + seen,
                image_id=batch.image_ids[rows],
                box=batch.boxes[rows],
                score=batch.scores[rows],
            )
            best = best.merge(found, k)
            seen += keep.size
    return best.to_lists()


@dataclass
class _TopK:
    """Running top-k per class; ``pos`` (order among filtered regions) breaks ties."""

    sim: np.ndarray
    pos: np.ndarray
    image_id: np.ndarray
    box: np.ndarray
    score: np.ndarray

    @classmethod
    def empty(cls, num_classes: int) -> "_TopK":
        return cls(
            sim=np.zeros((num_classes, 0), np.float32),
            pos=np.zeros((num_classes, 0), np.int64),
            image_id=np.zeros((num_classes, 0), np.int64),
            box=np.zeros((num_classes, 0, 4), np.float32),
            score=np.zeros((num_classes, 0), np.float32),
        )

    def merge(self, other: "_TopK", k: int) -> "_TopK":
        """Highest similarity first, earlier position on ties; keep ``k`` per class."""
        sim = np.concatenate([self.sim, other.sim], axis=1)
        pos = np.concatenate([self.pos, other.pos], axis=1)
        order = np.lexsort((pos, -sim), axis=-1)[:, :k]

        def take(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            both = np.concatenate([a, b], axis=1)
            idx = order if both.ndim == 2 else order[:, :, None]
            return np.take_along_axis(both, idx, axis=1)

        return _TopK(
            sim=take(self.sim, other.sim),
            pos=take(self.pos, other.pos),
            image_id=take(self.image_id, other.image_id),
            box=take(self.box, other.box),
            score=take(self.score, other.score),
        )

    def to_lists(self) -> list[list[Retrieved]]:
        return [
            [
                Retrieved(
                    image_id=int(self.image_id[c, j]),
                    box=self.box[c, j].copy(),
                    score=float(self.score[c, j]),
                    similarity=float(self.sim[c, j]),
                )
                for j in range(self.sim.shape[1])
            ]
            for c in range(self.sim.shape[0])
        ]
