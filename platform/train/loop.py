"""The one training loop every method shares, run by each Ray Train worker.

Methods customise training only through their plugin (the RoI head's classifier and
losses, ``methods/``); the loop is the platform's: data, optimisation, mixed
precision, gradient clipping, periodic evaluation, checkpoints, resume and logging.

Per step (the torchvision detection references' ``train_one_epoch``): a batch of
resized, flipped images with base-class targets (and stored distillation regions when
the method distills) -> ``model(images, targets)`` -> the sum of the loss dict ->
backward under ``torch.autocast`` (``train.amp``: float16 with a ``GradScaler`` on GPU,
bfloat16 on a CPU with native bfloat16 arithmetic) -> optional gradient-norm
clipping -> optimizer and per-iteration LR scheduler step.

Every ``eval_period`` steps and at the end, rank 0 evaluates on the validation split
with the full vocabulary (base + novel) while the other ranks wait at the report.
Every ``checkpoint_period`` steps, at each evaluation and at the end, the state is
reported to Ray Train (``ray.train.report``, a barrier every rank reaches the same
number of times) with a checkpoint written by rank 0 only; Ray Train keeps the latest,
which the job reports: the final model, as papers report it, so that model selection
never looks at the novel classes (choosing the checkpoint with the best novel AP50 on
the evaluation split would leak them into it). A restarted worker group (Ray's
``FailureConfig`` retries) or a rerun of the same run name finds the latest
checkpoint in ``ray.train.get_checkpoint()`` and continues from its step.

A run is one training phase of a method. It may start from the model weights of an
earlier phase's checkpoint (``train.init_from``; only when it has no checkpoint of its
own to resume) and freeze named parts (``train.freeze``,
:mod:`~ovdlab.platform.train.freezing`). The order matters: model -> resumed or initial
weights -> freezing -> DDP wrap and optimizer, which both see only the parameters that
still train; the frozen parts' BatchNorm layers are put back in eval mode after every
switch to training mode.

Losses of every step go to MLflow from rank 0 only, batched every ``LOG_PERIOD``
steps, into the job's single run (the tracker handed over by the driver already has
it open). At each of those flushes rank 0 prints one progress line (step, loss, steps/s,
ETA) to its stdout, which Ray forwards to the driver's console. Images skipped because
they cannot be decoded -- in training and in evaluation -- are counted in the reported
metrics and listed in the run's ``problems/`` artifacts. The same loop runs in-process
(:class:`LocalSession`) for benchmarks and debugging.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from mlflow.entities import Metric
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ovdlab.methods.base import Vocabulary
from ovdlab.methods.registry import build_method
from ovdlab.platform.config import ExperimentConfig, build_config, calibrate
from ovdlab.platform.data.catalog import OVDDataset, load_dataset
from ovdlab.platform.data.images import ImageDecodeError
from ovdlab.platform.detector.backbone_pretraining import resolve_backbone_weights
from ovdlab.platform.detector.data import DetectionDataset, collate_fn, targets_to
from ovdlab.platform.detector.model import OVDDetector, build_detector
from ovdlab.platform.progress import format_seconds
from ovdlab.platform.tracking import Tracker
from ovdlab.platform.train.checkpoint import (
    load_init_weights,
    load_model_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from ovdlab.platform.train.evaluate import EvalOutput, evaluate_model
from ovdlab.platform.train.freezing import freeze, set_train_mode
from ovdlab.platform.train.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

LOSS_PREFIX = "loss"
"""Terms of the loss dict that are summed into the loss; any other entry (a method's
diagnostic, e.g. a KL value or a noise MSE) is logged with them, never optimised."""
LOG_PERIOD = 20
"""Steps between MLflow writes (each write carries every step's losses)."""
UNTIMED_STEPS = 3
"""First steps of a (re)started loop left out of the throughput figures (allocator, caches)."""
MAX_BAD_IMAGES_IN_A_ROW = 16
EVAL_SKIP_SCORING = (
    "no detections: an undecodable validation image stays in the ground truth, so its boxes count as "
    "missed (false negatives) and lower recall and AP"
)


@dataclass
class LoopArgs:
    """What the driver hands every worker (``train_loop_config`` of the TorchTrainer).

    ``text_path``: a ``torch.save`` file with the training and evaluation text banks
    (``{"train": {"names", "class_ids", "embeddings"}, "eval": {...}}``) prepared on the
    driver. ``store_path``: the region store with distillation targets, or None.
    ``tracker``: the driver's tracker with the job's run open (rank 0 logs into it).
    ``stop_at``: end this fit after that step's checkpoint (a job with a time slot; a
    run already past it does nothing); rerunning without it continues from there.
    """

    cfg: dict[str, Any]
    text_path: str
    store_path: str | None = None
    tracker: Tracker | None = None
    stop_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopArgs":
        return cls(**data)


@dataclass
class LoopSummary:
    """What one run of the loop did (returned in-process; reported to Ray as metrics)."""

    start_step: int
    end_step: int
    losses: list[float] = field(default_factory=list)
    timed_steps: int = 0
    step_seconds: float = 0.0
    data_seconds: float = 0.0
    last_metrics: dict[str, float] = field(default_factory=dict)
    skipped_images: list[str] = field(default_factory=list)

    @property
    def steps_per_second(self) -> float:
        return self.timed_steps / self.step_seconds if self.step_seconds > 0 else float("nan")

    @property
    def data_fraction(self) -> float:
        return self.data_seconds / self.step_seconds if self.step_seconds > 0 else float("nan")


class Session(Protocol):
    """Where the loop runs: rank, device, checkpoints to resume from, reporting."""

    rank: int
    world_size: int

    def device(self, cfg: ExperimentConfig) -> torch.device: ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def checkpoint(self) -> Any: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


class RaySession:
    """A Ray Train worker: ``ray.train`` context, DDP through ``prepare_model``."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    def device(self, cfg: ExperimentConfig) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """The loop run plainly in this process: one rank, checkpoints kept under ``storage``.

    Checkpoints are folders ``storage/checkpoint_<step>``; the latest is resumed from,
    as Ray Train does for a rerun of the same run name.
    """

    rank = 0
    world_size = 1

    def __init__(self, storage: Path | str) -> None:
        self.storage = Path(storage)
        self.reports: list[dict[str, Any]] = []

    def device(self, cfg: ExperimentConfig) -> torch.device:
        return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def latest(self) -> Path | None:
        found = sorted(self.storage.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
        return found[-1] if found else None

    @contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        yield self.latest()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = self.storage / f"checkpoint_{int(metrics['step']):07d}"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(checkpoint_dir, dest)


class _SkipUndecodable(Dataset):
    """Training items; an image that cannot be decoded is replaced by the next one.

    The replacement keeps batches full and every rank's step count equal (DDP needs
    both); a run of undecodable files longer than ``MAX_BAD_IMAGES_IN_A_ROW`` means a
    broken dataset and raises, naming the last file. Each item carries the errors of the
    images skipped for it (``(image, target, errors)``), so the loop can count them
    whether the item was made in this process or in a loader worker.
    """

    def __init__(self, inner: DetectionDataset, length: int | None = None) -> None:
        self.inner = inner
        self.length = len(inner) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> Any:
        errors: list[str] = []
        for offset in range(MAX_BAD_IMAGES_IN_A_ROW):
            try:
                image, target = self.inner[(idx + offset) % len(self.inner)]
                return image, target, errors
            except ImageDecodeError as err:
                log.warning("training skips an undecodable image: %s", err)
                errors.append(str(err))
        raise RuntimeError(f"{MAX_BAD_IMAGES_IN_A_ROW} undecodable training images in a row; last: {errors[-1]}")


def _collate_with_skips(batch: list[tuple[Any, Any, list[str]]]) -> tuple[list[Any], list[Any], list[str]]:
    """:func:`collate_fn` of the images and targets, plus the batch's skipped-image errors."""
    images, targets = collate_fn([(image, target) for image, target, _ in batch])
    return images, targets, [err for _, _, errors in batch for err in errors]


def load_text_banks(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``{"train": ..., "eval": ...}`` banks written by the driver (see :class:`LoopArgs`)."""
    banks = torch.load(Path(path), map_location="cpu", weights_only=True)
    for split in ("train", "eval"):
        if split not in banks or "embeddings" not in banks[split]:
            raise ValueError(f"{path}: text bank file lacks the {split!r} bank")
    if "teacher_logit_scale" not in banks:
        raise ValueError(f"{path}: text bank file lacks the teacher's logit scale (written by an older ovdlab; "
                         "rerun the training's preparation)")
    return banks


def build_model(cfg: ExperimentConfig, embed_dim: int, classes: Vocabulary | None = None) -> OVDDetector:
    """The detector with the configured method's head (vocabulary not yet set).

    ``classes``: the evaluation vocabulary (names, novel mask), which a method head with
    a parameter per class sizes itself by. ``model.backbone_weights: base-crops`` becomes
    its cached file here too (the driver normally resolved it already), so a config
    loaded by hand builds the same model.
    """
    return build_detector(resolve_backbone_weights(cfg).model, build_method(cfg.method), embed_dim, classes)


def banks_vocabularies(banks: dict[str, Any]) -> tuple[Vocabulary, Vocabulary]:
    """(training, evaluation) vocabularies of the driver's text banks.

    A class of the training bank listed under ``pseudo`` is trained from pseudo-labels
    only (``train.pseudo_labels``): it stays novel in both vocabularies, since it never
    had a ground-truth box. Every other training class is known; any other evaluation
    class is novel.
    """
    pseudo = set(banks["train"].get("pseudo", []))
    names = list(banks["train"]["names"])
    train = Vocabulary(banks["train"]["embeddings"].float(), torch.tensor([n in pseudo for n in names]), tuple(names))
    known = [n for n in names if n not in pseudo]
    return train, Vocabulary.against(banks["eval"]["embeddings"].float(), banks["eval"]["names"], known)


def checkpoint_classes(meta: dict[str, Any], embed_dim: int) -> Vocabulary | None:
    """The evaluation classes a checkpoint's model was built with (placeholder embeddings),
    from its ``eval_classes`` and ``train_classes`` (the known ones); None in older
    checkpoints without them."""
    names = list(meta.get("eval_classes", []))
    if not names:
        return None
    return Vocabulary.against(torch.zeros(len(names), embed_dim), names, list(meta.get("train_classes", [])))


def total_loss(loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the ``loss*`` terms (see :data:`LOSS_PREFIX`); diagnostics are left out."""
    return sum(v for k, v in loss_dict.items() if k.startswith(LOSS_PREFIX))  # type: ignore[return-value]


def _train_loader(
    cfg: ExperimentConfig, dataset: OVDDataset, class_ids: list[int], store_path: str | None, session: Session
) -> tuple[DataLoader, DistributedSampler]:
    pseudo = None
    if cfg.train.pseudo_labels is not None:
        from ovdlab.platform.data.pseudo_labels import load_pseudo_labels

        pseudo = load_pseudo_labels(cfg.train.pseudo_labels).by_image
    store = None
    if store_path is not None:
        from ovdlab.platform.store.reader import RegionStore

        store = RegionStore(store_path)
    data = DetectionDataset(
        dataset, class_ids, train=True, min_size=cfg.model.min_size, max_size=cfg.model.max_size,
        store=store, max_distill=cfg.train.distill_per_image, distill_order=cfg.train.distill_order, pseudo_labels=pseudo,
    )
    if cfg.train.batch_size % session.world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} (the total over workers) is not divisible by "
            f"ray.num_workers={session.world_size}"
        )
    per_worker = cfg.train.batch_size // session.world_size
    items = _SkipUndecodable(data, _filled_to_one_batch(len(data), cfg.train.batch_size, dataset.ann_json))
    sampler = DistributedSampler(
        items, num_replicas=session.world_size, rank=session.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    workers = cfg.train.loader_workers
    loader = DataLoader(
        items,
        batch_size=per_worker,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate_with_skips,
        drop_last=True,
        pin_memory=torch.cuda.is_available() and cfg.ray.use_gpu,
        persistent_workers=workers > 0,
    )
    return loader, sampler


def _filled_to_one_batch(images: int, batch_size: int, source: str | Path) -> int:
    """How many items an epoch has: the training images, or one batch of them repeated.

    A phase can train on fewer images than a batch (LP-OVOD's probe sees only the images
    that hold a retrieved pseudo-label, and a small ``method.retrieval_k`` may put them all
    on one image), so those images fill the batch instead of the phase failing; no image
    at all is an error naming the source.
    """
    if images == 0:
        raise ValueError(f"{source} has no training images (for a phase on pseudo-labels: the retrieval kept none)")
    if images < batch_size:
        log.warning("%s has %d training images, fewer than one batch of %d: they repeat to fill it",
                    source, images, batch_size)
    return max(images, batch_size)


def _batches(loader: DataLoader, sampler: DistributedSampler, epoch: int) -> Iterator[Any]:
    """Endless batches, reshuffled every epoch (``set_epoch`` as DistributedSampler asks)."""
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def autocast_dtype(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision type of ``train.amp`` on ``device``, or None for float32.

    GPU: float16 autocast with a ``GradScaler``, as the torchvision detection references'
    ``--amp`` (float16 keeps more mantissa than bfloat16 for box coordinates in the
    hundreds of pixels). CPU: bfloat16, only where the CPU computes it natively
    (AVX512-BF16 or AMX; oneDNN's convolutions then run about 1.4 times faster with
    channels-last weights, ``docs/benchmarks.md``, "Schedule"); elsewhere emulated
    bfloat16 would be slower than float32, so the CPU stays in float32. Autocast runs
    only convolutions and matrix products in the low precision; box coding, losses and
    the optimizer stay float32.
    """
    if not cfg.train.amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return torch.bfloat16
    return None


def _log_losses(tracker: Tracker | None, rows: list[tuple[int, dict[str, float]]]) -> None:
    """Every buffered step's losses in one MLflow write (rank 0's tracker only)."""
    if tracker is None or not tracker.enabled or not rows or tracker.active_run_id is None:
        return
    now = int(time.time() * 1000)
    metrics = [Metric(f"train/{k}", v, now, step) for step, values in rows for k, v in values.items()]
    tracker.client.log_batch(tracker.active_run_id, metrics=metrics)


def _unwrap(model: nn.Module) -> OVDDetector:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # type: ignore[return-value]


def load_start_state(raw: OVDDetector, cfg: ExperimentConfig, session: Session) -> dict[str, Any] | None:
    """Load the weights this phase starts from; returns the trainer state to resume, or None.

    The phase's own latest checkpoint wins (an interrupted phase continues with its
    weights, optimizer, schedule and step); only a phase starting afresh takes the
    model weights of ``train.init_from``, with step 0 and a new optimizer and schedule.
    """
    with session.checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            raw.load_state_dict(load_model_checkpoint(ckpt_dir, cfg=cfg).state_dict)
            return load_trainer_state(ckpt_dir)
    if cfg.train.init_from is not None:
        load_init_weights(raw, cfg.train.init_from, cfg)
        log.info("rank %d starts from the weights of %s", session.rank, cfg.train.init_from)
    return None


def run_loop(args: LoopArgs, session: Session) -> LoopSummary:
    """Train from the latest checkpoint (or ``train.init_from``, or scratch) to ``train.max_iter``
    (see module doc)."""
    banks = load_text_banks(args.text_path)
    cfg = calibrate(build_config(args.cfg), float(banks["teacher_logit_scale"]))
    tcfg = cfg.train
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(cfg.seed + session.rank)
    device = session.device(cfg)
    rank0 = session.rank == 0
    tracker = args.tracker if rank0 else None

    train_vocab, eval_vocab = banks_vocabularies(banks)
    embed_dim = int(train_vocab.embeddings.shape[1])
    raw = build_model(cfg, embed_dim, eval_vocab)
    raw.set_vocabulary(train_vocab)
    meta = {
        "embed_dim": embed_dim,
        "train_classes": [n for n, novel in zip(train_vocab.names, train_vocab.is_novel.tolist()) if not novel],
        "pseudo_classes": [n for n, novel in zip(train_vocab.names, train_vocab.is_novel.tolist()) if novel],
        "eval_classes": list(banks["eval"]["names"]),
        "teacher_id": str(banks.get("teacher_id", "")),
        "teacher_digest": str(banks.get("teacher_digest", "")),
        "teacher_checkpoint": str(banks.get("teacher_checkpoint", "")),
    }

    trainer_state = load_start_state(raw, cfg, session)
    frozen_norms = freeze(raw, tcfg.freeze)
    amp_dtype = autocast_dtype(cfg, device)
    raw.to(device, memory_format=torch.channels_last if amp_dtype == torch.bfloat16 else torch.preserve_format)
    model = session.prepare_model(raw)
    optimizer = build_optimizer(raw, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        scaler.load_state_dict(trainer_state["scaler"])
        start = int(trainer_state["step"])
        log.info("rank %d resumes at step %d", session.rank, start)
    summary = LoopSummary(start_step=start, end_step=start)
    end = tcfg.max_iter if args.stop_at is None else min(args.stop_at, tcfg.max_iter)
    progress = _Progress(rank0, start, end, tcfg.max_iter)
    if start >= end:
        return summary

    train_set = load_dataset(cfg, "train")
    base_ids = [int(i) for i in banks["train"]["class_ids"]]
    loader, sampler = _train_loader(cfg, train_set, base_ids, args.store_path, session)
    val_set = load_dataset(cfg, "val") if rank0 else None

    batches = _batches(loader, sampler, epoch=start // max(1, len(loader)))
    params = [p for p in raw.parameters() if p.requires_grad]
    pending: list[tuple[int, dict[str, torch.Tensor]]] = []
    set_train_mode(model, frozen_norms)
    progress.restart_clock()
    for step in range(start, end):
        t0 = time.perf_counter()
        images, targets, skipped = next(batches)
        summary.skipped_images.extend(skipped)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = targets_to(targets, device)
        t_data = time.perf_counter() - t0
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_dict = model(images, targets)
        loss = total_loss(loss_dict)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tcfg.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        done = step + 1
        if step - start >= UNTIMED_STEPS:
            summary.timed_steps += 1
            summary.step_seconds += time.perf_counter() - t0
            summary.data_seconds += t_data
        record = {k: v.detach() for k, v in loss_dict.items()}
        record["total_loss"] = loss.detach()
        record["lr"] = torch.tensor(lr)
        pending.append((done, record))

        evaluate_now = done == tcfg.max_iter or (tcfg.eval_period > 0 and done % tcfg.eval_period == 0)
        save_now = evaluate_now or done % tcfg.checkpoint_period == 0 or done == end
        if done % LOG_PERIOD == 0 or save_now:
            rows = _flush(pending, summary)
            pending = []
            _log_losses(tracker, rows)
            progress.step(done, rows[-1][1]["total_loss"], lr)
        if save_now:
            metrics: dict[str, Any] = {"step": done}
            results = None
            if evaluate_now and rank0 and val_set is not None:
                progress.say(f"step {done}: evaluating {len(val_set)} {val_set.ann_json.name} images with all classes")
                t_eval = time.perf_counter()
                out = evaluate_model(cfg, _unwrap(model), val_set, eval_vocab, progress=False)
                set_train_mode(model, frozen_norms)
                results = out.results
                metrics.update(out.metrics.as_dict())
                metrics["eval_skipped_images"] = len(out.skipped)
                summary.last_metrics = out.metrics.as_dict()
                _log_eval(tracker, out, done)
                progress.say(f"step {done}: {json.dumps(out.metrics.as_dict())} ({time.perf_counter() - t_eval:.0f} s)")
            metrics.update({
                "steps_per_second": summary.steps_per_second, "data_fraction": summary.data_fraction,
                "loss": summary.losses[-1], "train_skipped_images": len(summary.skipped_images),
            })
            metrics = _finite(metrics)
            _checkpoint_and_report(session, cfg, raw, meta, optimizer, scheduler, scaler, done, metrics, results)
            summary.end_step = done
    _log_train_skips(tracker, summary)
    return summary


class _Progress:
    """Rank 0's progress lines: ``step 40/300 (13%)  loss 1.234  lr 0.02  0.9 steps/s  ETA 4m50s``.

    Written to stdout rather than logged: Ray forwards a worker's stdout to the driver's
    console, where the user waits, whatever logging the worker process has set up. Not
    with ``print``, which Ray Train V2 patches in its workers to log and also echo each
    line, so every line reached the console twice.
    """

    def __init__(self, enabled: bool, start: int, end: int, total: int) -> None:
        self.enabled, self.start, self.end, self.total = enabled, start, end, total
        self.t0 = time.perf_counter()
        if start:
            done = ": nothing left to train" if start >= end else ""
            self.say(f"resuming at step {start}/{total}{done}")

    def restart_clock(self) -> None:
        """Steps per second count from the first step, not from loading the data."""
        self.t0 = time.perf_counter()

    def say(self, message: str) -> None:
        if self.enabled:
            sys.stdout.write(f"[ovdlab train] {message}\n")
            sys.stdout.flush()

    def step(self, done: int, loss: float, lr: float) -> None:
        rate = (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.end - done) / rate if rate > 0 else float("nan")
        self.say(
            f"step {done}/{self.total} ({100 * done / self.total:.0f}%)  loss {loss:.4f}  lr {lr:.5f}  "
            f"{rate:.2f} steps/s  ETA {format_seconds(eta)}"
        )


def _log_eval(tracker: Tracker | None, out: EvalOutput, step: int) -> None:
    """Validation metrics at ``step``; skipped images counted and listed with how they were scored."""
    if tracker is None:
        return
    tracker.log_metrics({f"val/{k}": v for k, v in out.metrics.as_dict().items()}, step=step)
    tracker.log_metrics({"problems/eval_skipped_images": len(out.skipped)}, step=step)
    if out.skipped:
        tracker.log_dict(
            {"scored_as": EVAL_SKIP_SCORING, "images": out.skipped}, f"problems/eval_skipped_images_step{step}.json"
        )


def _log_train_skips(tracker: Tracker | None, summary: LoopSummary) -> None:
    """Training images replaced because they could not be decoded, with their errors."""
    if tracker is None:
        return
    tracker.log_metrics({"problems/train_skipped_images": len(summary.skipped_images)}, step=summary.end_step)
    if summary.skipped_images:
        tracker.log_dict(
            {"from_step": summary.start_step, "to_step": summary.end_step, "errors": summary.skipped_images},
            f"problems/train_skipped_images_steps{summary.start_step}-{summary.end_step}.json",
        )


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics safe to persist: NaN (an AP without ground truth, no timed step yet) does
    not survive Ray Train's JSON round trip, so it is dropped."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}


def _flush(pending: list[tuple[int, dict[str, torch.Tensor]]], summary: LoopSummary) -> list[tuple[int, dict[str, float]]]:
    """Buffered step records as floats (one device sync per flush); raise on a non-finite
    loss, naming the step and every loss term (detectron2's ``FloatingPointError`` check,
    made at each flush instead of each step to spare the device syncs)."""
    rows = [(step, {k: float(v) for k, v in values.items()}) for step, values in pending]
    for step, values in rows:
        if not math.isfinite(values["total_loss"]):
            raise FloatingPointError(f"loss became {values['total_loss']} at step {step}: {values}")
        summary.losses.append(values["total_loss"])
    return rows


def _checkpoint_and_report(
    session: Session,
    cfg: ExperimentConfig,
    raw: OVDDetector,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    step: int,
    metrics: dict[str, Any],
    results: list[dict[str, Any]] | None,
) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray Train's report is a barrier)."""
    if session.rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="ovdlab-ckpt-") as tmp:
        save_checkpoint(
            Path(tmp),
            cfg,
            {k: v.detach().cpu() for k, v in raw.state_dict().items()},
            {**meta, "step": step},
            trainer_state={
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
            },
            results=results,
            metrics={k: float(v) for k, v in metrics.items()},
        )
        session.report(metrics, Path(tmp))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The ``TorchTrainer`` entry point: :func:`run_loop` in the worker's Ray Train session."""
    run_loop(LoopArgs.from_dict(config), RaySession())


def run_in_process(args: LoopArgs, storage: Path | str) -> tuple[LoopSummary, LocalSession]:
    """:func:`run_loop` in this process, checkpoints under ``storage`` (benchmarks, debugging)."""
    session = LocalSession(storage)
    return run_loop(args, session), session
