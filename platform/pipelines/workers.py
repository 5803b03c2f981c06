"""Ray Data user functions of the extraction job: one per stage, thin over ``rows.py``.

Ray imports these by reference in every worker, so this module imports neither torch
nor open_clip at import time: decode tasks and the writer actor start in a fraction of
the time, and only the model actors (proposals from a model, embeddings) load torch,
in their constructors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ovdlab.platform.pipelines import rows as R
from ovdlab.platform.proposals.base import ProposalSource
from ovdlab.platform.store.writer import RegionStoreWriter

if TYPE_CHECKING:
    from ovdlab.platform.config import ExperimentConfig

Batch = dict[str, np.ndarray]


def torch_threads(num_cpus: float) -> int:
    """Intra-op threads of a model actor: the whole CPUs it reserved, at least one.

    The same rule as Ray's own ``OMP_NUM_THREADS`` for its workers, made explicit so it
    also holds where the variable is set differently. Compute that spins more threads
    than the CPUs it reserved collapses on a shared node: measured here on 2 busy cores,
    the tiny teacher embedded 4,064 crops/s with one thread and 398 with two.
    """
    return max(1, int(num_cpus))


def _setup_torch(num_cpus: float, num_gpus: float) -> str:
    """Set this actor's torch threads; its device: CUDA when it holds a GPU share."""
    import torch

    torch.set_num_threads(torch_threads(num_cpus))
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def decode_batch(batch: Batch) -> Batch:
    """Decode stage (CPU task)."""
    return R.rows_to_batch(R.decode_rows(R.batch_to_rows(batch)))


class ProposeBatch:
    """Proposal actor: one source per actor (its model, if any, loaded on first use)."""

    def __init__(self, source: ProposalSource, num_cpus: float, num_gpus: float) -> None:
        if source.needs_accelerator:
            source.device = _setup_torch(num_cpus, num_gpus)  # type: ignore[attr-defined]
        self.source = source

    def __call__(self, batch: Batch) -> Batch:
        return R.rows_to_batch(R.propose_rows(self.source, R.batch_to_rows(batch)))


class EmbedBatch:
    """Embedding actor: loads the teacher once and checks it is the one the stage key names."""

    def __init__(
        self, cfg: "ExperimentConfig", checkpoint: Path | None, digest: str, num_cpus: float, num_gpus: float
    ) -> None:
        from ovdlab.platform.teacher.loading import load_teacher

        device = _setup_torch(num_cpus, num_gpus)
        self.teacher = load_teacher(cfg.teacher, cfg.work_path(), device, checkpoint=checkpoint)
        if self.teacher.digest != digest:
            raise RuntimeError(
                f"teacher {self.teacher.teacher_id} loaded in the actor has digest {self.teacher.digest}, "
                f"the driver planned with {digest}: its weights changed during the run"
            )
        self.crop = cfg.store.crop
        self.batch_size = cfg.teacher.batch_size

    def __call__(self, batch: Batch) -> Batch:
        return R.rows_to_batch(R.embed_rows(self.teacher, self.crop, self.batch_size, R.batch_to_rows(batch)))


class WriteBatch:
    """Writer actor: one atomic part (and failure part) per batch, into the shared store folder."""

    def __init__(self, writer: RegionStoreWriter) -> None:
        self.writer = writer

    def __call__(self, batch: Batch) -> Batch:
        return R.rows_to_batch(R.write_rows(self.writer, R.batch_to_rows(batch)))
