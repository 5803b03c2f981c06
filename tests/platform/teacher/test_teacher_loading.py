"""Teacher loading: random init, hub offline error, local file/folder round trips, cached checkpoints."""

from __future__ import annotations

import json
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ovdlab.platform.config import TeacherConfig
from ovdlab.platform.teacher.loading import (
    TINY_CONFIG,
    TINY_MODEL,
    TeacherWeightsError,
    load_teacher,
    register_tiny_config,
    state_digest,
    write_checkpoint,
)

TEXTS = ["a photo of a red circle", "a blue star"]


def _other_tiny_model(seed: int = 1):
    """A ``shapes-tiny`` with weights unlike the seed-0 random init."""
    register_tiny_config()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_MODEL)


def _crops(teacher, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, teacher.image_size, teacher.image_size, generator=torch.Generator().manual_seed(0))


def test_random_tiny_teacher_is_frozen_and_deterministic(tiny_teacher, tmp_path):
    again = load_teacher(TeacherConfig(model=TINY_MODEL, pretrained="random"), tmp_path)
    assert tiny_teacher.teacher_id == "shapes-tiny/random"
    assert again.digest == tiny_teacher.digest and len(tiny_teacher.digest) == 16
    assert tiny_teacher.image_size == TINY_CONFIG["vision_cfg"]["image_size"]
    assert tiny_teacher.embed_dim == TINY_CONFIG["embed_dim"]
    assert not tiny_teacher.model.training
    assert not any(p.requires_grad for p in tiny_teacher.model.parameters())
    text = tiny_teacher.encode_text(TEXTS)
    assert text.shape == (2, tiny_teacher.embed_dim) and text.dtype == torch.float32
    assert torch.allclose(text.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(text, again.encode_text(TEXTS))
    emb = tiny_teacher.encode_crops(_crops(tiny_teacher))
    assert emb.shape == (3, tiny_teacher.embed_dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_encode_crops_rejects_wrong_size(tiny_teacher):
    with pytest.raises(ValueError, match="crops must be"):
        tiny_teacher.encode_crops(torch.zeros(1, 3, 7, 7))


def test_hub_model_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    start = time.time()
    with pytest.raises(TeacherWeightsError) as err:
        load_teacher(TeacherConfig(model="ViT-B-32", pretrained="openai"), tmp_path)
    assert time.time() - start < 10
    msg = str(err.value)
    assert "no local weights for ViT-B-32 (pretrained=openai)" in msg
    assert "hub is unreachable" in msg and "teacher.weights=" in msg


def test_hub_model_needs_pretrained_or_weights(tmp_path):
    with pytest.raises(TeacherWeightsError, match="pretrained=random"):
        load_teacher(TeacherConfig(model="ViT-B-32"), tmp_path)


def test_unknown_tag_and_unknown_architecture(tmp_path):
    with pytest.raises(TeacherWeightsError, match="known tags"):
        load_teacher(TeacherConfig(model="ViT-B-32", pretrained="no-such-tag"), tmp_path)
    with pytest.raises(TeacherWeightsError, match="not an open_clip architecture"):
        load_teacher(TeacherConfig(model="NoSuchNet", pretrained="random"), tmp_path)
    with pytest.raises(TeacherWeightsError, match="no pretrained tags"):
        load_teacher(TeacherConfig(model=TINY_MODEL, pretrained="openai"), tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_round_trip(tmp_path, suffix):
    model = _other_tiny_model().eval()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    teacher = load_teacher(TeacherConfig(model=TINY_MODEL, weights=str(path)), tmp_path)
    assert teacher.digest == state_digest(model)
    assert teacher.teacher_id == "shapes-tiny/weights"
    tokens = teacher.tokenizer(TEXTS)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(teacher.encode_text(TEXTS), want, atol=1e-6)
    random_init = load_teacher(TeacherConfig(model=TINY_MODEL, pretrained="random"), tmp_path)
    assert random_init.digest != teacher.digest


def test_local_model_folder(tmp_path):
    model = _other_tiny_model(seed=2)
    folder = tmp_path / "my-clip"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    teacher = load_teacher(TeacherConfig(model="my-clip", weights=str(folder)), tmp_path)
    assert teacher.digest == state_digest(model)
    assert teacher.arch == f"local-dir:{folder.resolve()}"
    assert teacher.encode_text(TEXTS).shape == (2, TINY_CONFIG["embed_dim"])


def test_missing_weights_path_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(TeacherWeightsError, match="nope.pt"):
        load_teacher(TeacherConfig(model=TINY_MODEL, weights=str(missing)), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherWeightsError, match="open_clip_config.json"):
        load_teacher(TeacherConfig(model="ViT-B-32", weights=str(tmp_path / "empty")), tmp_path)


def test_shapes_tiny_needs_its_pretraining_checkpoint(tmp_path):
    with pytest.raises(TeacherWeightsError, match="ensure_shapes_teacher"):
        load_teacher(TeacherConfig(model=TINY_MODEL), tmp_path)


def test_shapes_tiny_checkpoint_is_found_in_work_dir(tmp_path):
    model = _other_tiny_model(seed=3)
    teachers = tmp_path / "teachers"
    write_checkpoint(model, teachers / "shapes-tiny-0123456789ab.pt", {"model_cfg": TINY_CONFIG})
    # One made for another architecture (an older TINY_CONFIG) is not picked up.
    stale = {**TINY_CONFIG, "embed_dim": 32}
    write_checkpoint(_other_tiny_model(seed=5), teachers / "shapes-tiny-ba9876543210.pt", {"model_cfg": stale})
    # An LN-tuned copy next to it must not be taken for the pretrained checkpoint.
    write_checkpoint(_other_tiny_model(seed=4), teachers / "shapes-tiny-ln-0123456789ab.pt", {"kind": "ln-tuned"})
    teacher = load_teacher(TeacherConfig(model=TINY_MODEL), tmp_path)
    assert teacher.teacher_id == TINY_MODEL
    assert teacher.digest == state_digest(model)
    chosen = teachers / "shapes-tiny-0123456789ab.pt"
    explicit = load_teacher(TeacherConfig(model=TINY_MODEL), tmp_path, checkpoint=chosen)
    assert explicit.digest == teacher.digest


def test_real_size_random_architecture(tmp_path):
    """``pretrained=random`` builds any open_clip architecture, seeded: for benchmarks without weights.

    ViT-S-32-alt stands in for ViT-B-32 (same code path, a quarter of the build time);
    seeded determinism is checked on shapes-tiny above.
    """
    a = load_teacher(TeacherConfig(model="ViT-S-32-alt", pretrained="random", batch_size=4), tmp_path)
    assert a.teacher_id == "ViT-S-32-alt/random" and a.image_size == 224 and a.embed_dim == 256
    assert a.encode_crops(torch.zeros(1, 3, 224, 224)).shape == (1, 256)
