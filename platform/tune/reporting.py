"""Evaluations during a trial's training, forwarded to Ray Tune (for ASHA).

A sweep trial runs its recipe's trainings through Ray Train V2 ``TorchTrainer``\\ s
(the Train V2 pattern: a Tune function that builds trainers). Each training reports
at every checkpoint; :class:`EvaluationsToTune`, added to the trainer's callbacks while
:func:`reporting_to_tune` is active in the trial, passes on the reports that carry an
evaluation (they hold the sweep's metric), so the scheduler compares trials at the
same evaluation rungs. Tune requires every report to hold the metric: checkpoints
without an evaluation are not forwarded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

_metric: str | None = None


class EvaluationsToTune(TuneReportCallback):
    """Ray Train's report -> Tune, for the reports that hold ``metric``."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


@contextmanager
def reporting_to_tune(metric: str) -> Iterator[None]:
    """Within: every training built here forwards its evaluations to this Tune trial."""
    global _metric
    previous, _metric = _metric, metric
    try:
        yield
    finally:
        _metric = previous


def tune_callbacks() -> list[TuneReportCallback]:
    """The callbacks a ``TorchTrainer`` built now needs: one inside a sweep trial, else none."""
    return [EvaluationsToTune(_metric)] if _metric is not None else []
