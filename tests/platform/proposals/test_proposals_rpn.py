"""Detector RPN proposals from a checkpoint: boxes in original pixels, objectness, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovdlab.methods.registry import build_method
from ovdlab.platform.config import ViLDConfig, ModelConfig
from ovdlab.platform.detector.model import build_detector
from ovdlab.platform.proposals import RPNProposalSource

MODEL = ModelConfig(backbone="resnet18", neck="fpn", fpn_channels=16, min_size=64, max_size=96, rpn_post_nms_top_n=50)
METHOD = ViLDConfig(temperature=0.01, name="vild-text")
EMBED_DIM = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_detector(MODEL, build_method(METHOD), EMBED_DIM)
    path = tmp_path_factory.mktemp("rpn") / "detector.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_rpn_boxes_map_back_to_original_pixels(checkpoint):
    path, model = checkpoint
    source = RPNProposalSource(path, MODEL, METHOD, EMBED_DIM, per_image=20)
    image = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)  # resized to 58x96
    p = source.propose(image, 1, [])
    assert 0 < len(p) <= 20 and p.extras == {}
    assert (p.boxes[:, 0] >= 0).all() and (p.boxes[:, 2] <= 200).all() and (p.boxes[:, 3] <= 120).all()
    assert (p.boxes[:, 2] > p.boxes[:, 0]).all() and (p.boxes[:, 3] > p.boxes[:, 1]).all()
    assert np.all(np.diff(p.scores) <= 0) and (p.scores >= 0).all() and (p.scores <= 1).all()
    # Same boxes as the detector on the resized image, scaled by 200/96 and 120/58.
    from ovdlab.platform.detector.transforms import resize

    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    resized, _, (sx, sy) = resize(tensor, {}, MODEL.min_size, MODEL.max_size)
    boxes, scores = model.eval().proposals_only([resized])[0]
    np.testing.assert_allclose(p.boxes[0], (boxes[0] / torch.tensor([sx, sy, sx, sy])).numpy(), rtol=1e-5, atol=1e-3)
    assert source.fingerprint()["checkpoint_digest"] == source.digest


def test_rpn_checkpoint_errors(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RPNProposalSource(tmp_path / "missing.pt", MODEL, METHOD, EMBED_DIM, per_image=5)
    path = tmp_path / "other.pt"
    torch.save({"head.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no backbone"):
        RPNProposalSource(path, MODEL, METHOD, EMBED_DIM, per_image=5).propose(np.zeros((64, 64, 3), np.uint8), 1, [])
    wide = MODEL.model_copy(update={"fpn_channels": 32})
    with pytest.raises(ValueError, match="does not fit the model config"):
        RPNProposalSource(checkpoint[0], wide, METHOD, EMBED_DIM, per_image=5).propose(np.zeros((64, 64, 3), np.uint8), 1, [])


def test_rpn_checkpoint_may_be_a_training_checkpoint_folder(tmp_path, checkpoint):
    path, model = checkpoint
    folder = tmp_path / "checkpoint_000100"
    folder.mkdir()
    torch.save({"model": model.state_dict(), "meta": {}}, folder / "model.pt")
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    from_folder = RPNProposalSource(folder, MODEL, METHOD, EMBED_DIM, per_image=5)
    assert from_folder.checkpoint == (folder / "model.pt").resolve()
    from_file = RPNProposalSource(path, MODEL, METHOD, EMBED_DIM, per_image=5)
    np.testing.assert_array_equal(from_folder.propose(image, 1, []).boxes, from_file.propose(image, 1, []).boxes)
    (folder / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=f"proposals.checkpoint {folder} is a folder without model.pt"):
        RPNProposalSource(folder, MODEL, METHOD, EMBED_DIM, per_image=5)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_rpn_refuses_a_malicious_checkpoint(tmp_path):
    from ovdlab.platform.train.checkpoint import CheckpointError

    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, path)
    source = RPNProposalSource(path, MODEL, METHOD, EMBED_DIM, per_image=5)
    with pytest.raises(CheckpointError, match=f"{path} is not a valid ovdlab checkpoint: .*non-tensor"):
        source.propose(np.zeros((64, 64, 3), np.uint8), 1, [])


def test_a_proposal_detector_is_rebuilt_as_it_was_trained(tmp_path, checkpoint):
    """CLIFF (C4) reads the RPN of ViLD-text's FPN training: the proposer takes the model
    config stored with the checkpoint, not the reading job's (a bare state dict: the job's)."""
    from ovdlab.platform.config import ExperimentConfig
    from ovdlab.platform.proposals import build_proposal_source
    from ovdlab.platform.train.checkpoint import save_checkpoint, trained_with

    path, model = checkpoint
    trained = ExperimentConfig(model=MODEL, method=METHOD, work_dir=str(tmp_path))
    folder = save_checkpoint(tmp_path / "checkpoint_000004", trained, model.state_dict(), {})
    reader = ExperimentConfig.model_validate({
        "work_dir": str(tmp_path), "model": {**MODEL.model_dump(), "neck": "c4"}, "method": {"name": "cliff"},
        "proposals": {"source": "rpn", "checkpoint": str(folder), "per_image": 5},
    })
    assert trained_with(folder, reader) == (MODEL, METHOD)
    assert trained_with(path, reader) == (reader.model, reader.method)
    source = build_proposal_source(reader, None, embed_dim=EMBED_DIM)
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    expected = RPNProposalSource(path, MODEL, METHOD, EMBED_DIM, per_image=5).propose(image, 1, [])
    np.testing.assert_array_equal(source.propose(image, 1, []).boxes, expected.boxes)
