"""Recipes: stages checked before work, content keys shared across recipes, one runner that
skips finished stages, chains phases through their outputs and tracks a parent run per job."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from ovdlab.methods.registry import build_method
from ovdlab.platform.config import load_config
from ovdlab.platform.recipes.runner import run_recipe, stage_config, stage_key
from ovdlab.platform.recipes.stages import Stage, check_recipe
from ovdlab.platform.tracking import tracker_from_config
from ovdlab.platform.train.checkpoint import load_model_checkpoint


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "at least one stage"),
        ([Stage("a", "train"), Stage("a", "train")], "appears twice"),
        ([Stage("a", "train", reads={"train.init_from": "b"}), Stage("b", "train")], "not an earlier stage"),
        ([Stage("a", "train"), Stage("p", "post")], "needs function"),
        ([Stage("a", "train", function="m:f")], "only post stages"),
        ([Stage("a", "cook")], "unknown kind"),  # type: ignore[arg-type]
        ([Stage("e", "eval"), Stage("a", "train")], "needs an earlier train stage"),
        ([Stage("t", "teacher"), Stage("x", "extract")], "needs a train stage"),
        ([Stage("p", "post", function="m:f")], "needs a train stage"),
    ],
)
def test_bad_recipes_fail_before_any_work(stages, message):
    with pytest.raises(ValueError, match=message):
        check_recipe(stages)


def test_vild_trains_its_proposal_detector_as_the_vild_text_run_of_the_same_seed():
    overrides = ["seed=1"]
    vild = load_config("experiments/vild_shapes", overrides)
    stages = build_method(vild.method).recipe(vild)
    assert [(s.name, s.kind) for s in stages] == [("proposal-detector", "train"), ("store", "extract"), ("train", "train")]
    assert stages[1].reads == stages[2].reads == {"proposals.checkpoint": "proposal-detector"}
    text_stage = build_method(load_config("experiments/vild_text_shapes").method).recipe(vild)[0]
    key = stage_key(stages[0], stage_config(stages[0], "experiments/vild_shapes", overrides), {})
    assert key == stage_key(text_stage, stage_config(text_stage, "experiments/vild_text_shapes", overrides), {})
    # The distilling stage's key follows its input's: another proposal detector, another key.
    unbound = stage_config(stages[2], "experiments/vild_shapes", overrides)
    assert stage_key(stages[2], unbound, {"proposal-detector": key}) != stage_key(stages[2], unbound, {"proposal-detector": "x"})
    bound = stage_config(stages[2], "experiments/vild_shapes", overrides, {"proposal-detector": "/ckpt/rpn"})
    assert bound.proposals.checkpoint == "/ckpt/rpn" and bound.seed == 1
    # A config that names its proposals is one training.
    named = load_config("experiments/vild_shapes", ["proposals.checkpoint=/ckpt/rpn"])
    assert [s.name for s in build_method(named.method).recipe(named)] == ["store", "train"]
    text = load_config("experiments/vild_text_shapes")
    assert [s.name for s in build_method(text.method).recipe(text)] == ["train"]  # nothing to distill, no store


@pytest.fixture
def notes_module(monkeypatch):
    """A post-stage function, importable by name as recipes load them."""
    module = types.ModuleType("recipe_test_steps")

    def write_note(cfg, out_dir: Path) -> Path:
        note = out_dir / "note.txt"
        note.write_text(f"{cfg.train.init_from}\n")
        module.calls.append(str(cfg.train.init_from))
        return note

    module.write_note = write_note
    module.calls = []
    monkeypatch.setitem(sys.modules, "recipe_test_steps", module)
    return module


@pytest.mark.slow
def test_runner_chains_skips_and_tracks(tmp_path, tiny_overrides, ray_local, notes_module):
    overrides = [f"work_dir={tmp_path / 'work'}", *tiny_overrides, "model.backbone_weights=null",
                 "train.max_iter=2", "train.checkpoint_period=2"]
    stages = [
        Stage("teacher", "teacher"),
        Stage("base", "train"),
        Stage("note", "post", function="recipe_test_steps:write_note", reads={"train.init_from": "base"}),
        Stage("probe", "train", overrides=("train.freeze=[backbone,rpn]", "train.lr=0.001"),
              reads={"train.init_from": "base"}),
        Stage("eval-thresh", "eval", overrides=("eval.score_thresh=0.5",)),
    ]
    first = run_recipe("experiments/vild_text_shapes", overrides, stages)
    teacher, base, note, probe, evaluation = first.stages
    assert [s.skipped for s in first.stages] == [False] * 5
    assert json.loads(Path(teacher.output).read_text())["teacher_id"].startswith("shapes-tiny")
    assert Path(note.output).read_text().strip() == base.output == notes_module.calls[0]
    assert first.final is probe and first.checkpoint == Path(probe.output)
    # The eval stage scored the probe's checkpoint under its own settings: its metrics are the job's.
    assert evaluation.output == probe.output and first.metrics is evaluation.metrics
    assert evaluation.metrics["ap50_all"] <= probe.metrics["ap50_all"] + 1e-9
    # The probe started from the base phase and kept the frozen parts.
    before, after = load_model_checkpoint(base.output).state_dict, load_model_checkpoint(probe.output).state_dict
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("backbone.", "rpn.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("roi_heads."))

    tracker = tracker_from_config(load_config("experiments/vild_text_shapes", overrides))
    runs = tracker.client.search_runs([tracker.experiment_id])
    children = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == first.parent_run_id}
    assert children == {teacher.mlflow_run_id, base.mlflow_run_id, note.mlflow_run_id, probe.mlflow_run_id,
                        evaluation.mlflow_run_id}
    parent = tracker.client.get_run(first.parent_run_id)
    assert parent.data.metrics["ap50_novel"] == pytest.approx(first.metrics["ap50_novel"])

    # Again: every stage reused, the same parent run, no new MLflow run.
    again = run_recipe("experiments/vild_text_shapes", overrides, stages)
    assert [s.skipped for s in again.stages] == [True] * 5 and len(notes_module.calls) == 1
    assert again.parent_run_id == first.parent_run_id and again.checkpoint == first.checkpoint
    assert [s.seconds for s in again.stages] == [s.seconds for s in first.stages]  # what they took when they ran
    assert len(tracker.client.search_runs([tracker.experiment_id])) == len(runs)

    # A stage whose input changed runs again; the stages before it are reused.
    changed = [*stages[:3], Stage("probe", "train", overrides=("train.freeze=[backbone]",),
                                  reads={"train.init_from": "base"}), stages[4]]
    third = run_recipe("experiments/vild_text_shapes", overrides, changed)
    assert [s.skipped for s in third.stages] == [True, True, True, False, False]  # the eval follows its training
