"""A recipe job's command line: ``python jobs/<method>_<dataset>.py [--smoke] [overrides]``.

Every job script is this one function over its experiment config, so the scripts stay a
few lines and behave alike: dotted overrides, the recipe run by the platform's runner
(a rerun skips finished stages and resumes an interrupted one), each stage reported with
its headline metrics, errors as one line.

``--smoke`` (COCO and LVIS jobs) runs the job end to end on a laptop: a few generated
images in the real dataset's layout (:mod:`ovdlab.platform.data.layout_fixtures`: real
category ids and names, the real converters and file names), the ``shapes-tiny``
teacher with random weights instead of CLIP, a small ResNet-18 detector and a few steps
per stage, under ``<work_dir>/data/<kind>-smoke`` and an MLflow experiment of its own.
Every other setting is the job's.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ovdlab.platform.cli import run_reporting_errors
from ovdlab.platform.config import load_config
from ovdlab.platform.recipes.runner import run_recipe

SMOKE_OVERRIDES = [
    "teacher.model=shapes-tiny", "teacher.pretrained=random", "teacher.batch_size=32",
    "model.backbone=resnet18", "model.backbone_weights=null", "model.fpn_channels=16",
    "model.representation_size=64", "model.min_size=64", "model.max_size=96",
    "model.anchor_sizes=[16,32,64,128,256]", "model.rpn_pre_nms_top_n=100", "model.rpn_post_nms_top_n=50",
    "model.rpn_batch_size_per_image=64", "model.roi_batch_size_per_image=32",
    "proposals.per_image=20", "store.rows_per_part=64",
    "train.max_iter=4", "train.batch_size=2", "train.optimizer=sgd", "train.lr=0.01", "train.steps=[1000]",
    "train.warmup_iters=2", "train.checkpoint_period=2", "train.eval_period=0", "train.grad_clip=1.0",
    "train.distill_per_image=8", "eval.batch_size=4", "eval.vis_images=2",
    "ray.num_workers=1", "ray.use_gpu=false", "ray.cpus_per_worker=0.5", "ray.actor_cpus=0.5",
    "ray.actor_gpus=0", "ray.actor_pool_size=1", "ray.batch_size=4",
]
"""What ``--smoke`` changes besides the dataset (see the module doc)."""


def smoke_overrides(experiment: str, overrides: list[str]) -> list[str]:
    """Write the smoke fixture of ``experiment``'s dataset kind and return the overrides
    that point the job at it (the job's own ``overrides`` still apply after them)."""
    from ovdlab.platform.data.layout_fixtures import write_coco_layout, write_lvis_layout

    cfg = load_config(experiment, overrides)
    kind = cfg.dataset.kind
    writers = {"coco": write_coco_layout, "lvis": write_lvis_layout}
    if kind not in writers:
        raise ValueError(f"--smoke is for the COCO and LVIS jobs; {experiment} uses dataset.kind={kind!r}")
    root = cfg.work_path("data", f"{kind}-smoke")
    if not (root / "annotations").is_dir():
        writers[kind](root)
    return [f"dataset.root={root}", *SMOKE_OVERRIDES, f"tracking.experiment={kind}-smoke"]


def run_job(experiment: str, argv: list[str], description: str) -> int:
    """Parse ``[--smoke] [overrides]``, run ``experiment``'s recipe, print what it did."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="run end to end on a generated fixture in this dataset's layout")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. seed=1 train.max_iter=300")
    args = parser.parse_args(argv)

    def main() -> int:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        overrides = [*smoke_overrides(experiment, args.overrides), *args.overrides] if args.smoke else args.overrides
        result = run_recipe(experiment, overrides)
        print("\n".join(result.report_lines()))
        print(f"MLflow: {result.tracking_uri}  experiment {result.experiment!r}")
        return 0

    return run_reporting_errors(main, Path(experiment).name)
