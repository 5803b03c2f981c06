"""Learning-rate schedule and optimizer construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ovdlab.platform.config import TrainConfig
from ovdlab.platform.train.schedule import (
    WARMUP_FACTOR,
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    warmup_factor_at,
)


def test_warmup_rises_linearly_to_one():
    assert warmup_factor_at(0, 10) == pytest.approx(WARMUP_FACTOR)
    assert warmup_factor_at(5, 10) == pytest.approx(WARMUP_FACTOR * 0.5 + 0.5)
    assert warmup_factor_at(10, 10) == 1.0
    assert warmup_factor_at(0, 0) == 1.0
    values = [warmup_factor_at(i, 10) for i in range(11)]
    assert all(b > a for a, b in zip(values, values[1:]))


def test_step_schedule_decays_at_each_milestone():
    mult = lr_multiplier(TrainConfig(max_iter=100, schedule="step", steps=[40, 70], gamma=0.1, warmup_iters=0))
    assert mult(0) == 1.0 and mult(39) == 1.0
    assert mult(40) == pytest.approx(0.1) and mult(69) == pytest.approx(0.1)
    assert mult(70) == pytest.approx(0.01) and mult(99) == pytest.approx(0.01)


def test_cosine_schedule_with_warmup():
    mult = lr_multiplier(TrainConfig(max_iter=100, schedule="cosine", warmup_iters=10))
    assert mult(0) == pytest.approx(WARMUP_FACTOR * 0.5 * (1 + math.cos(0.0)))
    assert mult(50) == pytest.approx(0.5)
    assert mult(100) == pytest.approx(0.0, abs=1e-12)
    assert mult(25) > mult(50) > mult(75)


def test_unsorted_steps_are_rejected():
    with pytest.raises(ValueError, match="train.steps must be increasing"):
        lr_multiplier(TrainConfig(steps=[200, 100]))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _step(opt, sched, steps: int) -> list[float]:
    """The learning rate of each of ``steps`` optimiser + scheduler steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_resumed_scheduler_continues_on_the_same_curve():
    cfg = TrainConfig(max_iter=30, schedule="step", steps=[12, 20], warmup_iters=5, lr=0.1)
    model = _model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    straight = _step(opt, sched, 30)

    model2 = _model()
    opt2 = build_optimizer(model2, cfg)
    sched2 = build_scheduler(opt2, cfg)
    resumed = _step(opt2, sched2, 9)
    state = {"optimizer": opt2.state_dict(), "scheduler": sched2.state_dict()}
    opt3 = build_optimizer(model2, cfg)
    sched3 = build_scheduler(opt3, cfg)
    opt3.load_state_dict(state["optimizer"])
    sched3.load_state_dict(state["scheduler"])
    resumed += _step(opt3, sched3, 21)
    assert resumed == pytest.approx(straight)
    assert straight[12] == pytest.approx(0.01) and straight[20] == pytest.approx(0.001)


def test_optimizers_and_weight_decay_groups():
    model = _model()
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.8, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD)
    decay, no_decay = sgd.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert sum(len(g["params"]) for g in sgd.param_groups) == len(list(model.parameters()))
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]


def test_fused_adamw_takes_the_steps_of_the_plain_one():
    """Fused is a faster kernel of the same update (weight decay groups included)."""
    torch.manual_seed(0)
    fused_model, plain_model = _model(), _model()
    plain_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.05))
    plain = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in build_optimizer(plain_model, TrainConfig(
            optimizer="adamw", weight_decay=0.05)).param_groups],
        lr=1e-2,
    )
    x = torch.randn(16, 4)
    for _ in range(5):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_model_is_an_error():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())
