"""Tiny experiment configs for the train tests: a 24-image shapes world made per test.

The teacher is ``shapes-tiny`` with ``pretrained=random`` (deterministic random
weights): these tests check the training, evaluation and prediction machinery, not the
teacher's quality, and skip its pretraining (covered by the teacher's own tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ovdlab.platform.config import ExperimentConfig, load_config

TINY = [
    "dataset.shapes.train_images=24",
    "dataset.shapes.val_images=8",
    "dataset.shapes.image_size=64",
    "dataset.shapes.max_objects=4",
    "teacher.pretrained=random",
    "model.min_size=64",
    "model.max_size=64",
    "model.fpn_channels=16",
    "model.representation_size=64",
    "model.rpn_pre_nms_top_n=100",
    "model.rpn_post_nms_top_n=50",
    "model.rpn_batch_size_per_image=64",
    "model.roi_batch_size_per_image=32",
    "train.batch_size=2",
    "train.lr=0.01",
    "train.warmup_iters=2",
    "train.steps=[1000]",
    "train.grad_clip=1.0",
    "eval.batch_size=4",
    "eval.vis_images=2",
    "ray.cpus_per_worker=0.5",
]


def tiny_config(work_dir: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The ViLD-text shapes experiment shrunk to seconds, in ``work_dir``."""
    return load_config("experiments/vild_text_shapes", [f"work_dir={work_dir}"] + TINY + list(overrides or []))


@pytest.fixture(scope="session")
def make_tiny_cfg():
    """``make(work_dir, overrides) -> ExperimentConfig`` (for module-scoped fixtures)."""
    return tiny_config


@pytest.fixture
def tiny_cfg_factory(tmp_path):
    """``make(overrides) -> ExperimentConfig`` in this test's own work dir."""
    return lambda overrides=None: tiny_config(tmp_path / "work", overrides)
