"""Teacher fixtures: a random-init ``shapes-tiny`` teacher, small shapes worlds, a pretrained teacher.

``pretrained_shapes_teacher`` (session scope, a few minutes on 2 cores) trains the real
``shapes-tiny`` teacher once per session on ``shapes_world``; any test under this folder
may reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """``shapes-tiny`` with seeded random weights (no pretraining, fast)."""
    from ovdlab.platform.config import TeacherConfig
    from ovdlab.platform.teacher.loading import load_teacher

    cfg = TeacherConfig(model="shapes-tiny", pretrained="random", batch_size=64)
    return load_teacher(cfg, tmp_path_factory.mktemp("wd"))


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A few images of the shapes world (LN-tuning and region tests)."""
    from ovdlab.platform.config import ShapesConfig
    from ovdlab.platform.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("small_world"), ShapesConfig(train_images=8, val_images=4))


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory) -> Path:
    """The default shapes world (800 train / 200 val images), the one the shapes demo uses."""
    from ovdlab.platform.config import ShapesConfig
    from ovdlab.platform.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes_world"), ShapesConfig())


@pytest.fixture(scope="session")
def pretrained_shapes_teacher(shapes_world, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, result) of pretraining ``shapes-tiny`` on ``shapes_world`` once per session,
    with the schedule :func:`ensure_shapes_teacher` uses (``PRETRAIN_DEFAULTS``)."""
    from ovdlab.platform.teacher.shapes_teacher import pretrain_shapes_teacher

    out = tmp_path_factory.mktemp("teacher_wd") / "teachers" / "shapes-tiny-0123456789ab.pt"
    return out, pretrain_shapes_teacher(shapes_world, out)
