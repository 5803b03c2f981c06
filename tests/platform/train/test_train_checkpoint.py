"""Checkpoint files: folder or model.pt paths, and clear refusals of unloadable or malicious files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.train.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TRAINER_FILE,
    CheckpointError,
    load_model_checkpoint,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)


class _Payload:
    """Pickles as a call to ``os.system``: what a malicious checkpoint carries."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    cfg = ExperimentConfig(work_dir=str(tmp_path / "work"))
    return save_checkpoint(
        tmp_path / "checkpoint_000010", cfg, {"w": torch.ones(2)}, {"step": 10}, trainer_state={"step": 10}
    )


def test_checkpoint_is_the_folder_or_its_model_file(folder: Path) -> None:
    assert resolve_checkpoint(folder) == folder / MODEL_FILE
    assert resolve_checkpoint(folder / MODEL_FILE) == folder / MODEL_FILE
    for given in (folder, folder / MODEL_FILE):
        ckpt = load_model_checkpoint(given)
        assert ckpt.path == folder and ckpt.meta == {"step": 10}
        assert torch.equal(ckpt.state_dict["w"], torch.ones(2))


def test_missing_checkpoint_says_what_was_expected(tmp_path: Path, folder: Path) -> None:
    expected = f"expected an ovdlab checkpoint folder \\(holding {MODEL_FILE} and {CONFIG_FILE}\\)"
    with pytest.raises(FileNotFoundError, match=f"proposals.checkpoint {tmp_path / 'nope'} does not exist; {expected}"):
        resolve_checkpoint(tmp_path / "nope", "proposals.checkpoint")
    (folder / MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"checkpoint {folder} is a folder without {MODEL_FILE}; {expected}"):
        load_model_checkpoint(folder)


def test_malicious_checkpoint_is_refused_naming_the_file(folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    torch.save({"model": _Payload(), "meta": {}}, folder / MODEL_FILE)
    with pytest.raises(CheckpointError, match=f"{folder / MODEL_FILE} is not a valid ovdlab checkpoint: .*non-tensor"):
        load_model_checkpoint(folder)
    torch.save({"step": _Payload()}, folder / TRAINER_FILE)
    with pytest.raises(CheckpointError, match=f"{folder / TRAINER_FILE} is not a valid ovdlab checkpoint"):
        load_trainer_state(folder)
    assert "pwned" not in capfd.readouterr().out


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "cannot be read as a torch file"),
        (b"hello, not a torch file", "cannot be read as a torch file"),
        ("truncated", "cannot be read as a torch file"),
        ({"model": {"w": "a string"}}, r"'model' has non-tensor entries \['w'\]"),
        ({"weights": {"w": torch.ones(1)}}, "no 'model' state dict entry"),
        ({"model": {"w": torch.ones(1)}, "meta": [1]}, "'meta' is not a dict"),
    ],
)
def test_unloadable_checkpoint_is_a_clear_error(folder: Path, content: object, match: str) -> None:
    path = folder / MODEL_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is not a valid ovdlab checkpoint.*{match}"):
        load_model_checkpoint(folder)
