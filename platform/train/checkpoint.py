"""Training checkpoints: a folder of torch state dicts, the resolved config and results.

Layout of one checkpoint folder (what Ray Train persists under
``<work_dir>/runs/<run name>/checkpoint_*``)::

    model.pt         {"model": state dict, "meta": {...}}        (weights_only loadable)
    trainer.pt       {"optimizer", "scheduler", "scaler", "step"} (resume only)
    config.yaml      the resolved experiment config, ``work_dir`` made absolute
    results_val.json COCO results of the in-loop evaluation at this step (when evaluated)

Everything is loaded with ``torch.load(..., weights_only=True)`` (:func:`load_weights`):
a checkpoint holds tensors and plain containers only, never pickled code, and a file
that holds anything else is refused with :class:`CheckpointError`. The config travels
inside the checkpoint so that prediction and re-evaluation need only the checkpoint
path, given as the folder or as its ``model.pt`` (:func:`resolve_checkpoint`).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ovdlab.platform.config import ExperimentConfig, MethodConfig, ModelConfig, build_config, dump_yaml

MODEL_FILE = "model.pt"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results_val.json"
METRICS_FILE = "metrics.json"


class CheckpointError(ValueError):
    """A file that is not a valid ovdlab checkpoint; the message names the file and why."""


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


def resolve_checkpoint(path: str | Path, what: str = "checkpoint") -> Path:
    """The weights file of a checkpoint given as its folder or as that file itself.

    Training writes folders and ``ovdlab predict`` reads them, while a state dict made
    elsewhere (``proposals.checkpoint``) is a lone file; every reader resolves through
    here so that both spellings work everywhere. ``what`` names the setting in errors.
    """
    path = Path(path).expanduser()
    expected = (
        f"expected an ovdlab checkpoint folder (holding {MODEL_FILE} and {CONFIG_FILE}) "
        f"or a weights file such as its {MODEL_FILE}"
    )
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{what} {path} is a folder without {MODEL_FILE}; {expected}")
        return path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; {expected}")
    return path


def load_weights(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, failing with :class:`CheckpointError`.

    torch reports a refused object, and a damaged file, with many exception types
    (UnpicklingError, RuntimeError, KeyError, EOFError, ...) and texts that suggest
    ``weights_only=False``, which would run whatever code the file carries; the error
    here names the file and what is wrong with it instead.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is not a valid ovdlab checkpoint: it contains non-tensor objects (pickled classes or "
            f"code) or is no torch file at all; checkpoints are loaded as tensors and plain containers only"
        ) from err
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for damaged files
        detail = (str(err).splitlines() or [""])[0]
        raise CheckpointError(
            f"{path} is not a valid ovdlab checkpoint: it cannot be read as a torch file (damaged, truncated "
            f"or another format; {type(err).__name__}: {detail})"
        ) from err


def _state_dict(blob: Any, path: Path) -> dict[str, torch.Tensor]:
    """The ``model`` entry of a loaded ``model.pt``, checked to map names to tensors."""
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        raise CheckpointError(f"{path} is not a valid ovdlab checkpoint: no 'model' state dict entry")
    bad = [key for key, value in blob["model"].items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a valid ovdlab checkpoint: 'model' has non-tensor entries {bad[:5]}")
    return blob["model"]


def load_model_checkpoint(path: str | Path, cfg: ExperimentConfig | None = None) -> ModelCheckpoint:
    """Config (the stored one unless ``cfg`` is given), model weights and metadata.

    ``path`` is the checkpoint folder or its ``model.pt``.
    """
    model_file = resolve_checkpoint(path)
    directory = model_file.parent
    blob = load_weights(model_file)
    state_dict = _state_dict(blob, model_file)
    meta = blob.get("meta") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{model_file} is not a valid ovdlab checkpoint: 'meta' is not a dict")
    if cfg is None:
        raw = yaml.safe_load(_require(directory / CONFIG_FILE, "checkpoint config").read_text())
        cfg = build_config(raw)
    return ModelCheckpoint(path=directory, cfg=cfg, state_dict=state_dict, meta=dict(meta))


def trained_with(path: str | Path, cfg: ExperimentConfig) -> tuple[ModelConfig, MethodConfig]:
    """The model and method configs the checkpoint at ``path`` was trained with (its stored
    config), or ``cfg``'s for a bare state-dict file: a proposal detector is rebuilt as it
    was trained, whatever detector the job reading its proposals uses (CLIFF's C4 reads
    the RPN of ViLD-text's FPN)."""
    stored = resolve_checkpoint(path, what="proposals.checkpoint").parent / CONFIG_FILE
    if not stored.is_file():
        return cfg.model, cfg.method
    trained = build_config(yaml.safe_load(stored.read_text()))
    return trained.model, trained.method


def load_init_weights(model: nn.Module, path: str | Path, cfg: ExperimentConfig) -> ModelCheckpoint:
    """Load the model weights of ``train.init_from`` (a checkpoint folder or a weights file).

    Only the weights: the new phase starts its step, optimizer and schedule afresh. The
    state dict must fit ``model`` exactly; a phase whose model differs (another head,
    another width) fails here, naming the keys, rather than training half-initialised.
    """
    ckpt = load_model_checkpoint(resolve_checkpoint(path, what="train.init_from"), cfg=cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in ckpt.state_dict]
    unexpected = [k for k in ckpt.state_dict if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in ckpt.state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"train.init_from={path}: its weights do not fit this phase's model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shapes (checkpoint != model) {shapes[:5]}"
        )
    model.load_state_dict(ckpt.state_dict)
    return ckpt


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    """Optimizer, scheduler, grad-scaler state and the step a resumed loop continues from."""
    return load_weights(_require(Path(directory) / TRAINER_FILE, "trainer state"))


def load_results(directory: str | Path) -> list[dict[str, Any]] | None:
    """The COCO results stored with an evaluated checkpoint, or None."""
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
