"""Learning-rate schedule: linear warmup times a step or cosine decay, per iteration.

The same multiplier detectron2 builds from ``WarmupParamScheduler`` around
``MultiStepParamScheduler`` / ``CosineParamScheduler`` (``detectron2/solver/build.py``,
``build_lr_scheduler``): during the first ``warmup_iters`` iterations the main
schedule's value is scaled by a factor rising linearly from ``warmup_factor`` to 1;
the step schedule multiplies by ``gamma`` at each milestone in ``steps``; the cosine
schedule follows ``0.5 * (1 + cos(pi * it / max_iter))`` down to 0 at ``max_iter``.
The lambda is a pure function of the iteration, so a resumed job that restores the
scheduler's ``last_epoch`` continues on exactly the same curve.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch

from ovdlab.platform.config import TrainConfig

WARMUP_FACTOR = 0.001


def warmup_factor_at(it: int, warmup_iters: int, warmup_factor: float = WARMUP_FACTOR) -> float:
    """Linear warmup (detectron2 ``LinearParamScheduler`` from ``warmup_factor`` to 1)."""
    if warmup_iters <= 0 or it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


def lr_multiplier(train: TrainConfig) -> Callable[[int], float]:
    """``it -> lr / base_lr`` for the configured schedule (used with ``LambdaLR``)."""
    steps = sorted(train.steps)
    if steps != list(train.steps):
        raise ValueError(f"train.steps must be increasing, got {train.steps}")
    max_iter, warmup, gamma = train.max_iter, train.warmup_iters, train.gamma

    if train.schedule == "step":

        def main(it: int) -> float:
            return gamma ** bisect.bisect_right(steps, it)

    elif train.schedule == "cosine":

        def main(it: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(it, max_iter) / max_iter))

    else:
        raise ValueError(f"train.schedule must be 'step' or 'cosine', got {train.schedule!r}")

    def multiplier(it: int) -> float:
        return warmup_factor_at(it, warmup) * main(it)

    return multiplier


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters.

    Parameters with ``requires_grad=False`` (``model.trainable_layers``, ``train.freeze``:
    frozen before this is called) are left out, as detectron2's ``solver/build.py``
    builds its parameter groups: they get no update, no weight decay, no optimizer state.

    One-dimensional parameters (biases, normalization scales, a learned background
    embedding or temperature) take no weight decay, the rest ``weight_decay``: the rule
    of timm's ``param_groups_weight_decay``; decaying a temperature or a bias towards
    zero only fights the loss.

    AdamW runs fused (one kernel over all parameters instead of a dozen element-wise
    ops per tensor): measured on the shapes detector's CPU step, 11% of the step time
    (``docs/benchmarks.md``, "Schedule"); the update is the same algorithm.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    if not decay and not no_decay:
        raise ValueError(
            "the model has no trainable parameters: train.freeze and model.trainable_layers leave nothing "
            f"to train (train.freeze={train.freeze})"
        )
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, fused=True)
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {train.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` stepped once per iteration with :func:`lr_multiplier`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(train))
