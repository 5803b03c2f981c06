"""Tiny experiment configs for the train tests: a 24-image shapes world made per test
(overrides: the ``tiny_overrides`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from ovdlab.platform.config import ExperimentConfig, load_config

MakeConfig = Callable[..., ExperimentConfig]


@pytest.fixture(scope="session")
def make_tiny_cfg(tiny_overrides: list[str]) -> MakeConfig:
    """``make(work_dir, overrides) -> ExperimentConfig``: the ViLD-text shapes experiment
    shrunk to seconds, in ``work_dir`` (for module-scoped fixtures)."""

    def make(work_dir: Path, overrides: list[str] | None = None) -> ExperimentConfig:
        return load_config("experiments/vild_text_shapes", [f"work_dir={work_dir}"] + tiny_overrides + list(overrides or []))

    return make


@pytest.fixture
def tiny_cfg_factory(tmp_path, make_tiny_cfg: MakeConfig):
    """``make(overrides) -> ExperimentConfig`` in this test's own work dir."""
    return lambda overrides=None: make_tiny_cfg(tmp_path / "work", overrides)
