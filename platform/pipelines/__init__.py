"""Ray Data jobs that fill region stores, and the content keys of their stages.

Names are imported on first access (PEP 562): Ray workers import submodules of this
package by reference, and a decode task or the writer actor must not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "ExtractionSummary": "extract",
    "extract_in_process": "extract",
    "plan_extraction": "extract",
    "run_extraction": "extract",
    "StageSpec": "stages",
    "extraction_stage": "stages",
    "store_path": "stages",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
