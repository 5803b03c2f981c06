"""A tiny shapes world and its pretrained teacher, made once and shared by the train tests.

The world and the ``shapes-tiny`` teacher are content-keyed, so they live in pytest's
cache folder (or a session temp folder without it) and are reused by every test and
every later session; each test gets its own ``work_dir`` whose ``teachers`` folder links
to the shared one, so runs, checkpoints and MLflow stores never mix.
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


@pytest.fixture(scope="session")
def shared_shapes(request, tmp_path_factory) -> Path:
    """Folder holding the tiny world (``data/shapes``) and ``teachers/``, made once."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("ovdlab-tiny-shapes")) if cache is not None else tmp_path_factory.mktemp("tiny-shapes")
    (root / "teachers").mkdir(exist_ok=True)
    cfg = tiny_config(root, [])
    from ovdlab.platform.teacher.shapes_teacher import ensure_shapes_teacher

    ensure_shapes_teacher(cfg)
    return root


def tiny_config(work_dir: Path, overrides: list[str], shared: Path | None = None) -> ExperimentConfig:
    """The ViLD-text shapes experiment shrunk to seconds, in ``work_dir``."""
    data_root = (shared or work_dir) / "data" / "shapes"
    return load_config(
        "experiments/vild_text_shapes",
        [f"work_dir={work_dir}", f"dataset.root={data_root}"] + TINY + list(overrides),
    )


@pytest.fixture(scope="session")
def make_tiny_cfg(shared_shapes):
    """``make(work_dir, overrides) -> ExperimentConfig`` sharing the world and the teacher."""

    def make(work_dir: Path, overrides: list[str] | None = None) -> ExperimentConfig:
        work_dir.mkdir(parents=True, exist_ok=True)
        teachers = work_dir / "teachers"
        if not teachers.exists():
            teachers.symlink_to(shared_shapes / "teachers", target_is_directory=True)
        return tiny_config(work_dir, overrides or [], shared_shapes)

    return make


@pytest.fixture
def tiny_cfg_factory(make_tiny_cfg, tmp_path):
    """``make(overrides) -> ExperimentConfig`` in this test's own work dir."""
    return lambda overrides=None: make_tiny_cfg(tmp_path / "work", overrides)
