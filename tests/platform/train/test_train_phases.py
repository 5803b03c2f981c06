"""Training phases: starting from an earlier checkpoint (``train.init_from``) and freezing
named parts (``train.freeze``), in-process (no Ray)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ovdlab.platform.config import ConfigError, ExperimentConfig, calibrate, load_config
from ovdlab.platform.detector.model import OVDDetector
from ovdlab.platform.train.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    load_init_weights,
    load_model_checkpoint,
    load_trainer_state,
)
from ovdlab.platform.train.freezing import PARTS, freeze
from ovdlab.platform.train.loop import (
    LocalSession,
    LoopArgs,
    LoopSummary,
    build_model,
    load_start_state,
    load_text_banks,
    run_loop,
)
from ovdlab.platform.train.schedule import build_optimizer
from ovdlab.platform.train.trainer import Prepared, check_worker_inputs, prepare_training

FROZEN = ("backbone.", "rpn.")


@dataclasses.dataclass
class World:
    """A tiny shapes world with its text banks, and a first phase's checkpoint at step 2."""

    work: Path
    prepared: Prepared
    make: Callable[..., ExperimentConfig]

    def cfg(self, overrides: list[str] | None = None) -> ExperimentConfig:
        return self.make(self.work, overrides)

    @property
    def embed_dim(self) -> int:
        return int(load_text_banks(self.prepared.text_path)["train"]["embeddings"].shape[1])

    def run(self, cfg: ExperimentConfig, storage: Path, stop_at: int | None = None) -> tuple[LoopSummary, LocalSession]:
        session = LocalSession(storage)
        args = LoopArgs(cfg=cfg.model_dump(mode="json"), text_path=str(self.prepared.text_path), stop_at=stop_at)
        return run_loop(args, session), session

    def model(self, cfg: ExperimentConfig) -> OVDDetector:
        return build_model(calibrate(cfg, load_text_banks(self.prepared.text_path)["teacher_logit_scale"]), self.embed_dim)


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_tiny_cfg) -> World:
    # A backbone trained from scratch, every layer trainable: its BatchNorm layers track
    # running statistics (pretrained weights come with FrozenBatchNorm2d), which the
    # freeze must hold too, and nothing is frozen before train.freeze acts.
    def make(work_dir: Path, overrides: list[str] | None = None) -> ExperimentConfig:
        return make_tiny_cfg(work_dir, ["model.backbone_weights=null", "model.trainable_layers=5", *(overrides or [])])

    work = tmp_path_factory.mktemp("phases") / "work"
    prepared = prepare_training(make(work), work / "banks")
    return World(work, prepared, make)


@pytest.fixture(scope="module")
def first_phase(world: World) -> Path:
    """The checkpoint after 2 plain steps (BN statistics and weights moved off their init)."""
    cfg = world.cfg(["train.max_iter=4", "train.checkpoint_period=2"])
    summary, session = world.run(cfg, world.work / "phase1", stop_at=2)
    assert summary.end_step == 2
    latest = session.latest()
    assert latest is not None
    return latest


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_model_checkpoint(path).state_dict


def test_frozen_parts_stay_bit_identical_through_training_and_evaluation(world: World, first_phase: Path):
    # Evaluation at step 2 switches the model to eval and back: the frozen BatchNorm layers
    # must be back in eval mode for steps 3 and 4, or their running statistics move.
    cfg = world.cfg([
        f"train.init_from={first_phase}", "train.freeze=[backbone,rpn]",
        "train.max_iter=4", "train.eval_period=2", "train.checkpoint_period=2",
    ])
    summary, session = world.run(cfg, world.work / "frozen")
    assert (summary.start_step, summary.end_step) == (0, 4)
    assert "ap50_novel" in session.reports[0]  # evaluated mid-phase, then trained on

    before, after = _state(first_phase), _state(session.latest())
    frozen = [k for k in before if k.startswith(FROZEN)]
    assert any(k.endswith("running_mean") for k in frozen) and any(k.endswith("num_batches_tracked") for k in frozen)
    assert [k for k in frozen if not torch.equal(before[k], after[k])] == []
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("roi_heads."))

    # The loop built its optimizer after freezing: it holds the trainable parameters only.
    model = world.model(cfg)
    freeze(model, cfg.train.freeze)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith(FROZEN) for n in trainable)
    groups = load_trainer_state(session.latest())["optimizer"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_optimizer_holds_exactly_the_trainable_parameters(world: World):
    cfg = world.cfg(["train.freeze=[backbone,rpn]"])
    model = world.model(cfg)
    norms = freeze(model, cfg.train.freeze)
    optimizer = build_optimizer(model, cfg.train)

    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    assert {p.data_ptr() for p in held}.isdisjoint(
        p.data_ptr() for n, p in model.named_parameters() if n.startswith(FROZEN)
    )
    # Every BatchNorm of this model is in the backbone (the ResNet trained from scratch).
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and norms == batch_norms


def test_everything_frozen_is_a_clear_error(world: World):
    cfg = world.cfg(["train.freeze=[backbone,rpn,roi_heads]"])
    model = world.model(cfg)
    freeze(model, cfg.train.freeze)
    with pytest.raises(ValueError, match=r"no trainable parameters: train\.freeze"):
        build_optimizer(model, cfg.train)


def test_init_from_loads_the_weights_and_the_step_starts_at_zero(world: World, first_phase: Path, tmp_path: Path):
    cfg = world.cfg([f"train.init_from={first_phase / MODEL_FILE}", "train.max_iter=4"])  # the lone file works too
    model = world.model(cfg)
    assert load_start_state(model, cfg, LocalSession(tmp_path / "empty")) is None
    expected = _state(first_phase)
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())

    summary, session = world.run(cfg, tmp_path / "phase2", stop_at=1)
    assert (summary.start_step, summary.end_step) == (0, 1)
    assert [r["step"] for r in session.reports] == [1]
    state = load_trainer_state(session.latest())
    assert state["step"] == 1 and state["scheduler"]["last_epoch"] == 1  # a fresh schedule, not phase 1's


def test_resuming_an_interrupted_phase_ignores_init_from(world: World, first_phase: Path, tmp_path: Path):
    cfg = world.cfg([f"train.init_from={first_phase}", "train.max_iter=4"])
    storage = tmp_path / "phase2"
    world.run(cfg, storage, stop_at=2)
    own = LocalSession(storage).latest()
    assert own is not None and own.name.endswith("2")

    model = world.model(cfg)
    state = load_start_state(model, cfg, LocalSession(storage))
    assert state is not None and state["step"] == 2
    weights = _state(own)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, _state(first_phase)[k]) for k, v in weights.items())

    again, _ = world.run(cfg, storage, stop_at=2)
    assert again.start_step == 2 and again.losses == []


def test_unknown_freeze_name_fails_before_training(world: World, tmp_path: Path):
    cfg = world.cfg(["train.freeze=[backbone,backbon]"])
    with pytest.raises(ConfigError, match=r"train\.freeze: 'backbon' .*backbone, rpn, box_head, box_predictor"):
        freeze(world.model(cfg), cfg.train.freeze)
    with pytest.raises(ConfigError, match=r"train\.freeze: 'backbon'"):
        world.run(cfg, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_prefix_freezes_exactly_the_parameters_under_it(world: World):
    cfg = world.cfg()
    for prefix in ("roi_heads.method_head.background", "roi_heads.box_head.fc6", "backbone.body.layer2"):
        model = world.model(cfg)
        was = {n for n, p in model.named_parameters() if p.requires_grad}
        freeze(model, [prefix])
        now = {n for n, p in model.named_parameters() if p.requires_grad}
        assert was - now == {n for n in was if n == prefix or n.startswith(prefix + ".")} != set()
    with pytest.raises(ConfigError, match=r"train\.freeze: 'roi_heads\.box_head\.fc'"):
        freeze(world.model(cfg), ["roi_heads.box_head.fc"])  # prefixes end at a module boundary


@pytest.mark.parametrize("neck", ["fpn", "c4"])
def test_short_names_name_real_modules(world: World, neck: str):
    cfg = world.cfg([f"model.neck={neck}"])
    for short, prefix in PARTS.items():
        model = world.model(cfg)
        freeze(model, [short])
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen and all(n.startswith(prefix + ".") for n in frozen), short


def test_init_from_must_fit_the_model(world: World, first_phase: Path):
    cfg = world.cfg(["model.representation_size=32"])
    with pytest.raises(CheckpointError, match=r"train\.init_from=.*do not fit this phase's model"):
        load_init_weights(world.model(cfg), first_phase, cfg)
    with pytest.raises(FileNotFoundError, match=r"train\.init_from .*does not exist"):
        load_init_weights(world.model(cfg), first_phase / "nothing.pt", cfg)


def test_init_from_is_absolute_and_checked_on_the_driver(world: World, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("experiments/vild_text_shapes", ["train.init_from=runs/a/checkpoint_0000100"])
    assert cfg.train.init_from == str(tmp_path / "runs" / "a" / "checkpoint_0000100")
    with pytest.raises(FileNotFoundError, match=r"train\.init_from checkpoint: .*checkpoint_0000100"):
        phase = world.prepared.cfg.model_copy(update={"train": cfg.train})
        check_worker_inputs(dataclasses.replace(world.prepared, cfg=phase))
