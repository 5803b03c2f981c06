"""``ovdlab compare``: the methods of an MLflow experiment side by side, with their spread over seeds.

Reads the experiment's finished recipe runs (a job's run, ``kind=recipe``, or a sweep
trial's, ``kind=trial``) and groups them into *settings*: runs whose resolved configs
differ only in ``seed``. Per method (the oracle apart) the setting with the best mean
``metric`` is its row: novel / base / all AP50 (with the novel kinds on shapes; AP, APr,
APc, APf on LVIS) as mean ± std over the setting's seeds, training minutes and the CPU /
GPU hours its stages held (``time/*``, logged by the recipe runner). A difference
smaller than the spread is no difference.

Figures: AP50 novel against base per method with error bars; for each sweep of the
experiment, the metric against each swept value (hollow: trials stopped early). The
table (markdown) and figures are written to ``out_dir``, logged to a run named
``comparison`` (``kind=comparison``), and the table is printed.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from ovdlab.platform.config import content_key
from ovdlab.platform.evaluation.tables import mean_std
from ovdlab.platform.tracking import Tracker

JOB_KINDS = ("recipe", "trial")
COCO_COLUMNS = {"ap50_novel": "AP50 novel", "ap50_base": "base", "ap50_all": "all",
                "ap50_novel_comp": "novel comp", "ap50_novel_concept": "novel concept"}
LVIS_COLUMNS = {"ap": "AP", "apr": "APr", "apc": "APc", "apf": "APf"}
TIME_COLUMNS = {"time/train_minutes": "train min", "time/cpu_hours": "CPU h", "time/gpu_hours": "GPU h"}
SETTING_FREE = ("seed", "tracking.run_name")
"""Params that do not make another setting: the seed (the spread is over it), the run name."""


@dataclass
class Setting:
    """Runs of one method and config but the seed."""

    method: str
    runs: list[Run]

    def values(self, key: str) -> list[float]:
        return [float(r.data.metrics.get(key, float("nan"))) for r in self.runs]

    def mean(self, key: str) -> float:
        return mean_std(self.values(key))[0]

    @property
    def params(self) -> dict[str, str]:
        return {k: v for k, v in self.runs[0].data.params.items() if k not in SETTING_FREE}


@dataclass
class Comparison:
    """What ``ovdlab compare`` made."""

    table: str
    rows: list[tuple[Setting, str]]
    files: list[Path]
    run_id: str | None


def method_label(run: Run) -> str:
    """The method's name, ``-oracle`` added for a run trained on every class (the ceiling)."""
    oracle = run.data.params.get("train.vocabulary") == "all"
    return f"{run.data.tags.get('method', '?')}{'-oracle' if oracle else ''}"


def job_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    """The experiment's finished job and trial runs with detection metrics (``filter_string``:
    an MLflow search filter, e.g. ``params.dataset.shapes.seed = '0'``)."""
    query = " and ".join(f for f in ("attributes.status = 'FINISHED'", filter_string) if f)
    runs = client.search_runs([experiment_id], filter_string=query, max_results=50000)
    return [r for r in runs if r.data.tags.get("kind") in JOB_KINDS
            and ("ap50_novel" in r.data.metrics or "apr" in r.data.metrics)]


def settings(runs: list[Run]) -> list[Setting]:
    """Runs grouped by method and config but the seed."""
    groups: dict[str, Setting] = {}
    for run in runs:
        params = {k: v for k, v in run.data.params.items() if k not in SETTING_FREE}
        key = content_key(method_label(run), params)
        groups.setdefault(key, Setting(method_label(run), [])).runs.append(run)
    return list(groups.values())


def best_per_method(found: list[Setting], metric: str) -> list[tuple[Setting, str]]:
    """Per method (by name, the oracle ceiling last), its setting with the best mean
    ``metric``, with what sets it apart from the method's other settings
    (``method.distill_weight=0.5``; empty when it has one)."""
    rows = []
    for method in sorted({s.method for s in found}, key=lambda m: (m.endswith("-oracle"), m)):
        mine = [s for s in found if s.method == method]
        best = max(mine, key=lambda s: _or_low(s.mean(metric)))
        differ = sorted(k for k in best.params if len({s.params.get(k) for s in mine}) > 1)
        rows.append((best, ", ".join(f"{k}={best.params[k]}" for k in differ[:3]) + (" ..." if len(differ) > 3 else "")))
    return rows


def _or_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.1f}" + ("" if math.isnan(std) else f" ± {std:.1f}")


def comparison_table(rows: list[tuple[Setting, str]]) -> str:
    """The markdown table: method, setting, seeds, the metrics (mean ± std), time and hours."""
    lvis = any("apr" in s.runs[0].data.metrics for s, _ in rows)
    metrics = LVIS_COLUMNS if lvis else COCO_COLUMNS
    metrics = {k: v for k, v in metrics.items() if any(k in r.data.metrics for s, _ in rows for r in s.runs)}
    header = ["method", "setting", "seeds", *metrics.values(), *TIME_COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, label in rows:
        seeds = sorted({r.data.params.get("seed", "?") for r in setting.runs})
        cells = [setting.method, label or "-", ",".join(seeds)]
        cells += [_cell(setting.values(k)) for k in metrics]
        cells += [_time_cell(setting.values(k)) for k in TIME_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _time_cell(values: list[float]) -> str:
    mean = mean_std(values)[0]
    return "n/a" if math.isnan(mean) else f"{mean:.2f}"


def sweep_points(client: MlflowClient, experiment_id: str, sweep: Run, metric: str) -> dict[str, list[tuple[Any, float, bool]]]:
    """A sweep's trials as ``(value, metric, completed)`` per swept key: from the table the
    sweep logged (``sweep/trials.json``, which keeps the last evaluation of the trials
    stopped early), else from its finished trial runs."""
    trials = _logged_trials(client, sweep)
    if trials is None:
        runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{sweep.info.run_id}'",
                                  max_results=10000)
        trials = [{**{t[len("param."):]: json.loads(v) for t, v in r.data.tags.items() if t.startswith("param.")},
                   metric: r.data.metrics[metric], "completed": True}
                  for r in runs if r.data.tags.get("kind") == "trial" and metric in r.data.metrics]
    keys = [k for k in (trials[0] if trials else {}) if k not in {metric, "completed", "reports", "mlflow_run_id"}]
    return {key: [(t[key], float(t[metric]) if t[metric] is not None else float("nan"), bool(t["completed"]))
                  for t in trials] for key in keys}


def _logged_trials(client: MlflowClient, sweep: Run) -> list[dict[str, Any]] | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            table = json.loads(Path(client.download_artifacts(sweep.info.run_id, "sweep/trials.json", tmp)).read_text())
    except (MlflowException, OSError):  # no table: a sweep still running, or killed before its end
        return None
    return table["trials"]


def compare(tracker: Tracker, out_dir: Path, metric: str = "ap50_novel", filter_string: str = "") -> Comparison:
    """Compare the methods of ``tracker``'s experiment (see the module doc)."""
    from ovdlab.platform.evaluation.plots import novel_vs_base, sweep_curve

    client, experiment_id = tracker.client, tracker.experiment_id
    found = settings(job_runs(client, experiment_id, filter_string))
    if not found:
        raise ValueError(f"no finished job runs with detection metrics in experiment {tracker.experiment!r} "
                          f"of {tracker.uri}{f' matching {filter_string!r}' if filter_string else ''}")
    rows = best_per_method(found, metric)
    table = comparison_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "comparison.md"]
    files[0].write_text(f"experiment {tracker.experiment!r}: best setting per method by mean {metric}; "
                        f"mean ± std over seeds\n\n{table}")
    lvis = "apr" in rows[0][0].runs[0].data.metrics
    x_key, y_key = ("apf", "apr") if lvis else ("ap50_base", "ap50_novel")
    points = [(s.method, *mean_std(s.values(x_key)), *mean_std(s.values(y_key))) for s, _ in rows]
    files.append(out_dir / "novel_vs_base.png")
    novel_vs_base(points, files[-1], ylabel="APr" if lvis else "AP50 novel", xlabel="APf" if lvis else "AP50 base")
    sweeps = client.search_runs([experiment_id], filter_string="tags.kind = 'sweep'", max_results=1000)
    for sweep in sweeps:
        swept_metric = sweep.data.tags.get("metric", metric)
        for key, pts in sweep_points(client, experiment_id, sweep, swept_metric).items():
            files.append(out_dir / f"sweep_{sweep.data.tags.get('sweep', sweep.info.run_id)}_{key}.png")
            sweep_curve(pts, key, swept_metric, files[-1])
    with tracker.start_run(run_name="comparison", tags={"kind": "comparison", "metric": metric,
                                                         "filter": filter_string}) as run_id:
        for path in files:
            tracker.log_artifact(path, "comparison")
    return Comparison(table, rows, files, run_id)
