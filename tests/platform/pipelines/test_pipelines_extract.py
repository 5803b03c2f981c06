"""Extraction pipeline end to end on a small shapes world: failures, equivalence, reuse, resume.

The teacher is ``shapes-tiny`` with random weights (``pretrained=random``): the pipeline
is what is tested, not the teacher's quality, and pretraining would cost minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ovdlab.platform.config import ExperimentConfig, load_config
from ovdlab.platform.pipelines import extract_in_process, plan_extraction, run_extraction
from ovdlab.platform.store import RegionStore

TRAIN_IMAGES = 40
BASE_OVERRIDES = [
    f"dataset.shapes.train_images={TRAIN_IMAGES}",
    "dataset.shapes.val_images=4",
    "teacher.pretrained=random",
    "tracking.enabled=false",
    "ray.batch_size=8",
    "store.rows_per_part=8",
]


def _config(work: Path, *overrides: str) -> ExperimentConfig:
    return load_config(None, [f"work_dir={work}", *BASE_OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    """One generated shapes world shared by the tests (copied where a test changes it)."""
    work = tmp_path_factory.mktemp("shapes-work")
    from ovdlab.platform.data.catalog import ensure_dataset

    return ensure_dataset(_config(work))


def _same_stores(a: Path, b: Path) -> None:
    sa, sb = RegionStore(a), RegionStore(b)
    assert sa.image_ids.tolist() == sb.image_ids.tolist()
    assert sa.manifest.extras == sb.manifest.extras
    for image_id in sa.image_ids.tolist():
        ra, rb = sa.get(image_id), sb.get(image_id)
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
        np.testing.assert_array_equal(ra.scores, rb.scores)
        np.testing.assert_allclose(ra.embeddings.astype(np.float32), rb.embeddings.astype(np.float32), atol=1e-3)
        for name in sa.manifest.extras:
            np.testing.assert_allclose(ra.extras[name], rb.extras[name], rtol=1e-5)


@pytest.fixture(scope="module")
def broken_world(shapes_root, tmp_path_factory):
    """A copy of the world with a corrupt, a truncated and a missing image, plus a proposal
    file (the ground truth, score 1) in which one image has a box outside the image."""
    root = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(shapes_root, root)
    ann = json.loads((root / "annotations/train.json").read_text())
    images = {img["id"]: img for img in ann["images"]}
    ids = sorted(images)
    corrupt, truncated, missing, bad_box = ids[3], ids[11], ids[20], ids[30]
    folder = root / "images/train"
    (folder / images[corrupt]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    data = (folder / images[truncated]["file_name"]).read_bytes()
    (folder / images[truncated]["file_name"]).write_bytes(data[: len(data) // 2])
    (folder / images[missing]["file_name"]).unlink()
    proposals: dict[str, list[list[float]]] = {str(i): [] for i in ids}
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        proposals[str(a["image_id"])].append([x, y, x + w, y + h, 1.0])
    proposals[str(bad_box)].append([100.0, 100.0, 190.0, 150.0, 0.5])  # the image is 128 x 128
    prop_file = root / "proposals.json"
    prop_file.write_text(json.dumps(proposals))
    overrides = [
        "dataset.kind=coco",
        f"dataset.root={root}",
        "dataset.train_json=annotations/train.json",
        "dataset.val_json=annotations/val.json",
        "dataset.shapes=null",
        "proposals.source=file",
        f"proposals.file={prop_file}",
    ]
    expected = {corrupt: ("decode", "cannot decode"), truncated: ("decode", "cannot decode"),
                missing: ("decode", "file not found"), bad_box: ("proposals", "outside the 128x128 image")}
    return overrides, expected


def _check_failures(summary, expected) -> None:
    assert not summary.skipped
    assert summary.failures == len(expected) and summary.images == TRAIN_IMAGES - len(expected)
    assert summary.processed == TRAIN_IMAGES
    store = RegionStore(summary.store)
    assert set(store.image_ids.tolist()).isdisjoint(expected)
    failures = {f.image_id: f for f in store.failures()}
    assert set(failures) == set(expected)
    for image_id, (stage, reason) in expected.items():
        assert failures[image_id].stage == stage and reason in failures[image_id].error
        assert failures[image_id].path.endswith(f"{image_id:06d}.png")
    assert store.manifest.fields["proposal_source"] == "file"
    assert summary.regions == sum(store.num_regions(i) for i in store.image_ids.tolist()) > 0


def test_bad_images_become_failures_in_process(broken_world, tmp_path):
    overrides, expected = broken_world
    summary = extract_in_process(_config(tmp_path / "work", *overrides), "train")
    _check_failures(summary, expected)
    assert "4 failures" in summary.format()


def test_a_store_where_every_image_failed_is_an_error_naming_one(broken_world, tmp_path):
    """Nothing to train on is not a result: e.g. a proposal checkpoint that does not load
    fails every image; the error says how, instead of a training on an empty store."""
    overrides, _ = broken_world
    (tmp_path / "empty").mkdir()
    cfg = _config(tmp_path / "work", *overrides, f"dataset.train_images={tmp_path / 'empty'}")
    with pytest.raises(RuntimeError, match=rf"all {TRAIN_IMAGES} train images failed, e.g. image \d+ at stage "
                                           r"decode: .*file not found"):
        extract_in_process(cfg, "train")


@pytest.mark.slow
def test_ray_pipeline_records_failures_matches_the_loop_and_is_reused(ray_local, broken_world, tmp_path):
    overrides, expected = broken_world
    cfg = _config(tmp_path / "work", *overrides)
    summary = run_extraction(cfg, "train")
    _check_failures(summary, expected)
    assert summary.store == cfg.work_path("stores", f"train-{summary.key}")
    assert summary.startup_seconds is not None and 0 < summary.startup_seconds <= summary.seconds

    loop = extract_in_process(cfg, "train", root=tmp_path / "loop")
    assert (loop.images, loop.failures, loop.regions) == (summary.images, summary.failures, summary.regions)
    _same_stores(summary.store, tmp_path / "loop")

    again = run_extraction(cfg, "train")
    assert again.skipped and again.processed == 0 and again.store == summary.store
    assert "reused" in again.format()


def test_stage_key_follows_inputs(shapes_root, tmp_path):
    work = tmp_path / "work"
    root = f"dataset.root={shapes_root}"
    base = plan_extraction(_config(work, root), "train").stage
    assert plan_extraction(_config(work, root, "store.rows_per_part=3"), "train").stage.key == base.key
    assert plan_extraction(_config(work, root, "proposals.anchor_stride=8"), "train").stage.key == base.key  # gt ignores it
    assert plan_extraction(_config(work, root, "store.crop=1x+1.5x"), "train").stage.key != base.key
    assert plan_extraction(_config(work, root), "val").stage.key != base.key
    clip = plan_extraction(_config(work, root, "proposals.source=clip"), "train").stage
    assert clip.key != base.key
    assert plan_extraction(_config(work, root, "proposals.source=clip", "proposals.anchor_stride=8"), "train").stage.key != clip.key


def test_clip_proposals_store_their_confidence(shapes_root, tmp_path):
    cfg = _config(
        tmp_path / "work", f"dataset.root={shapes_root}", "proposals.source=clip", "proposals.per_image=5",
        "proposals.anchor_sizes=[32,64]", "proposals.anchor_ratios=[1.0]", "proposals.drop_base_iou=0.3",
    )
    summary = extract_in_process(cfg, "val")
    store = RegionStore(summary.store)
    assert summary.images == 4 and summary.failures == 0
    assert store.manifest.extras == ["confidence"]
    for image_id in store.image_ids.tolist():
        r = store.get(image_id)
        assert 0 < len(r.scores) <= 5 and r.embeddings.shape == (len(r.scores), store.embed_dim)
        assert (r.extras["confidence"] > 0).all() and (r.extras["confidence"] <= 1).all()


_CHILD = """
import sys
from ovdlab.platform.config import load_config
from ovdlab.platform.pipelines import run_extraction
run_extraction(load_config(None, sys.argv[1:]), "train")
"""


def _wait_for_idle_cluster(ray, timeout: float = 60.0) -> None:
    """Until the killed driver's actors are gone and their CPUs are free again."""
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.time() + timeout
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < total:
        time.sleep(0.2)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_store(ray_local, shapes_root, tmp_path):
    overrides = [f"dataset.root={shapes_root}", "store.rows_per_part=4", "ray.batch_size=4"]
    cfg = _config(tmp_path / "work", *overrides)
    address = ray_local.get_runtime_context().gcs_address
    parts = cfg.work_path("stores")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, f"work_dir={cfg.work_dir}", *BASE_OVERRIDES, *overrides, f"ray.address={address}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None and not list(parts.glob("*/parts/part-*.parquet")):
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
    written = list(parts.glob("*/parts/part-*.parquet"))
    assert written, "the child wrote no part before it was stopped"
    assert not list(parts.glob("*/manifest.json")), "the child finished before it could be interrupted"
    _wait_for_idle_cluster(ray_local)

    resumed = run_extraction(cfg, "train")
    assert 0 < resumed.processed < TRAIN_IMAGES
    assert resumed.images == TRAIN_IMAGES and resumed.failures == 0
    assert RegionStore(resumed.store).manifest.counts["duplicates"] == 0
    store = RegionStore(resumed.store)
    assert store.image_ids.tolist() == list(range(1, TRAIN_IMAGES + 1))  # every image exactly once

    reference = extract_in_process(_config(tmp_path / "other", *overrides), "train")
    assert reference.images == TRAIN_IMAGES and reference.key == resumed.key
    _same_stores(resumed.store, reference.store)


def test_cli_extract_reports_the_store(shapes_root, tmp_path, capsys):
    from ovdlab.platform.cli import build_parser, main

    overrides = [f"work_dir={tmp_path / 'work'}", *BASE_OVERRIDES, f"dataset.root={shapes_root}"]
    args = build_parser().parse_args(["extract", "datasets/shapes", *overrides, "--split", "val"])
    assert args.split == "val" and args.overrides == overrides
    done = extract_in_process(load_config("datasets/shapes", overrides), "val")  # same key: the CLI reuses it
    assert main(["extract", "datasets/shapes", *overrides, "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert str(done.store) in out and "4 images" in out and "reused" in out
    assert main(["extract", "datasets/shapes", "proposals.source=nope"]) == 2
    assert "proposals.source" in capsys.readouterr().err


def _total(res, pool: int) -> float:
    return res.decode_cpus + res.writer_cpus + pool * (res.propose_cpus + res.embed_cpus)


def test_reservations_fit_a_two_core_machine(tmp_path):
    from ovdlab.platform.pipelines.extract import LIGHT_CPUS, fit_resources

    cfg = _config(tmp_path, "ray.actor_pool_size=2", "ray.actor_cpus=0.5")
    light = fit_resources(cfg, needs_model=False, cluster_cpus=2)
    assert light.propose_cpus == LIGHT_CPUS and light.embed_cpus == 0.5 and _total(light, 2) <= 2
    heavy = fit_resources(cfg, needs_model=True, cluster_cpus=2)  # 2 x (0.5 + 0.5) + decode + writer > 2
    assert _total(heavy, 2) == pytest.approx(2.0) and heavy.propose_cpus == heavy.embed_cpus < 0.5
    big = fit_resources(cfg, needs_model=True, cluster_cpus=16)
    assert big.embed_cpus == big.propose_cpus == 0.5
    gpu = fit_resources(_config(tmp_path, "ray.actor_gpus=0.5"), needs_model=False, cluster_cpus=2)
    assert gpu.embed_gpus == 0.5 and gpu.propose_gpus == 0
    with pytest.raises(ValueError, match="too few"):
        fit_resources(cfg, needs_model=True, cluster_cpus=0.3)


def test_changed_images_make_a_new_store_and_a_contradicting_store_is_refused(shapes_root, tmp_path):
    """The bad-input probe: after images were repaired (same annotation file) the old store
    with its old failures was reused. Now the images' fingerprint is in the key, and a
    finished store whose manifest records other inputs is refused."""
    from ovdlab.platform.pipelines.stages import StoreMismatchError

    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    cfg = _config(tmp_path / "work", f"dataset.root={root}")
    first = extract_in_process(cfg, "train")
    again = run_extraction(cfg, "train")  # complete: reused without any Ray work
    assert again.skipped and again.store == first.store

    image = sorted((root / "images" / "train").iterdir())[5]
    image.write_bytes(image.read_bytes())  # "repaired": same name, new file
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    repaired = plan_extraction(cfg, "train").stage
    assert repaired.key != first.key and repaired.path != first.store
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert plan_extraction(_config(tmp_path / "work", f"dataset.root={moved}"), "train").stage.key != first.key

    manifest_path = first.store / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["stage_inputs"]["images"]["count"] == TRAIN_IMAGES
    assert manifest["annotation_problems"] == {}
    manifest["stage_inputs"]["crop"] = "1.2x-square"  # a folder edited by hand or written by other code
    manifest_path.write_text(json.dumps(manifest))
    unchanged = plan_extraction(cfg, "train")
    at_old_key = replace(unchanged, stage=replace(unchanged.stage, key=first.key, path=first.store))
    with pytest.raises(StoreMismatchError, match="crop: store has '1.2x-square', request has 'plain'"):
        run_extraction(cfg, "train", plan=at_old_key)
