"""LayerNorm-only tuning (EZSD stage 1): what trains, what is saved, how it loads."""

from __future__ import annotations

import json

import pytest
import torch

from ovdlab.platform.config import TeacherConfig
from ovdlab.platform.data.catalog import OVDDataset
from ovdlab.platform.teacher.ln_tuning import ln_checkpoint_path, ln_parameters, tune_layernorm
from ovdlab.platform.teacher.loading import TeacherWeightsError, load_teacher, read_sidecar, state_digest

RANDOM_TINY = TeacherConfig(model="shapes-tiny", pretrained="random")


@pytest.fixture()
def train_set(small_world) -> OVDDataset:
    return OVDDataset(small_world / "annotations" / "train.json", small_world / "images" / "train")


def test_ln_parameters_are_exactly_the_ln_named_ones(tiny_teacher):
    names = {n for n, _ in ln_parameters(tiny_teacher.model)}
    assert names == {n for n, _ in tiny_teacher.model.named_parameters() if "ln_" in n}
    assert {"visual.ln_pre.weight", "visual.ln_post.bias", "ln_final.weight"} <= names
    assert "visual.transformer.resblocks.0.ln_1.weight" in names
    assert "transformer.resblocks.0.ln_2.bias" in names


def test_tuning_changes_only_layernorms_and_reloads(tiny_teacher, train_set, tmp_path):
    base_state = {k: v.clone() for k, v in tiny_teacher.model.state_dict().items()}
    base_digest = tiny_teacher.digest
    out = ln_checkpoint_path(tiny_teacher, train_set, tmp_path, epochs=1, batch_size=16)
    assert out.name.startswith("shapes-tiny-random-ln-")
    path = tune_layernorm(tiny_teacher, train_set, out, epochs=1, batch_size=16)

    assert state_digest(tiny_teacher.model) == base_digest  # the caller's teacher is untouched
    tuned = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    changed = {k for k in base_state if not torch.equal(base_state[k], tuned[k])}
    ln_names = {n for n, _ in ln_parameters(tiny_teacher.model)}
    assert changed and changed <= ln_names
    assert any(k.startswith("visual.") for k in changed)
    assert any(not k.startswith("visual.") for k in changed)

    meta = read_sidecar(path)
    assert meta["base_digest"] == base_digest and meta["steps"] >= 1
    teacher = load_teacher(RANDOM_TINY.model_copy(update={"ln_tuned": True}), tmp_path)
    assert teacher.teacher_id == "shapes-tiny/random+ln"
    assert teacher.digest == meta["digest"] != base_digest
    crops = torch.randn(2, 3, teacher.image_size, teacher.image_size)
    assert not torch.allclose(teacher.encode_crops(crops), tiny_teacher.encode_crops(crops))


def test_tuned_checkpoint_must_match_its_base(tiny_teacher, train_set, tmp_path):
    with pytest.raises(TeacherWeightsError, match="tune_layernorm"):
        load_teacher(RANDOM_TINY.model_copy(update={"ln_tuned": True}), tmp_path)
    path = tune_layernorm(tiny_teacher, train_set, tmp_path / "tuned.pt", epochs=1, batch_size=64)
    other = tmp_path / "other.pt"
    state = {k: v + 0.01 for k, v in tiny_teacher.model.state_dict().items()}
    torch.save(state, other)
    cfg = TeacherConfig(model="shapes-tiny", weights=str(other), ln_tuned=True)
    with pytest.raises(TeacherWeightsError, match="was tuned from weights"):
        load_teacher(cfg, tmp_path, checkpoint=path)


def test_dataset_without_base_categories_is_an_error(tiny_teacher, small_world, tmp_path):
    coco = json.loads((small_world / "annotations" / "val.json").read_text())
    for cat in coco["categories"]:
        cat["split"] = "novel"
    ann = tmp_path / "all_novel.json"
    ann.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="no base categories"):
        tune_layernorm(tiny_teacher, OVDDataset(ann, small_world / "images" / "val"), tmp_path / "x.pt", epochs=1)


def test_an_experiment_tunes_its_teacher_once_and_measures_crop_accuracy(tmp_path, tiny_overrides):
    """EZSD stage 1 for a config: tuned on the training split, keyed, reused by a second call,
    loaded by ``teacher.ln_tuned``; accuracies before and after for base and novel classes."""
    from ovdlab.platform.config import load_config
    from ovdlab.platform.teacher.ln_tuning import ensure_ln_tuned

    cfg = load_config("experiments/ezsd_shapes", [f"work_dir={tmp_path}", *tiny_overrides])
    path, metrics = ensure_ln_tuned(cfg)
    assert path.is_file() and path.parent == tmp_path / "teachers" and read_sidecar(path)["kind"] == "ln-tuned"
    for when in ("before", "after"):
        for kind in ("base", "novel", "novel_concept"):
            assert 0.0 <= metrics[f"teacher/acc_{kind}_{when}"] <= 1.0
    stamp = path.stat().st_mtime_ns
    again, metrics_again = ensure_ln_tuned(cfg)
    assert again == path and path.stat().st_mtime_ns == stamp and metrics_again == metrics
    assert len(list(path.parent.glob(f"{path.stem}-accuracy-*.json"))) == 1  # measured once, then read
    assert load_teacher(cfg.teacher, tmp_path).digest == read_sidecar(path)["digest"]
