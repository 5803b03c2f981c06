"""One runner for every method's recipe: skip what exists, resume what was cut, track it all.

:func:`run_recipe` loads the job's experiment config (with the command line's
overrides), asks the method for its stages (``Method.recipe``) and runs them in order:

- **Content keys.** A stage's key hashes its kind, its function, its config *before*
  the ``reads`` are bound and the keys of the stages it reads -- so the same stage in two
  recipes (ViLD's proposal detector is the ViLD-text training of the same seed) has one
  key and runs once, and a changed input re-runs everything downstream of it.
- **Skip.** A finished stage leaves a record ``<work_dir>/recipes/stages/<kind>-<key>.json``
  (output, metrics, MLflow run); a later job with a stage of that key reuses it.
- **Resume.** A train stage without a record calls :func:`~ovdlab.platform.train.trainer.train`
  again, which continues its interrupted run from the latest checkpoint.
- **Tracking.** One MLflow parent run per job (reopened when the same job runs again),
  a child run per stage that runs here (the training's own run, or the stage's own),
  the last evaluated stage's metrics copied onto the parent, reused stages named in its tags.

Kinds and ``reads``: :mod:`ovdlab.platform.recipes.stages`.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ovdlab.methods.registry import build_method
from ovdlab.platform.config import ExperimentConfig, content_key, load_config
from ovdlab.platform.evaluation.tables import headline, mean_std
from ovdlab.platform.recipes.stages import Stage, check_recipe
from ovdlab.platform.tracking import Tracker, tracker_from_config
from ovdlab.platform.train.trainer import run_name_for, train

log = logging.getLogger(__name__)

RECIPES_DIR = "recipes"


@dataclass
class StageResult:
    """What a stage left: ``output`` (a checkpoint, a file), its metrics, its MLflow run,
    and the wall seconds it took when it ran (kept when it is reused: ``skipped``)."""

    name: str
    kind: str
    key: str
    output: str
    metrics: dict[str, float]
    mlflow_run_id: str | None
    seconds: float
    skipped: bool = False


@dataclass
class RecipeResult:
    """Every stage's result in order (``recipe``: the stages as declared); the job's result
    is its last train stage."""

    job: str
    stages: list[StageResult]
    recipe: list[Stage]
    parent_run_id: str | None
    tracking_uri: str
    experiment: str

    @property
    def final(self) -> StageResult:
        return [s for s in self.stages if s.kind == "train"][-1]

    @property
    def metrics(self) -> dict[str, float]:
        """The last evaluated stage's metrics (an ``eval`` stage after the final training,
        else the final training's own evaluation)."""
        return evaluated(self.stages)[-1].metrics

    @property
    def checkpoint(self) -> Path:
        return Path(self.final.output)

    def report_lines(self) -> list[str]:
        """What a job prints at its end: each stage (ran or reused, and its output), the
        headline metrics of every evaluated stage, the final checkpoint and job run."""
        lines = []
        for stage in self.stages:
            how = "reused" if stage.skipped else f"{stage.seconds / 60:.1f} min"
            lines.append(f"stage {stage.name} ({stage.kind}): {how} -> {stage.output}")
            if stage.metrics:
                lines.append(f"  {headline(stage.metrics) if stage.kind in EVALUATED else teacher_line(stage.metrics)}")
        lines.append(f"final checkpoint: {self.checkpoint}; MLflow job run {self.parent_run_id}")
        return lines


EVALUATED = ("train", "eval")
"""Stage kinds whose metrics are detection metrics (a teacher stage reports crop accuracy)."""


def evaluated(results: Sequence[StageResult]) -> list[StageResult]:
    """The stages with detection metrics, in order (every recipe has one: its train stage)."""
    return [r for r in results if r.kind in EVALUATED and r.metrics]


def teacher_line(metrics: dict[str, float]) -> str:
    """A teacher stage's crop accuracies, ``base 0.93 -> 0.95 | novel ...`` (before -> after tuning)."""
    kinds = [k[len("teacher/acc_"):-len("_before")] for k in metrics if k.startswith("teacher/acc_") and k.endswith("_before")]
    return "teacher crop accuracy " + " | ".join(
        f"{kind} {metrics[f'teacher/acc_{kind}_before']:.3f} -> {metrics[f'teacher/acc_{kind}_after']:.3f}" for kind in kinds
    )


def stage_config(stage: Stage, experiment: str, overrides: Sequence[str], outputs: dict[str, str] | None = None) -> ExperimentConfig:
    """The stage's config: its experiment (the job's by default), the job's overrides, its
    own, then (when ``outputs`` is given) every ``reads`` key bound to that stage's output.

    A stage running another experiment (ViLD-text's training as LP-OVOD's proposal
    detector) takes the job's overrides except ``method.*``: those configure the job's
    method, which that stage does not run.
    """
    bound = [f"{key}={outputs[source]}" for key, source in stage.reads.items()] if outputs is not None else []
    if stage.experiment is not None:
        overrides = [o for o in overrides if not o.strip().startswith("method.")]
    return load_config(stage.experiment or experiment, [*overrides, *stage.overrides, *bound])


READ_SECTIONS: dict[str, tuple[str, ...]] = {
    "teacher": ("dataset", "teacher"),
    "extract": ("dataset", "teacher", "proposals", "store", "model"),
}
"""The config sections a ``teacher`` or ``extract`` stage reads (plus ``method.name``:
EZSD's store holds the ground-truth boxes too). Their keys hash only these, so trials
of a sweep over a method's weight or a training setting share them; every other kind
hashes the whole config."""


def stage_inputs(stage: Stage, unbound: ExperimentConfig) -> str:
    """The hash of what ``stage`` reads of its config: the sections of :data:`READ_SECTIONS`
    for its kind, else the whole config but its ``ignores``."""
    sections = READ_SECTIONS.get(stage.kind)
    if sections is None and not stage.ignores:
        return unbound.content_hash()
    data = unbound.model_dump(mode="json")
    if sections is not None:
        return content_key({name: data[name] for name in sections}, data["method"]["name"])
    for dotted in stage.ignores:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return content_key(data)


def stage_key(stage: Stage, unbound: ExperimentConfig, input_keys: dict[str, str], evaluates: str | None = None) -> str:
    """Content key: kind, function, the config before binding (the sections it reads),
    the keys of what it reads (and, for an ``eval`` stage, the key of the training it
    evaluates)."""
    reads = sorted((key, input_keys[source]) for key, source in stage.reads.items())
    extra = [evaluates] if stage.kind == "eval" else []
    return content_key("recipe-stage", stage.kind, stage.function, stage_inputs(stage, unbound), reads, *extra)


def plan_keys(experiment: str, overrides: Sequence[str] = ()) -> dict[str, str]:
    """Every stage of ``experiment``'s recipe under ``overrides``, by name, with its content
    key: what :func:`run_recipe` would look up, computed without running anything (a
    sweep compares them across trials to find the stages its trials share)."""
    cfg = load_config(experiment, list(overrides))
    stages = build_method(cfg.method).recipe(cfg)
    check_recipe(stages)
    keys: dict[str, str] = {}
    last_train: str | None = None
    for stage in stages:
        keys[stage.name] = stage_key(stage, stage_config(stage, experiment, overrides), keys, last_train)
        if stage.kind == "train":
            last_train = keys[stage.name]
    return keys


def _record_path(cfg: ExperimentConfig, stage: Stage, key: str) -> Path:
    return cfg.work_path(RECIPES_DIR, "stages", f"{stage.kind}-{key}.json")


def _read_record(path: Path) -> StageResult | None:
    """A finished stage's record whose output still exists, else None (the stage runs)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not Path(data["output"]).exists():
        log.warning("recipe record %s names a missing output %s; running the stage again", path, data["output"])
        return None
    return StageResult(**{**data, "skipped": True})


def _write_record(path: Path, result: StageResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in asdict(result).items() if k != "skipped"}, indent=2))
    tmp.replace(path)


def load_function(target: str) -> Callable[[ExperimentConfig, Path], Path]:
    """``"package.module:function"`` -> the function (a post stage's)."""
    module_name, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"post stage function {target!r} cannot be loaded: {err}") from None


def _run_train(stage: Stage, key: str, cfg: ExperimentConfig, parent: str | None) -> StageResult:
    start = time.perf_counter()
    result = train(cfg, parent_run_id=parent)
    if result.metrics is None or result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name!r}: training {result.run_name} stopped at step {result.step}; rerun to continue")
    return StageResult(stage.name, stage.kind, key, str(result.checkpoint), result.metrics.as_dict(),
                       result.mlflow_run_id, time.perf_counter() - start)


def _teacher(cfg: ExperimentConfig, out_dir: Path) -> tuple[Path, dict[str, float]]:
    """The configured teacher made ready; with ``teacher.ln_tuned``, LN-tuned first (EZSD
    stage 1) and its region accuracy before and after tuning measured."""
    from ovdlab.platform.teacher.ln_tuning import ensure_ln_tuned
    from ovdlab.platform.train.trainer import load_training_teacher

    metrics: dict[str, float] = {}
    if cfg.teacher.ln_tuned:
        tuned, metrics = ensure_ln_tuned(cfg)
        teacher, checkpoint = load_training_teacher(cfg, checkpoint=tuned)
    else:
        teacher, checkpoint = load_training_teacher(cfg)
    path = out_dir / "teacher.json"
    path.write_text(json.dumps({"teacher_id": teacher.teacher_id, "digest": teacher.digest,
                                "checkpoint": str(checkpoint) if checkpoint else None, "embed_dim": teacher.embed_dim,
                                "metrics": metrics}))
    return path, metrics


def _extract(cfg: ExperimentConfig, out_dir: Path) -> tuple[Path, dict[str, float]]:
    from ovdlab.platform.pipelines.extract import run_extraction

    summary = run_extraction(cfg, "train")  # resolves a base-crops backbone itself (plan_extraction)
    return Path(summary.store), {}


def _eval(cfg: ExperimentConfig, checkpoint: str, tracker: Tracker) -> tuple[Path, dict[str, float]]:
    """The checkpoint evaluated with ``eval.seeds`` sampling seeds from ``eval.seed`` on:
    each seed's metrics (and ``tied_top_pct``, the boxes whose best class ties another:
    :func:`~ovdlab.platform.evaluation.common.tied_top_pct`) logged at step = its seed, the mean as the stage's metrics and the
    sample standard deviation as ``<metric>_std`` (with one seed, its metrics)."""
    from ovdlab.platform.evaluation.common import tied_top_pct
    from ovdlab.platform.train.evaluate import evaluate_checkpoint

    per_seed: list[dict[str, float]] = []
    for seed in range(cfg.eval.seed, cfg.eval.seed + cfg.eval.seeds):
        seeded = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"seed": seed})})
        output = evaluate_checkpoint(checkpoint, cfg=seeded)
        metrics = {**output.metrics.as_dict(), "tied_top_pct": tied_top_pct(output.results)}
        per_seed.append(metrics)
        tracker.log_metrics({f"seeds/{k}": v for k, v in metrics.items()}, step=seed)
        log.info("eval seed %d: %s", seed, headline(metrics))
    metrics = over_seeds(per_seed)
    tracker.log_metrics(metrics)
    return Path(checkpoint), metrics


def over_seeds(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """Every metric's mean over the seeds, plus ``<metric>_std`` when there are several."""
    if len(per_seed) == 1:
        return dict(per_seed[0])
    out: dict[str, float] = {}
    for key in per_seed[0]:
        out[key], out[f"{key}_std"] = mean_std([m[key] for m in per_seed])
    return out


def _run_step(
    stage: Stage, key: str, cfg: ExperimentConfig, tracker: Tracker, parent: str | None, job: str, checkpoint: str | None
) -> StageResult:
    """A stage other than ``train``, in its own MLflow child run (see ``stages`` for kinds)."""
    start = time.perf_counter()
    out_dir = cfg.work_path(RECIPES_DIR, "outputs", f"{stage.name}-{key}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tags = {"kind": stage.kind, "stage": stage.name, **({"function": stage.function} if stage.function else {})}
    with tracker.start_run(run_name=f"{job}/{stage.name}", tags=tags, parent_run_id=parent) as run_id:
        tracker.log_config(cfg)
        if stage.kind == "post":
            output, metrics = Path(load_function(str(stage.function))(cfg, out_dir)), {}
        elif stage.kind == "teacher":
            output, metrics = _teacher(cfg, out_dir)
            tracker.log_metrics(metrics)
        elif stage.kind == "extract":
            output, metrics = _extract(cfg, out_dir)
        else:
            output, metrics = _eval(cfg, str(checkpoint), tracker)
        tracker.set_tags({"output": str(output)})
    return StageResult(stage.name, stage.kind, key, str(output), metrics, run_id, time.perf_counter() - start)


def stage_hours(results: Sequence[StageResult], configs: dict[str, ExperimentConfig]) -> dict[str, float]:
    """Training minutes and the CPU / GPU hours the stages held: a train stage its Ray
    Train workers (``ray.num_workers`` x ``cpus_per_worker``, a GPU each with
    ``use_gpu``), an extract stage its actor pool, any other stage one CPU."""
    train_s = cpu_s = gpu_s = 0.0
    for result in results:
        ray_cfg = configs[result.name].ray
        if result.kind == "train":
            train_s += result.seconds
            cpu_s += result.seconds * ray_cfg.num_workers * ray_cfg.cpus_per_worker
            gpu_s += result.seconds * ray_cfg.num_workers * float(ray_cfg.use_gpu)
        elif result.kind == "extract":
            cpu_s += result.seconds * ray_cfg.actor_pool_size * ray_cfg.actor_cpus
            gpu_s += result.seconds * ray_cfg.actor_pool_size * ray_cfg.actor_gpus
        else:
            cpu_s += result.seconds
    return {"time/train_minutes": train_s / 60, "time/cpu_hours": cpu_s / 3600, "time/gpu_hours": gpu_s / 3600}


def _parent_run(cfg: ExperimentConfig, stages: Sequence[Stage], job: str) -> tuple[Path, str | None]:
    """The record of this job's parent run (same config, same recipe: the same run)."""
    key = content_key("recipe", cfg.content_hash(), [s.describe() for s in stages])
    path = cfg.work_path(RECIPES_DIR, f"{job}-{key}.json")
    run_id = json.loads(path.read_text()).get("mlflow_run_id") if path.is_file() else None
    return path, run_id


def run_recipe(
    experiment: str,
    overrides: Sequence[str] = (),
    stages: Sequence[Stage] | None = None,
    parent_run_id: str | None = None,
    only: Collection[str] | None = None,
    tags: dict[str, str] | None = None,
    role: str = "job",
) -> RecipeResult:
    """Run the recipe of ``experiment``'s method (or ``stages``) with the job's ``overrides``.

    Every stage's config is loaded (and so checked) before any stage runs.
    ``parent_run_id`` nests the job's MLflow run under another (a sweep's); ``only``
    runs just those stages (a sweep's shared ones, before its trials), keyed as in the
    whole recipe; ``tags`` go on the job's run, named ``<run name>-<role>`` (a sweep's
    ``shared`` and ``trial`` runs are not a standalone job's). The job's run gets the
    minutes and resource hours its stages took (reused ones as they took when they ran):
    ``time/train_minutes``, ``time/cpu_hours``, ``time/gpu_hours`` (:func:`stage_hours`).
    """
    cfg = load_config(experiment, list(overrides))
    stages = list(stages) if stages is not None else build_method(cfg.method).recipe(cfg)
    check_recipe(stages)
    unbound = {s.name: stage_config(s, experiment, overrides) for s in stages}
    job = f"{run_name_for(cfg)}-{role}"
    tracker = tracker_from_config(cfg)
    record, parent_id = _parent_run(cfg, stages, job)
    results: list[StageResult] = []
    last_checkpoint: str | None = None
    last_train_key: str | None = None
    keys: dict[str, str] = {}
    outputs: dict[str, str] = {}
    run_tags = {"kind": "recipe", "method": cfg.method.name, "seed": cfg.seed,
                "stages": ",".join(s.name for s in stages if only is None or s.name in only), **(tags or {})}
    with tracker.start_run(run_name=job, tags=run_tags, run_id=parent_id, parent_run_id=parent_run_id) as parent:
        if parent is not None:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"mlflow_run_id": parent, "experiment": experiment, "overrides": list(overrides)}))
            tracker.log_config(cfg)
        for stage in stages:
            key = keys[stage.name] = stage_key(stage, unbound[stage.name], keys, last_train_key)
            if stage.kind == "train":
                last_train_key = key
            if only is not None and stage.name not in only:
                continue
            path = _record_path(cfg, stage, key)
            result = _read_record(path)
            if result is None:
                log.info("recipe %s: stage %s (%s, key %s)", job, stage.name, stage.kind, key)
                stage_cfg = stage_config(stage, experiment, overrides, outputs)
                if stage.kind == "train":
                    result = _run_train(stage, key, stage_cfg, parent)
                else:
                    result = _run_step(stage, key, stage_cfg, tracker, parent, job, last_checkpoint)
                _write_record(path, result)
            else:
                log.info("recipe %s: stage %s reused (%s)", job, stage.name, result.output)
                tracker.set_tags({f"stage.{stage.name}": f"reused run {result.mlflow_run_id}"})
            result.name = stage.name  # a record written by another recipe names its own stage
            outputs[stage.name] = result.output
            if stage.kind == "train":
                last_checkpoint = result.output
            results.append(result)
        trained, scored = [r for r in results if r.kind == "train"], evaluated(results)
        tracker.log_metrics(stage_hours(results, unbound))
        if scored and only is None:  # a partial recipe (a sweep's shared stages) has no result of its own
            tracker.log_metrics({k: v for k, v in scored[-1].metrics.items() if isinstance(v, (int, float))})
        if trained and scored:
            tracker.set_tags({"final_stage": trained[-1].name, "checkpoint": trained[-1].output,
                              "metrics_stage": scored[-1].name})
    return RecipeResult(job, results, stages, parent, tracker.uri, tracker.experiment)

