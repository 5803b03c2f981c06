"""Training checkpoints: a folder of torch state dicts, the resolved config and results.

Layout of one checkpoint folder (what Ray Train persists under
``<work_dir>/runs/<run name>/checkpoint_*``)::

    model.pt         {"model": state dict, "meta": {...}}        (weights_only loadable)
    trainer.pt       {"optimizer", "scheduler", "scaler", "step"} (resume only)
    config.yaml      the resolved experiment config, ``work_dir`` made absolute
    results_val.json COCO results of the in-loop evaluation at this step (when evaluated)

Everything is loaded with ``torch.load(..., weights_only=True)``: a checkpoint holds
tensors and plain containers only, never pickled code. The config travels inside the
checkpoint so that prediction and re-evaluation need only the checkpoint path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ovdlab.platform.config import ExperimentConfig, build_config, dump_yaml

MODEL_FILE = "model.pt"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results_val.json"
METRICS_FILE = "metrics.json"


def portable_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with ``work_dir`` absolute, so a checkpoint read from elsewhere finds its files."""
    return cfg.model_copy(update={"work_dir": str(cfg.work_path())})


@dataclass
class ModelCheckpoint:
    """What prediction needs from a checkpoint: config, weights and their metadata.

    ``meta`` holds ``step``, ``embed_dim``, ``teacher_id`` and the training and
    evaluation vocabularies (``train_classes`` / ``eval_classes``: names in text-bank
    row order).
    """

    path: Path
    cfg: ExperimentConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]


def save_checkpoint(
    directory: Path,
    cfg: ExperimentConfig,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
    results: list[dict[str, Any]] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write a checkpoint folder (see module doc); returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model_state, "meta": meta}, directory / MODEL_FILE)
    if trainer_state is not None:
        torch.save(trainer_state, directory / TRAINER_FILE)
    (directory / CONFIG_FILE).write_text(dump_yaml(portable_config(cfg)))
    if results is not None:
        (directory / RESULTS_FILE).write_text(json.dumps(results))
    if metrics is not None:
        (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    return directory


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (is {path.parent} an ovdlab training checkpoint?)")
    return path


def load_model_checkpoint(directory: str | Path, cfg: ExperimentConfig | None = None) -> ModelCheckpoint:
    """Config (the stored one unless ``cfg`` is given), model weights and metadata."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {directory}")
    blob = torch.load(_require(directory / MODEL_FILE, "checkpoint weights"), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "model" not in blob:
        raise ValueError(f"{directory / MODEL_FILE} is not an ovdlab model checkpoint (no 'model' entry)")
    if cfg is None:
        raw = yaml.safe_load(_require(directory / CONFIG_FILE, "checkpoint config").read_text())
        cfg = build_config(raw)
    return ModelCheckpoint(path=directory, cfg=cfg, state_dict=blob["model"], meta=dict(blob.get("meta") or {}))


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    """Optimizer, scheduler, grad-scaler state and the step a resumed loop continues from."""
    path = _require(Path(directory) / TRAINER_FILE, "trainer state")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_results(directory: str | Path) -> list[dict[str, Any]] | None:
    """The COCO results stored with an evaluated checkpoint, or None."""
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
