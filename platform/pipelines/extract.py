"""Region extraction: images -> proposals -> teacher region embeddings -> region store.

The Ray Data job (docs/architecture.md, "The flow")::

    from_items(image ids not yet in the store)
      -> decode          map_batches, CPU tasks (fractional CPUs)
      -> proposals       map_batches, ActorPoolStrategy(size=ray.actor_pool_size), ray.actor_cpus
                         CPUs (+ ray.actor_gpus GPUs for sources that run a model)
      -> embeddings      map_batches, ActorPoolStrategy(size=ray.actor_pool_size), ray.actor_cpus
                         CPUs + ray.actor_gpus GPUs, the teacher loaded once per actor
      -> write           map_batches, one writer actor: an atomic Parquet part per batch
      -> driver          counts results, then ``finalize`` indexes the store

Fractional CPUs keep every stage schedulable on a 2-core machine (model actors run as
many torch threads as whole CPUs they reserve, at least one: ``workers.torch_threads``);
Ray Data's progress bars show every stage. The same code runs on a cluster when
``ray.address`` points at it (``work_dir`` and the images must then be on shared
storage, as the actors read the images and the writer actor and the driver share the
store folder).

Resume: the store folder is named by the stage's content key (``stages.py``); images
already in a written part or in ``failures`` are not read again, so a rerun after a
crash processes only the rest, and ``finalize`` indexes every image exactly once. A
finished store (``manifest.json`` present) is returned as is.

Bad input never stops the run: a missing, corrupt or truncated image, an image whose
size differs from its annotation, proposals outside the image or with no area, all
travel on as rows with an error, land in the store's ``failures`` table with the stage
and reason, and are counted in the :class:`ExtractionSummary`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from ovdlab.platform.cluster import ensure_ray
from ovdlab.platform.config import ExperimentConfig
from ovdlab.platform.data.catalog import OVDDataset, ensure_dataset, load_dataset
from ovdlab.platform.pipelines import rows as R
from ovdlab.platform.pipelines.stages import StageSpec, check_store_inputs, extraction_stage, images_fingerprint
from ovdlab.platform.pipelines.workers import EmbedBatch, ProposeBatch, WriteBatch, decode_batch
from ovdlab.platform.proposals.base import ProposalSource, build_proposal_source
from ovdlab.platform.proposals.ground_truth import WithGroundTruth
from ovdlab.platform.store.reader import RegionStore, is_complete
from ovdlab.platform.store.schema import Manifest
from ovdlab.platform.store.writer import RegionStoreWriter
from ovdlab.platform.teacher.loading import TINY_MODEL, Teacher, load_teacher

log = logging.getLogger(__name__)

DECODE_CPUS = 0.25
"""CPUs a decode task reserves: PNG/JPEG decoding of a batch is short and single-threaded."""
LIGHT_CPUS = 0.1
"""CPUs reserved by actors that run no model: the writer (it mostly waits on the file
system) and the proposal actors of model-free sources (ground truth, imported files)."""


@dataclass(frozen=True)
class StageResources:
    """Per-worker reservations of the stages (see :func:`fit_resources`)."""

    decode_cpus: float
    propose_cpus: float
    propose_gpus: float
    embed_cpus: float
    embed_gpus: float
    writer_cpus: float


def fit_resources(cfg: ExperimentConfig, needs_model: bool, cluster_cpus: float) -> StageResources:
    """Reservations that let every stage run at once on a cluster of ``cluster_cpus`` CPUs.

    Every actor of every pool must be placed before the stream can flow end to end: an
    actor left pending (the writer, say, after two pools of two 0.5-CPU actors took both
    cores of a 2-core machine) stalls the whole job. Model actors reserve
    ``ray.actor_cpus``; when all reservations together (plus one decode task) exceed the
    cluster, the model actors' share is scaled down to fit. Reservations only steer
    scheduling; each model actor still computes with at least one thread.
    """
    rc = cfg.ray
    propose_cpus = rc.actor_cpus if needs_model else LIGHT_CPUS
    fixed = DECODE_CPUS + LIGHT_CPUS
    model = rc.actor_pool_size * (propose_cpus + rc.actor_cpus)
    scale = 1.0
    if fixed + model > cluster_cpus:
        scale = max(cluster_cpus - fixed, 0.0) / model
        if scale <= 0:
            raise ValueError(f"the Ray cluster has {cluster_cpus} CPUs, too few for the extraction stages")
        log.warning(
            "ray.actor_pool_size=%d x ray.actor_cpus=%.2f does not fit the cluster's %.2f CPUs next to the "
            "decode tasks and the writer; reserving %.3f CPUs per model actor instead",
            rc.actor_pool_size, rc.actor_cpus, cluster_cpus, rc.actor_cpus * scale,
        )
    propose_scaled = propose_cpus * scale if needs_model else propose_cpus
    return StageResources(
        decode_cpus=DECODE_CPUS,
        propose_cpus=propose_scaled,
        propose_gpus=rc.actor_gpus if needs_model else 0.0,
        embed_cpus=rc.actor_cpus * scale,
        embed_gpus=rc.actor_gpus,
        writer_cpus=LIGHT_CPUS,
    )


@dataclass
class ExtractionSummary:
    """What :func:`run_extraction` did.

    ``images``/``regions``/``failures`` count the whole store, ``processed`` the images
    this run handled (0 when ``skipped``: the store was already complete).
    ``startup_seconds`` is the time until the first written part reached the driver
    (actor start, model loading, the first batch through every stage) and
    ``startup_regions`` the regions of that part; both None without Ray work.
    """

    store: Path
    split: str
    key: str
    images: int
    regions: int
    failures: int
    processed: int
    seconds: float
    skipped: bool
    startup_seconds: float | None = None
    startup_regions: int | None = None

    def format(self) -> str:
        state = "complete already, reused" if self.skipped else f"{self.processed} images processed"
        return (
            f"region store {self.store} ({self.split}, key {self.key}): {self.images} images, "
            f"{self.regions} regions, {self.failures} failures; {state} in {self.seconds:.1f} s"
        )


@dataclass
class ExtractionPlan:
    """Everything the stages need, resolved in the driver before any Ray work."""

    cfg: ExperimentConfig
    split: str
    dataset: OVDDataset
    teacher: Teacher
    teacher_checkpoint: Path | None
    source: ProposalSource
    stage: StageSpec

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "dataset": self.cfg.dataset.kind,
            "dataset_root": str(self.cfg.dataset_root()),
            "annotation_file": str(self.dataset.ann_json),
            "split": self.split,
            "proposal_source": self.source.name,
            "proposals": self.stage.inputs["proposals"],
            "teacher_id": self.teacher.teacher_id,
            "teacher_digest": self.teacher.digest,
            "crop": self.cfg.store.crop,
            "content_key": self.stage.key,
            "stage_inputs": self.stage.inputs,
            "annotation_problems": self.dataset.problem_counts(),
        }

    def writer(self) -> RegionStoreWriter:
        return RegionStoreWriter(
            self.stage.path, self.teacher.embed_dim, self.manifest_fields(), extras=self.source.extra_names
        )

    def items(self, image_ids: Sequence[int]) -> list[R.Row]:
        ds = self.dataset
        return [R.item_for(i, str(ds.image_path(i)), ds.image_info(i), ds.annotations(i)) for i in image_ids]


def teacher_checkpoint(cfg: ExperimentConfig) -> Path | None:
    """The pretrained ``shapes-tiny`` checkpoint when the config relies on it (made once), else None.

    With ``ln_tuned`` the pretrained base is still made here, but the checkpoint to load
    is the tuned one, which ``load_teacher`` finds by the base's digest.
    """
    tcfg = cfg.teacher
    if tcfg.model != TINY_MODEL or tcfg.weights or tcfg.pretrained:
        return None
    from ovdlab.platform.teacher.shapes_teacher import ensure_shapes_teacher

    base = ensure_shapes_teacher(cfg)
    return None if tcfg.ln_tuned else base


def plan_extraction(cfg: ExperimentConfig, split: str = "train") -> ExtractionPlan:
    """Resolve dataset, teacher (for its digest), proposal source and the stage key.

    ``model.backbone_weights: base-crops`` is resolved to its file first (an RPN proposal
    source builds the detector), so every caller plans the same store. A method that
    distills its ground-truth boxes too (``Method.distills_ground_truth``: EZSD) gets
    them stored with the source's proposals (:class:`WithGroundTruth`).
    """
    from ovdlab.methods.registry import build_method
    from ovdlab.platform.detector.backbone_pretraining import resolve_backbone_weights

    ensure_dataset(cfg)
    cfg = resolve_backbone_weights(cfg)
    dataset = load_dataset(cfg, split)  # type: ignore[arg-type]
    checkpoint = teacher_checkpoint(cfg)
    teacher = load_teacher(cfg.teacher, cfg.work_path(), "cpu", checkpoint=checkpoint)
    source = build_proposal_source(cfg, dataset, embed_dim=teacher.embed_dim)
    if cfg.proposals.source != "gt" and build_method(cfg.method).distills_ground_truth:
        source = WithGroundTruth(source)
    images = images_fingerprint(dataset.image_dir, (dataset.image_info(i)["file_name"] for i in dataset.image_ids))
    stage = extraction_stage(
        cfg, split, dataset.ann_json, images, teacher.teacher_id, teacher.digest, source.fingerprint()
    )
    return ExtractionPlan(cfg, split, dataset, teacher, checkpoint, source, stage)


def _summary(
    plan: ExtractionPlan,
    manifest: Manifest,
    processed: int,
    start: float,
    skipped: bool,
    startup: tuple[float, int] | None = None,
) -> ExtractionSummary:
    counts = manifest.counts
    return ExtractionSummary(
        store=plan.stage.path,
        split=plan.split,
        key=plan.stage.key,
        images=counts["images"],
        regions=counts["regions"],
        failures=counts["failures"],
        processed=processed,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        startup_seconds=startup[0] if startup else None,
        startup_regions=startup[1] if startup else None,
    )


def _run_ray(
    plan: ExtractionPlan, todo: Sequence[int], writer: RegionStoreWriter
) -> tuple[int, tuple[float, int] | None]:
    """Stream ``todo`` through the Ray Data stages: images written, and (seconds, regions) of the first part."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    cfg = plan.cfg
    rc = cfg.ray
    ensure_ray(cfg)
    DataContext.get_current().enable_progress_bars = True
    res = fit_resources(cfg, plan.source.needs_accelerator, ray.cluster_resources().get("CPU", 0.0))
    gpus_needed = rc.actor_pool_size * (res.propose_gpus + res.embed_gpus)
    if gpus_needed > ray.cluster_resources().get("GPU", 0.0):
        log.warning("the actors ask for %.2f GPUs, the cluster has %s now: they wait until it scales up", gpus_needed, ray.cluster_resources().get("GPU", 0))
    batch = rc.batch_size
    ds = ray.data.from_items(plan.items(todo), override_num_blocks=max(1, math.ceil(len(todo) / batch)))
    ds = ds.map_batches(decode_batch, batch_size=batch, batch_format="numpy", num_cpus=res.decode_cpus)
    ds = ds.map_batches(
        ProposeBatch,
        fn_constructor_args=(plan.source, rc.actor_cpus, res.propose_gpus),
        batch_size=batch,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=rc.actor_pool_size),
        num_cpus=res.propose_cpus,
        num_gpus=res.propose_gpus,
    )
    ds = ds.map_batches(
        EmbedBatch,
        fn_constructor_args=(cfg, plan.teacher_checkpoint, plan.teacher.digest, rc.actor_cpus, res.embed_gpus),
        batch_size=batch,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=rc.actor_pool_size),
        num_cpus=res.embed_cpus,
        num_gpus=res.embed_gpus,
    )
    ds = ds.map_batches(
        WriteBatch,
        fn_constructor_args=(writer,),
        batch_size=cfg.store.rows_per_part,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_cpus=res.writer_cpus,
    )
    start = time.perf_counter()
    written, first = 0, None
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if first is None:
            first = (time.perf_counter() - start, int(out["regions"].sum()))
        written += len(out["image_id"])
    return written, first


def run_extraction(cfg: ExperimentConfig, split: str = "train", plan: ExtractionPlan | None = None) -> ExtractionSummary:
    """Fill (or resume, or reuse) the region store of ``split`` with the Ray Data pipeline.

    ``plan`` (from :func:`plan_extraction` with the same arguments) skips planning again.
    """
    start = time.perf_counter()
    plan = plan or plan_extraction(cfg, split)
    root = plan.stage.path
    if is_complete(root):
        manifest = Manifest.load(root)
        check_store_inputs(root, manifest.fields.get("stage_inputs"), plan.stage.inputs)
        log.info("region store %s is complete; reusing it", root)
        return _checked(_summary(plan, manifest, 0, start, skipped=True))
    writer = plan.writer()
    done = writer.done_image_ids()
    todo = [i for i in plan.dataset.image_ids if i not in done]
    log.info("extracting %d of %d %s images into %s (%d done before)", len(todo), len(plan.dataset), split, root, len(done))
    processed, startup = _run_ray(plan, todo, writer) if todo else (0, None)
    manifest = writer.finalize()
    summary = _summary(plan, manifest, processed, start, skipped=False, startup=startup)
    log.info("%s", summary.format())
    return _checked(summary)


def _checked(summary: ExtractionSummary) -> ExtractionSummary:
    """Fail when every image failed: a store with no regions is a broken input (a proposal
    checkpoint that does not load, a missing image folder), not a result to train on."""
    if summary.images == 0 and summary.failures > 0:
        first = RegionStore(summary.store).failures()[0]
        raise RuntimeError(
            f"region store {summary.store}: all {summary.failures} {summary.split} images failed, e.g. image "
            f"{first.image_id} at stage {first.stage}: {first.error} (every error is in the store's failures table)"
        )
    return summary


def extract_in_process(
    cfg: ExperimentConfig,
    split: str = "train",
    root: Path | None = None,
    plan: ExtractionPlan | None = None,
    image_ids: Sequence[int] | None = None,
) -> ExtractionSummary:
    """The same stages as :func:`run_extraction` in a plain loop in this process (no Ray).

    For comparison (``jobs/bench_extract.py``) and debugging; writes to ``root`` when
    given instead of the stage's folder, with the same batch size and teacher;
    ``image_ids`` restricts it to those images (a store of a subset must then go to
    its own ``root``).
    """
    start = time.perf_counter()
    plan = plan or plan_extraction(cfg, split)
    if root is not None:
        plan = replace(plan, stage=replace(plan.stage, path=Path(root)))
    writer = plan.writer()
    done = writer.done_image_ids()
    wanted = plan.dataset.image_ids if image_ids is None else image_ids
    todo = [i for i in wanted if i not in done]
    batch, part = cfg.ray.batch_size, cfg.store.rows_per_part
    pending: list[R.Row] = []
    processed = 0
    for lo in tqdm(range(0, len(todo), batch), desc=f"extract {split} (in process)", unit="batch", disable=not todo):
        rows = R.decode_rows(plan.items(todo[lo : lo + batch]))
        rows = R.propose_rows(plan.source, rows)
        pending += R.embed_rows(plan.teacher, cfg.store.crop, cfg.teacher.batch_size, rows)
        if len(pending) >= part or lo + batch >= len(todo):
            processed += len(R.write_rows(writer, pending))
            pending = []
    manifest = writer.finalize()
    return _checked(_summary(plan, manifest, processed, start, skipped=False))
