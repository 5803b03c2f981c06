"""Freezing named parts of the detector for one training phase (``train.freeze``).

A frozen part keeps its weights and its normalization statistics bit-identical for the
whole phase: its parameters get ``requires_grad_(False)`` before the optimizer (and DDP,
which records which parameters expect gradients when it wraps the model) is built, so
:func:`~ovdlab.platform.train.schedule.build_optimizer` leaves them out, as detectron2's
``solver/build.py`` builds its per-parameter groups from ``requires_grad`` parameters
only; its BatchNorm layers stay in eval mode (:func:`set_train_mode`), so they normalize
with their running statistics and stop updating them -- what torchvision's
``_resnet_fpn_extractor`` gets from ``FrozenBatchNorm2d`` for the layers below
``trainable_layers``. That backbone freezing is applied when the model is built and is
left as it is here: this module only freezes more.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ovdlab.platform.config import ConfigError

PARTS: dict[str, str] = {
    "backbone": "backbone",
    "rpn": "rpn",
    "box_head": "roi_heads.box_head",
    "box_predictor": "roi_heads.box_predictor",
}
"""Short names of ``train.freeze`` -> the :class:`~ovdlab.platform.detector.model.OVDDetector`
module they name: the ResNet body + FPN (C4: stem..res4), the RPN head, the RoI box
head's shared layers (FPN: ``TwoMLPHead``; C4: res5) and the class-agnostic box regressor."""


def _under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or lies inside it, at a ``.`` boundary (``rpn`` is not ``rpn_x``)."""
    return name == prefix or name.startswith(prefix + ".")


def freeze_prefixes(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The parameter-name prefixes of ``names`` (short names mapped through :data:`PARTS`).

    An entry that matches no parameter of ``model`` is a config error: a typo would
    otherwise train what was meant to stay fixed.
    """
    params = [name for name, _ in model.named_parameters()]
    prefixes = []
    for entry in names:
        prefix = PARTS.get(entry, entry)
        if not any(_under(name, prefix) for name in params):
            top = sorted({name.split(".")[0] for name in params})
            raise ConfigError(
                f"train.freeze: {entry!r} names no parameter of the model; use a short name "
                f"({', '.join(PARTS)}) or a parameter-name prefix under {', '.join(top)} "
                f"(such as 'roi_heads.method_head')"
            )
        prefixes.append(prefix)
    return prefixes


def freeze(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Freeze the parts ``names`` of ``model``; returns their normalization layers with
    running statistics, which :func:`set_train_mode` keeps in eval mode.

    Call before the optimizer is built and before the model is wrapped for DDP.
    """
    prefixes = freeze_prefixes(model, names)
    for name, param in model.named_parameters():
        if any(_under(name, prefix) for prefix in prefixes):
            param.requires_grad_(False)
    return [
        module
        for name, module in model.named_modules()
        if getattr(module, "track_running_stats", False) and any(_under(name, prefix) for prefix in prefixes)
    ]


def set_train_mode(model: nn.Module, frozen_norms: Sequence[nn.Module]) -> None:
    """``model.train()`` with the frozen normalization layers back in eval mode.

    ``model.train()`` (and every ``model.train(was_training)`` restore after an
    evaluation) switches every submodule, so the loop calls this instead each time.
    """
    model.train()
    for module in frozen_norms:
        module.eval()
