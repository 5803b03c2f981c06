"""Shared test setup: offline hub, quiet Ray, a local Ray cluster sized for 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parent.parent


TINY_EXPERIMENT = [
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
    "train.optimizer=sgd",
    "train.lr=0.01",
    "train.weight_decay=0.0001",
    "train.warmup_iters=2",
    "train.steps=[1000]",
    "train.grad_clip=1.0",
    "eval.batch_size=4",
    "eval.vis_images=2",
    "ray.cpus_per_worker=0.5",
]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """Overrides that shrink the ViLD-text shapes experiment to seconds.

    A 24-image 64 px world, tiny FPN and heads, and ``shapes-tiny`` with
    ``pretrained=random`` (deterministic random weights): tests of the training,
    evaluation and job machinery skip the teacher's pretraining (it has its own tests).
    """
    return list(TINY_EXPERIMENT)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test process (2 CPUs, workers not niced), with its dashboard: Ray
    Train V2's placement-group cleaner asks the State API whether a training's controller
    lives, and a Ray without a dashboard is answered by another one on this machine (the
    other xdist worker's), which does not know the controller: the run's workers were
    removed mid-training."""
    import ray

    if not ray.is_initialized():
        from ovdlab.platform.cluster import init_ray

        init_ray("local", num_cpus=2, include_dashboard=True, log_to_driver=False, configure_logging=False,
                 _system_config={"worker_niceness": 0})
    yield ray
    ray.shutdown()
