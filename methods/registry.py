"""Method registry: ``MethodConfig.name`` -> a :class:`~ovdlab.methods.base.Method`.

Imports are lazy so that building one method never imports another's dependencies
(CLIFF's diffusion code, LP-OVOD's faiss retrieval).
"""

from __future__ import annotations

import importlib

from ovdlab.methods.base import Method
from ovdlab.platform.config import MethodConfig

# name -> "module:class"; a method joins by adding its line here.
METHODS: dict[str, str] = {
    "vild-text": "ovdlab.methods.vild:ViLDText",
    "vild": "ovdlab.methods.vild:ViLD",
    "vild-ensemble": "ovdlab.methods.vild:ViLDEnsemble",
    "lp-ovod": "ovdlab.methods.lp_ovod:LPOVOD",
    "ezsd": "ovdlab.methods.ezsd:EZSD",
    "cliff": "ovdlab.methods.cliff.method:CLIFF",
}


def available_methods() -> list[str]:
    """Names that :func:`build_method` can build."""
    return sorted(METHODS)


def build_method(cfg: MethodConfig) -> Method:
    """Instantiate the method named ``cfg.name`` with its config."""
    target = METHODS.get(cfg.name)
    if target is None:
        raise NotImplementedError(
            f"method {cfg.name!r} is not implemented; available methods: {', '.join(available_methods())}"
        )
    module_name, class_name = target.split(":")
    method_cls = getattr(importlib.import_module(module_name), class_name)
    return method_cls(cfg)
