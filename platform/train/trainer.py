"""Training jobs: data, teacher and text banks on the driver, the loop on Ray Train workers.

:func:`train` is one method's training and evaluation, as ``ovdlab train`` and the jobs
run it:

1. On the driver: the dataset (the shapes world is generated when missing), the
   teacher (``shapes-tiny`` pretrained once), the text banks -- base classes for
   training, every class for evaluation, under the method's prompt recipe, cached in
   the work dir -- and, for a method that distills, the region store
   (:func:`~ovdlab.platform.pipelines.extract.run_extraction`).
2. One MLflow run for the job (:func:`~ovdlab.platform.tracking.tracker_from_config`):
   created on the first fit, its id written beside the Ray run
   (``<work_dir>/runs/<run name>/ovdlab_run.json``) and reopened by every rerun, so a
   resumed job never makes a second run. Params = the resolved config.
3. ``TorchTrainer(train_loop_per_worker)`` with ``ScalingConfig`` from ``ray.*``
   (workers, GPU per worker, CPUs per worker), ``RunConfig(storage_path=<work_dir>/runs,
   name=<run name>)``, ``CheckpointConfig`` keeping the latest checkpoint, and
   ``FailureConfig(max_failures)``: a failed worker group restarts from the latest
   checkpoint. Rerunning with the same run name and storage path resumes the same way.
4. The final checkpoint -- the last one, never one chosen by a metric, so that model
   selection never sees the novel classes -- has its stored validation results scored
   again on the driver and
   logged with the per-class table, plots and detection pictures
   (:func:`~ovdlab.platform.evaluation.reporting.log_evaluation`); its weights and
   config are logged as the run's ``checkpoint/`` artifacts for ``ovdlab predict --run``.

The run name is ``tracking.run_name`` or ``<method>-<dataset>-<config hash>``:
rerunning an unchanged config resumes it; a changed config is a new run.

Before the trainer starts, the driver checks every file the workers will read
(:func:`check_worker_inputs`): a missing one is one clear error, not a traceback from
each retried worker. Annotations the dataset skipped or clipped are recorded in the run
(``problems/*`` metrics and the ``problems/annotations_<split>.json`` tables).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ovdlab.platform.cluster import ensure_ray
from ovdlab.platform.config import ExperimentConfig, calibrate
from ovdlab.platform.data.catalog import OVDDataset, ensure_dataset, load_dataset
from ovdlab.platform.data.images import load_image
from ovdlab.platform.detector.backbone_pretraining import resolve_backbone_weights
from ovdlab.platform.evaluation import evaluate
from ovdlab.platform.evaluation.coco_eval import SplitMetrics
from ovdlab.platform.evaluation.lvis_eval import LVISMetrics
from ovdlab.platform.evaluation.reporting import grid_detections, log_evaluation
from ovdlab.platform.teacher.loading import Teacher
from ovdlab.platform.tracking import Tracker, tracker_from_config
from ovdlab.platform.train.checkpoint import CONFIG_FILE, MODEL_FILE, RESULTS_FILE, load_results
from ovdlab.platform.train.loop import LoopArgs, LoopSummary, run_in_process, train_loop_per_worker

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
RUN_INFO = "ovdlab_run.json"
TEXT_BANKS = "text_banks.pt"
DEFAULT_MAX_FAILURES = 2


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``completed`` is False when the fit stopped before ``train.max_iter`` (``stop_at``);
    ``checkpoint`` is the latest checkpoint (the final model when completed), ``metrics``
    its validation metrics (None when not completed), ``results_path`` its COCO results.
    """

    run_name: str
    run_dir: Path
    mlflow_run_id: str | None
    tracking_uri: str
    experiment: str
    completed: bool
    step: int
    checkpoint: Path | None
    metrics: SplitMetrics | LVISMetrics | None
    results_path: Path | None


@dataclass
class Prepared:
    """Inputs of the loop made on the driver; ``datasets`` by split, as the driver read them;
    ``cfg``: the config the workers get (``model.backbone_weights: base-crops`` resolved
    to its file, the method calibrated to the teacher)."""

    cfg: ExperimentConfig
    text_path: Path
    store_path: Path | None
    train_classes: list[str]
    eval_classes: list[str]
    datasets: dict[str, OVDDataset]


def run_name_for(cfg: ExperimentConfig) -> str:
    """``tracking.run_name`` or ``<method>[-oracle]-<dataset>-<8 hex of the config hash>``.

    Readable in the MLflow runs table (``-oracle`` marks a run trained on every class,
    the ceiling), and stable: an unchanged config resumes its run.
    """
    oracle = "-oracle" if cfg.train.vocabulary == "all" else ""
    return cfg.tracking.run_name or f"{cfg.method.name}{oracle}-{cfg.dataset.kind}-{cfg.content_hash()[:8]}"


def run_dir_for(cfg: ExperimentConfig) -> Path:
    """Where Ray Train keeps this run's checkpoints: ``<work_dir>/runs/<run name>``."""
    return cfg.work_path(RUNS_DIR, run_name_for(cfg))


def load_training_teacher(
    cfg: ExperimentConfig, device: str = "cpu", checkpoint: Path | None = None
) -> tuple[Teacher, Path | None]:
    """The configured teacher and the checkpoint file it came from (None: found by config).

    Without ``checkpoint``, ``shapes-tiny`` is pretrained once on the shapes world first
    (:func:`~ovdlab.platform.pipelines.extract.teacher_checkpoint`); with it, that file
    is loaded as is (the teacher a detector was trained with).
    """
    from ovdlab.platform.pipelines.extract import teacher_checkpoint
    from ovdlab.platform.teacher.loading import load_teacher

    if checkpoint is None:
        checkpoint = teacher_checkpoint(cfg)
    return load_teacher(cfg.teacher, cfg.work_path(), device, checkpoint=checkpoint), checkpoint


def _bank_entry(teacher: Teacher, dataset: OVDDataset, ids: list[int], recipe: str, cache: Path) -> dict[str, Any]:
    from ovdlab.platform.teacher.prompts import cached_text_bank

    names_by_id = {int(c["id"]): str(c["name"]) for c in dataset.categories}
    names = [names_by_id[i] for i in ids]
    bank = cached_text_bank(teacher, names, recipe, cache)
    return {"names": names, "class_ids": list(ids), "embeddings": bank.embeddings.float().contiguous()}


def prepare_training(cfg: ExperimentConfig, run_dir: Path) -> Prepared:
    """Dataset, teacher, text banks (written to ``run_dir/text_banks.pt``), region store;
    the method's temperature or logit scale left to the teacher is set from its learned
    logit scale here (:func:`~ovdlab.platform.config.calibrate`), so the workers and the
    logged config carry the number."""
    from ovdlab.methods.registry import build_method

    ensure_dataset(cfg)
    cfg = resolve_backbone_weights(cfg)
    train_set, val_set = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    train_ids = training_classes(cfg, train_set)
    teacher, teacher_file = load_training_teacher(cfg)
    cfg = calibrate(cfg, teacher.logit_scale)
    cache = cfg.work_path("text_banks")
    recipe = cfg.teacher.prompt
    train_bank = _bank_entry(teacher, train_set, train_ids, recipe, cache)
    pseudo_ids = pseudo_label_classes(cfg, val_set, train_ids)
    if pseudo_ids:
        pseudo = _bank_entry(teacher, val_set, pseudo_ids, recipe, cache)
        train_bank = {
            "names": train_bank["names"] + pseudo["names"],
            "class_ids": train_bank["class_ids"] + pseudo["class_ids"],
            "embeddings": torch.cat([train_bank["embeddings"], pseudo["embeddings"]]),
        }
    train_bank["pseudo"] = train_bank["names"][len(train_ids):]
    banks = {
        "train": train_bank,
        "eval": _bank_entry(teacher, val_set, list(val_set.category_ids), recipe, cache),
        "teacher_id": teacher.teacher_id,
        "teacher_digest": teacher.digest,
        "teacher_logit_scale": teacher.logit_scale,
        "teacher_checkpoint": str(teacher_file) if teacher_file is not None else "",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    text_path = run_dir / TEXT_BANKS
    torch.save(banks, text_path)
    store_path = None
    if build_method(cfg.method).needs_store:
        from ovdlab.platform.pipelines.extract import run_extraction

        store_path = run_extraction(cfg, "train").store
    datasets = {"train": train_set, "val": val_set}
    return Prepared(cfg, text_path, store_path, banks["train"]["names"], banks["eval"]["names"], datasets)


def training_classes(cfg: ExperimentConfig, train_set: OVDDataset) -> list[int]:
    """Category ids trained on: the base classes, or every class for the oracle (``train.vocabulary=all``).

    The oracle is refused on a training file without novel boxes: it would train the
    novel classes as background and report a "ceiling" below the real one.
    """
    if cfg.train.vocabulary == "base":
        if not train_set.base_ids:
            raise ValueError(f"{train_set.ann_json} has no base categories to train on")
        return list(train_set.base_ids)
    novel = set(train_set.novel_ids)
    if not any(a["category_id"] in novel for i in train_set.image_ids for a in train_set.annotations(i)):
        raise ValueError(
            f"train.vocabulary=all (the oracle) needs novel boxes in {train_set.ann_json}, which has none; "
            f"on shapes set dataset.shapes.oracle=true"
        )
    return list(train_set.category_ids)


def pseudo_label_classes(cfg: ExperimentConfig, val_set: OVDDataset, train_ids: list[int]) -> list[int]:
    """Category ids that ``train.pseudo_labels`` adds to the training vocabulary (none
    without a file): its classes, which must be evaluated categories (the validation
    file lists every class) not already trained with ground-truth boxes."""
    if cfg.train.pseudo_labels is None:
        return []
    from ovdlab.platform.data.pseudo_labels import load_pseudo_labels

    labels = load_pseudo_labels(cfg.train.pseudo_labels)
    unknown = sorted(set(labels.categories) - set(val_set.category_ids))
    if unknown:
        raise ValueError(f"train.pseudo_labels={cfg.train.pseudo_labels} names category ids {unknown} "
                         f"that {val_set.ann_json} does not have")
    return [cid for cid in val_set.category_ids if cid in labels.categories and cid not in train_ids]


def check_worker_inputs(prepared: Prepared) -> None:
    """Every file a training worker reads exists and is named by an absolute path.

    Workers run in their own folders (Ray Train V2 starts them in the run's artifacts
    directory), so a relative path would resolve elsewhere there; a missing file would
    fail each retried worker group with the same traceback.
    """
    needed: dict[str, Path] = {"text bank": prepared.text_path}
    for split, dataset in prepared.datasets.items():
        needed[f"{split} annotations"] = dataset.ann_json
        needed[f"{split} images"] = dataset.image_dir
    if prepared.store_path is not None:
        needed["region store manifest"] = prepared.store_path / "manifest.json"
    if prepared.cfg.train.init_from is not None:
        needed["train.init_from checkpoint"] = Path(prepared.cfg.train.init_from)
    if prepared.cfg.train.pseudo_labels is not None:
        needed["train.pseudo_labels file"] = Path(prepared.cfg.train.pseudo_labels)
    relative = [f"{what}: {path}" for what, path in needed.items() if not Path(path).is_absolute()]
    if relative:
        raise ValueError("training inputs must be absolute paths (load the config with load_config): " + "; ".join(relative))
    missing = [f"{what}: {path}" for what, path in needed.items() if not Path(path).exists()]
    if missing:
        raise FileNotFoundError("training inputs missing before the trainer starts: " + "; ".join(missing))


def log_dataset_problems(tracker: Tracker, datasets: dict[str, OVDDataset]) -> None:
    """Skipped and clipped annotations per split: counts as metrics, the rows as tables."""
    if not tracker.enabled:
        return
    counts: dict[str, float] = {}
    for split, dataset in datasets.items():
        by_kind = dataset.problem_counts()
        counts[f"problems/{split}_annotations_skipped"] = len(dataset.problems)
        counts.update({f"problems/{split}_{kind}": n for kind, n in by_kind.items()})
        if by_kind:
            tracker.log_dict({"skipped": dataset.problems, "clipped": dataset.clipped},
                             f"problems/annotations_{split}.json")
    tracker.log_metrics(counts)


def build_trainer(cfg: ExperimentConfig, args: LoopArgs, run_name: str, max_failures: int = DEFAULT_MAX_FAILURES):
    """The ``TorchTrainer`` of a run: scaling from ``ray.*``, the latest checkpoint kept;
    inside a sweep trial, its evaluations reported to Tune (:mod:`ovdlab.platform.tune.reporting`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ovdlab.platform.tune.reporting import tune_callbacks

    resources: dict[str, float] = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1.0
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=args.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(cfg.work_path(RUNS_DIR)),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=tune_callbacks(),
        ),
    )


def _read_run_info(run_dir: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    path = run_dir / RUN_INFO
    if not path.is_file():
        return {}
    info = json.loads(path.read_text())
    if info.get("config_hash") != cfg.content_hash():
        raise ValueError(
            f"run {run_dir.name!r} in {run_dir.parent} was started with config hash {info.get('config_hash')}, "
            f"this config hashes to {cfg.content_hash()}; resuming would mix two configs. "
            f"Give this config another tracking.run_name (or restore the original config)."
        )
    return info


def _write_run_info(run_dir: Path, cfg: ExperimentConfig, tracker: Tracker, run_id: str | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"config_hash": cfg.content_hash(), "mlflow_run_id": run_id, "tracking_uri": tracker.uri,
            "experiment": tracker.experiment}
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=1))


def _vis_images(dataset: OVDDataset, count: int) -> tuple[list[int], list[Any]]:
    ids, images = [], []
    for image_id in dataset.image_ids:
        if len(ids) >= count:
            break
        try:
            images.append(load_image(dataset.image_path(image_id)))
        except ValueError as err:
            log.warning("detection picture skips image %s: %s", image_id, err)
            continue
        ids.append(image_id)
    return ids, images


def report_checkpoint(
    cfg: ExperimentConfig, checkpoint: Path, tracker: Tracker, step: int | None = None
) -> tuple[SplitMetrics | LVISMetrics, Path]:
    """Score an evaluated checkpoint's stored results and log them with tables and pictures."""
    results = load_results(checkpoint)
    if results is None:
        raise FileNotFoundError(f"{checkpoint / RESULTS_FILE} missing: this checkpoint was not evaluated during training")
    val_set = load_dataset(cfg, "val")
    metrics = evaluate(cfg.dataset.kind, val_set.ann_json, results)
    ids, images = _vis_images(val_set, cfg.eval.vis_images)
    detections = grid_detections(results, val_set.categories, ids)
    log_evaluation(cfg, metrics, tracker=tracker, images=images, detections=detections, step=step,
                   titles=[f"image {i}" for i in ids])
    if tracker.enabled and tracker.active_run_id is not None:
        tracker.log_artifact(checkpoint / RESULTS_FILE, "eval")
        for name in (MODEL_FILE, CONFIG_FILE):
            tracker.log_artifact(checkpoint / name, "checkpoint")
        tracker.set_tags({"checkpoint": str(checkpoint)})
    return metrics, checkpoint / RESULTS_FILE


def train(
    cfg: ExperimentConfig,
    stop_at: int | None = None,
    max_failures: int = DEFAULT_MAX_FAILURES,
    parent_run_id: str | None = None,
) -> TrainResult:
    """Train and evaluate one method through Ray Train (see module doc); resumable by rerunning.

    ``stop_at`` ends the fit after that step's checkpoint (the job is then not
    completed and skips the final evaluation); a later call continues the run.
    ``parent_run_id``: the MLflow run this training's new run is a child of (a recipe's
    job run); a resumed run keeps the parent it was created with.
    """
    if stop_at is not None and not 0 < stop_at <= cfg.train.max_iter:
        raise ValueError(f"stop_at must lie in 1..train.max_iter={cfg.train.max_iter}, got {stop_at}")
    name = run_name_for(cfg)
    run_dir = run_dir_for(cfg)
    info = _read_run_info(run_dir, cfg)
    tracker = tracker_from_config(cfg)
    prepared = prepare_training(cfg, run_dir)
    check_worker_inputs(prepared)
    ensure_ray(cfg)
    tags = {"run_name": name, "kind": "train"}
    with tracker.start_run(run_name=name, tags=tags, run_id=info.get("mlflow_run_id"), parent_run_id=parent_run_id) as run_id:
        _write_run_info(run_dir, cfg, tracker, run_id)
        tracker.log_config(prepared.cfg)
        log_dataset_problems(tracker, prepared.datasets)
        log.info("training %s: checkpoints under %s, MLflow run %s in %s", name, run_dir, run_id, tracker.uri)
        args = LoopArgs(
            cfg=prepared.cfg.model_dump(mode="json"),
            text_path=str(prepared.text_path),
            store_path=str(prepared.store_path) if prepared.store_path else None,
            tracker=tracker,
            stop_at=stop_at,
        )
        result = build_trainer(cfg, args, name, max_failures).fit()
        step = int((result.metrics or {}).get("step", 0))
        completed = step >= cfg.train.max_iter
        last = Path(result.checkpoint.path) if result.checkpoint is not None else None
        metrics, results_path = None, None
        if completed and last is not None:
            metrics, results_path = report_checkpoint(cfg, last, tracker, step=step)
        tracker.set_tags({"completed": completed, "step": step, "reported_checkpoint": "last"})
    return TrainResult(
        run_name=name,
        run_dir=run_dir,
        mlflow_run_id=run_id,
        tracking_uri=tracker.uri,
        experiment=tracker.experiment,
        completed=completed,
        step=step,
        checkpoint=last,
        metrics=metrics,
        results_path=results_path,
    )


def train_in_process(cfg: ExperimentConfig, storage: Path, tracker: Tracker | None = None) -> LoopSummary:
    """The same loop without Ray Train, in this process (benchmarks, debugging, tests).

    Checkpoints go to ``storage``; ``tracker`` (with a run open) receives the losses.
    """
    storage = Path(storage)
    prepared = prepare_training(cfg, storage)
    args = LoopArgs(
        cfg=prepared.cfg.model_dump(mode="json"),
        text_path=str(prepared.text_path),
        store_path=str(prepared.store_path) if prepared.store_path else None,
        tracker=tracker,
    )
    summary, _ = run_in_process(args, storage)
    return summary
