"""Ray Tune sweeps of any dotted config key: shared stages once, trials as recipes, ASHA, MLflow.

:func:`run_sweep` runs a :class:`~ovdlab.platform.tune.config.SweepConfig`:

1. **Shared stages once.** The recipe's stages whose content key is the same for every
   probed value of every parameter (:func:`shared_stages`: world, teacher, proposal
   detector, region store, whatever the swept keys do not reach) run here, before any
   trial, as one recipe run under the sweep's MLflow run (tagged ``kind=sweep-shared``).
   Trials find them by key and reuse them; none extracts or trains them again.
2. **Trials** (the Train V2 pattern): a Tune function per trial runs the trial's recipe
   (:func:`~ovdlab.platform.recipes.runner.run_recipe`), whose training phases build
   ``TorchTrainer``\\ s; their evaluations reach Tune
   (:mod:`~ovdlab.platform.tune.reporting`) and ASHA stops trials that trail at an
   evaluation rung. The function reports the recipe's final metrics with ``trial_done``.
   ``max_concurrent_trials`` is cut to what the cluster's CPUs (and GPUs) fit.
3. **MLflow**: one parent run per sweep, one child per trial (the trial's recipe run:
   params = its resolved config, its training phases' runs under it with the metrics
   over steps, the final metrics on it), the best completed trial tagged ``best``,
   trials stopped early tagged ``stopped_early`` and marked KILLED, the trials table and
   the metric-against-value figure on the parent.
4. **Resume.** Rerunning the same sweep (same config and overrides) restores its Tune
   experiment from ``<work_dir>/sweeps/tune/<name>-<key>``: finished trials are kept,
   unfinished ones run again and their trainings resume from their last checkpoints;
   the MLflow runs are reopened, never duplicated.

Selecting on ``ap50_novel`` of the evaluation split, as the shipped sweeps and the
papers do, lets the novel classes choose the setting; ``metric: ap50_base`` keeps them
out of the choice.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovdlab.platform.config import ExperimentConfig, config_file, content_key, load_config
from ovdlab.platform.evaluation.tables import headline
from ovdlab.platform.recipes.runner import plan_keys, run_recipe
from ovdlab.platform.tracking import Tracker, tracker_from_config
from ovdlab.platform.tune.config import SweepConfig, override

log = logging.getLogger(__name__)

SWEEPS_DIR = "sweeps"
EXPERIMENT_STATE_PERIOD_S = 2
"""Seconds between saves of the Tune experiment's state (Tune's default: 10 or more), so a
driver killed just after a trial finished still finds it finished when resumed."""
TRIAL_DONE = "trial_done"
"""Set in a trial's last report: its recipe finished (a trial without it was stopped early)."""


@dataclass
class TrialOutcome:
    """One trial: its values, its last reported metrics, whether its recipe finished."""

    params: dict[str, Any]
    metrics: dict[str, float]
    completed: bool
    reports: int
    mlflow_run_id: str | None = None

    def label(self) -> str:
        return params_label(self.params)


def params_label(params: dict[str, Any]) -> str:
    """``method.distill_weight=0.5, seed=1``: a trial's values as the logs and tables show them."""
    return ", ".join(f"{key}={value}" for key, value in params.items())


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns and the sweep job prints."""

    sweep: SweepConfig
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    shared: list[str]
    parent_run_id: str | None
    tracking_uri: str
    experiment: str
    concurrency: int

    def report_lines(self) -> list[str]:
        metric = self.sweep.metric
        lines = [f"sweep {self.sweep.name}: {len(self.trials)} trials, {self.concurrency} at a time; "
                 f"shared stages run once: {', '.join(self.shared) or 'none'}"]
        for trial in sorted(self.trials, key=lambda t: _sort_value(t, metric, self.sweep.mode)):
            how = "completed" if trial.completed else f"stopped early after {trial.reports} evaluation(s)"
            mark = "  <- best" if trial is self.best else ""
            scores = headline(trial.metrics) if "ap50_novel" in trial.metrics or "ap" in trial.metrics else ""
            lines.append(f"  {trial.label()}: {metric} {trial.metrics.get(metric, float('nan')):.1f} ({how}) {scores}{mark}")
        lines.append(f"MLflow sweep run {self.parent_run_id} in {self.tracking_uri}, experiment {self.experiment!r}")
        return lines


def _sort_value(trial: TrialOutcome, metric: str, mode: str) -> tuple[int, float]:
    value = trial.metrics.get(metric, float("nan"))
    value = -math.inf if math.isnan(value) else value
    return (0 if trial.completed else 1, -value if mode == "max" else value)


def shared_stages(sweep: SweepConfig) -> list[str]:
    """The recipe's stages that no swept value changes: same content key under the
    sweep's overrides and under every probe value of every parameter."""
    base = plan_keys(sweep.experiment, sweep.overrides)
    probes = [
        plan_keys(sweep.experiment, [*sweep.overrides, override(key, value)])
        for key, domain in sweep.params.items() for value in domain.probes()
    ]
    return [name for name, key in base.items() if all(p.get(name) == key for p in probes)]


def trial_resources(sweep: SweepConfig, cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial occupies while it trains: its driver plus its training's workers."""
    need = {"CPU": sweep.trial_cpus + cfg.ray.num_workers * cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        need["GPU"] = float(cfg.ray.num_workers)
    return need


def fitted_concurrency(sweep: SweepConfig, cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """``max_concurrent_trials``, cut to the trials the cluster's resources hold at once
    (Tune schedules a trial's driver, not the trainers it starts: without the cut, more
    trials start than can train and they wait on each other's workers)."""
    need = trial_resources(sweep, cfg)
    fits = min(int(cluster.get(name, 0.0) // amount) for name, amount in need.items())
    if fits < 1:
        raise ValueError(
            f"one trial of sweep {sweep.name} needs {need} (sweep.trial_cpus + ray.num_workers x "
            f"ray.cpus_per_worker); the cluster has {dict((k, cluster.get(k, 0.0)) for k in need)}"
        )
    return min(sweep.max_concurrent_trials, fits)


def _search_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    def domain(spec: Any) -> Any:
        if spec.values is not None:
            return tune.grid_search(spec.values) if sweep.search == "grid" else tune.choice(spec.values)
        if spec.uniform is not None:
            return tune.uniform(*spec.uniform)
        if spec.loguniform is not None:
            return tune.loguniform(*spec.loguniform)
        return tune.randint(*spec.randint)

    return {"params": {key: domain(spec) for key, spec in sweep.params.items()}}


def _search_algorithm(sweep: SweepConfig, concurrency: int) -> Any:
    """Grid and random search: Tune's variant generator (it limits concurrency itself);
    Optuna's TPE, limited to ``concurrency`` trials at a time."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed)), concurrency)
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency)


def _scheduler(sweep: SweepConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, max_t=s.max_t)


@dataclass(frozen=True)
class TrialJob:
    """What every trial shares: the experiment (an absolute path: a trial may run in
    another folder or on another node), its overrides, the sweep's MLflow run."""

    sweep: str
    experiment: str
    overrides: tuple[str, ...]
    parent_run_id: str | None
    metric: str


def run_trial(config: dict[str, Any], job: TrialJob) -> None:
    """The Tune function: the trial's recipe with its values; its final metrics to Tune."""
    from ray import tune

    from ovdlab.platform.tune.reporting import reporting_to_tune

    params = dict(config["params"])
    overrides = [*job.overrides, *(override(key, value) for key, value in params.items())]
    print(f"sweep {job.sweep}: trial {params_label(params)} runs its recipe", flush=True)
    tags = {"kind": "trial", "sweep": job.sweep, **{f"param.{key}": json.dumps(value) for key, value in params.items()}}
    with reporting_to_tune(job.metric):
        result = run_recipe(job.experiment, overrides, parent_run_id=job.parent_run_id, tags=tags, role="trial")
    if result.parent_run_id is not None:
        copy_evaluations(result)
    tune.report({**{k: float(v) for k, v in result.metrics.items()}, TRIAL_DONE: 1.0})


EVALUATION_KEYS = ("ap50_novel", "ap50_base", "ap50_all", "ap50_novel_comp", "ap50_novel_concept", "ap", "apr", "apc", "apf")


def copy_evaluations(result: Any) -> None:
    """The trial's evaluations over steps, onto its own run as ``curve/<metric>``: the
    ``val/<metric>`` histories of the training phases run under it (not the shared
    stages), one phase after the other (a phase's steps continue from the previous
    phase's last), so the trial's run charts its curve without opening each phase."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(result.tracking_uri)
    offset = 0
    for stage in result.stages:
        if stage.kind != "train" or stage.mlflow_run_id is None:
            continue
        run = client.get_run(stage.mlflow_run_id)
        if run.data.tags.get("mlflow.parentRunId") != result.parent_run_id:
            continue
        history = [m for key in EVALUATION_KEYS if f"val/{key}" in run.data.metrics
                   for m in client.get_metric_history(run.info.run_id, f"val/{key}")]
        client.log_batch(result.parent_run_id, metrics=[
            Metric(f"curve/{m.key[len('val/'):]}", m.value, m.timestamp, m.step + offset) for m in history])
        offset += max((m.step for m in history), default=0)


def _sweep_run(cfg: ExperimentConfig, sweep: SweepConfig) -> tuple[str, Path, str | None]:
    """The sweep's key (its config and the resolved experiment config), its record, and
    the MLflow run id a previous start of the same sweep left there."""
    key = content_key("sweep", sweep.model_dump(mode="json"), cfg.content_hash())
    record = cfg.work_path(SWEEPS_DIR, f"{sweep.name}-{key}.json")
    run_id = json.loads(record.read_text()).get("mlflow_run_id") if record.is_file() else None
    return key, record, run_id


def _tuner(sweep: SweepConfig, job: TrialJob, storage: Path, name: str, concurrency: int) -> Any:
    """A new Tune experiment, or the one a killed start of this sweep left (resumed)."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": sweep.trial_cpus})
    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        log.info("sweep %s: resuming %s (finished trials are kept)", sweep.name, path)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=_search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, search_alg=_search_algorithm(sweep, concurrency),
            scheduler=_scheduler(sweep), num_samples=sweep.num_samples,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(storage)),
    )


TUNE_KEYS = frozenset({"timestamp", "time_this_iter_s", "time_total_s", "time_since_restore", "pid", "done",
                       "training_iteration", "iterations_since_restore", "step", TRIAL_DONE})
"""Keys of a Tune result that are Tune's bookkeeping (or the training step), not metrics."""


def _outcomes(grid: Any) -> list[TrialOutcome]:
    outcomes = []
    for result in grid:
        reported = result.metrics or {}
        metrics = {k: float(v) for k, v in reported.items()
                   if k not in TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        outcomes.append(TrialOutcome(
            params=dict(result.config["params"]), metrics=metrics, completed=bool(reported.get(TRIAL_DONE)),
            reports=int(reported.get("training_iteration", 0)),
        ))
    return outcomes


def best_trial(trials: list[TrialOutcome], metric: str, mode: str) -> TrialOutcome | None:
    """The completed trial with the best ``metric`` (a trial stopped early never wins)."""
    scored = [t for t in trials if t.completed and not math.isnan(t.metrics.get(metric, float("nan")))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda t: t.metrics[metric])


def _descendants(tracker: Tracker, run_id: str) -> list[Any]:
    """Every run under ``run_id`` (children, their children, ...)."""
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=5000)
    children: dict[str, list[Any]] = {}
    for run in runs:
        children.setdefault(run.data.tags.get("mlflow.parentRunId", ""), []).append(run)
    out, todo = [], [run_id]
    while todo:
        for run in children.get(todo.pop(), []):
            out.append(run)
            todo.append(run.info.run_id)
    return out


def _track_outcomes(tracker: Tracker, parent: str, trials: list[TrialOutcome], best: TrialOutcome | None,
                    sweep: SweepConfig) -> None:
    """Link each outcome to its trial run; tag the best; close the runs of stopped trials
    (their processes were ended by the scheduler, so the runs were left RUNNING)."""
    trial_runs = [r for r in _descendants(tracker, parent) if r.data.tags.get("kind") == "trial"]
    for trial in trials:
        wanted = {f"param.{k}": json.dumps(v) for k, v in trial.params.items()}
        run = next((r for r in trial_runs if all(r.data.tags.get(k) == v for k, v in wanted.items())), None)
        if run is None:
            continue
        trial.mlflow_run_id = run.info.run_id
        if trial is best:
            tracker.client.set_tag(run.info.run_id, "best", "true")
        if not trial.completed:
            tracker.client.set_tag(run.info.run_id, "stopped_early", sweep.scheduler.kind)
            for left in [run, *_descendants(tracker, run.info.run_id)]:
                if left.info.status == "RUNNING":
                    tracker.client.set_terminated(left.info.run_id, "KILLED")


def log_sweep_summary(tracker: Tracker, sweep: SweepConfig, trials: list[TrialOutcome], best: TrialOutcome | None) -> None:
    """On the sweep's run: the trials table (markdown and JSON), the metric against each
    swept value, and the best trial's metrics and values."""
    from ovdlab.platform.evaluation.plots import sweep_curve

    rows = [{**t.params, sweep.metric: t.metrics.get(sweep.metric), "completed": t.completed, "reports": t.reports,
             "mlflow_run_id": t.mlflow_run_id} for t in trials]
    tracker.log_dict({"metric": sweep.metric, "trials": rows}, "sweep/trials.json")
    tracker.log_text(trials_table(sweep, trials, best), "sweep/trials.md")
    for key in sweep.params:
        points = [(t.params[key], t.metrics.get(sweep.metric, float("nan")), t.completed) for t in trials]
        tracker.log_figure(sweep_curve(points, key, sweep.metric), f"sweep/{sweep.metric}_vs_{key}.png")
    if best is not None:
        tracker.log_metrics({f"best/{k}": v for k, v in best.metrics.items()})
        tracker.set_tags({**{f"best.{k}": v for k, v in best.params.items()}, "best_trial_run": best.mlflow_run_id})


def trials_table(sweep: SweepConfig, trials: list[TrialOutcome], best: TrialOutcome | None) -> str:
    """A markdown table: one row per trial, its values, the metric, how it ended."""
    keys = list(sweep.params)
    lines = ["| " + " | ".join([*keys, sweep.metric, "ended", "best"]) + " |", "|" + "---|" * (len(keys) + 3)]
    for t in sorted(trials, key=lambda t: _sort_value(t, sweep.metric, sweep.mode)):
        ended = "completed" if t.completed else f"stopped after {t.reports}"
        value = t.metrics.get(sweep.metric, float("nan"))
        lines.append("| " + " | ".join([*(str(t.params[k]) for k in keys), f"{value:.1f}", ended,
                                          "yes" if t is best else ""]) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(sweep: SweepConfig) -> SweepResult:
    """Run (or resume) ``sweep`` (see the module doc)."""
    from ovdlab.platform.cluster import ensure_ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # a local Ray's trials keep this folder
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_STATE_PERIOD_S))
    experiment = str(config_file(sweep.experiment))
    cfg = load_config(experiment, sweep.overrides)
    overrides = (*sweep.overrides, f"work_dir={cfg.work_dir}")
    sweep = sweep.model_copy(update={"experiment": experiment, "overrides": list(overrides)})
    shared = shared_stages(sweep)
    key, record, run_id = _sweep_run(cfg, sweep)
    tracker = tracker_from_config(cfg)
    storage = cfg.work_path(SWEEPS_DIR, "tune")
    tags = {"kind": "sweep", "sweep": sweep.name, "method": cfg.method.name, "metric": sweep.metric}
    with tracker.start_run(run_name=f"sweep-{sweep.name}-{key[:8]}", tags=tags, run_id=run_id) as parent:
        if parent is not None:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"mlflow_run_id": parent, "sweep": sweep.model_dump(mode="json")}, indent=1))
            tracker.log_params({"search": sweep.search, "metric": sweep.metric, "mode": sweep.mode,
                                "scheduler": sweep.scheduler.kind, "num_samples": sweep.num_samples,
                                "experiment": Path(sweep.experiment).stem,
                                **{f"space.{k}": d.describe() for k, d in sweep.params.items()}})
        if shared:
            log.info("sweep %s: shared stages %s run once, before the trials", sweep.name, ", ".join(shared))
            run_recipe(experiment, list(overrides), parent_run_id=parent, only=shared,
                       tags={"kind": "sweep-shared", "sweep": sweep.name}, role="shared")
        ensure_ray(cfg)
        import ray

        concurrency = fitted_concurrency(sweep, cfg, ray.cluster_resources())
        job = TrialJob(sweep.name, experiment, tuple(overrides), parent, sweep.metric)
        grid = _tuner(sweep, job, storage, f"{sweep.name}-{key}", concurrency).fit()
        trials = _outcomes(grid)
        best = best_trial(trials, sweep.metric, sweep.mode)
        if parent is not None:
            _track_outcomes(tracker, parent, trials, best, sweep)
            log_sweep_summary(tracker, sweep, trials, best)
    return SweepResult(sweep, trials, best, shared, parent, tracker.uri, tracker.experiment, concurrency)

