"""Benchmark of the training path: Ray Train overhead and data-loading stalls, side by side.

Two figures, measured in one run on the same config, data, region store and threads:

1. Steps/s of the shared loop under ``TorchTrainer`` with one worker, divided by
   steps/s of the very same loop run plainly in this process (target >= 0.9).
2. Fraction of step time spent waiting for the next batch -- image decoding, resizing
   and reading the distillation regions from the region store -- with distillation
   targets on (ViLD, ``method.distill_weight`` > 0) (target < 5%).

Steps/s are steady-state figures from inside the loop (the first steps of every fit,
and the time spent in evaluation and checkpoints, are left out); start-up is printed
separately as wall time. The two ways alternate (in-process, Ray, in-process, Ray, ...)
and the ratio is the median of the per-round ratios, so that a drift in machine load
hits both alike and one disturbed round does not decide the figure.

    python jobs/bench_train.py                       # shapes world, ViLD with GT-box regions
    python jobs/bench_train.py ray.cpus_per_worker=1 train.loader_workers=2
    python jobs/bench_train.py ray.use_gpu=true proposals.source=clip
    python jobs/bench_train.py --steps 8 --rounds 1   # a smoke run (the figures need the defaults)
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

from ovdlab.platform.cli import run_reporting_errors
from ovdlab.platform.config import ExperimentConfig, load_config
from ovdlab.platform.train.loop import LoopArgs, run_in_process
from ovdlab.platform.cluster import ensure_ray
from ovdlab.platform.train.trainer import build_trainer, prepare_training

CONFIG = "experiments/vild_text_shapes"
# Throughput does not depend on the teacher's weights: a deterministic random shapes-tiny
# spares its pretraining; the region store and text banks have the real shapes and sizes.
BENCH_OVERRIDES = [
    "teacher.pretrained=random",
    "method.name=vild",
    "method.distill_weight=0.5",
    "proposals.source=gt",
    "store.crop=1x+1.5x",
    "train.eval_period=0",
    "tracking.enabled=false",
]
STEPS = 40
"""Steps per fit; each fit stops there (``stop_at``), before the schedule's final evaluation."""
ROUNDS = 3
TARGET_RATIO = 0.9
TARGET_DATA_FRACTION = 0.05


def in_process(args: LoopArgs, storage: Path) -> tuple[float, float, float]:
    """(steps/s, data fraction, wall s) of the loop run plainly here."""
    shutil.rmtree(storage, ignore_errors=True)
    start = time.perf_counter()
    summary, _ = run_in_process(args, storage)
    return summary.steps_per_second, summary.data_fraction, time.perf_counter() - start


def under_ray(cfg: ExperimentConfig, args: LoopArgs, name: str) -> tuple[float, float, float]:
    """(steps/s, data fraction, wall s) of the same loop in a one-worker ``TorchTrainer``."""
    shutil.rmtree(cfg.work_path("runs", name), ignore_errors=True)
    one = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_workers": 1})})
    start = time.perf_counter()
    result = build_trainer(one, args, name, max_failures=0).fit()
    wall = time.perf_counter() - start
    shutil.rmtree(cfg.work_path("runs", name), ignore_errors=True)
    return float(result.metrics["steps_per_second"]), float(result.metrics["data_fraction"]), wall


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per fit (at least 4: the first 3 are untimed)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating in-process / TorchTrainer rounds")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. ray.cpus_per_worker=1")
    args = parser.parse_args(argv)
    if args.steps < 4 or args.rounds < 1:
        parser.error("--steps must be at least 4 and --rounds at least 1")
    return args


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(CONFIG, BENCH_OVERRIDES + opts.overrides)
    bench_dir = cfg.work_path("bench_train")
    prepared = prepare_training(cfg, bench_dir)
    args = LoopArgs(
        cfg=cfg.model_dump(mode="json"),
        text_path=str(prepared.text_path),
        store_path=str(prepared.store_path) if prepared.store_path else None,
        stop_at=min(opts.steps, cfg.train.max_iter),
    )
    ensure_ray(cfg)

    local, ray_runs = [], []
    for i in range(opts.rounds):
        local.append(in_process(args, bench_dir / "in_process"))
        ray_runs.append(under_ray(cfg, args, f"bench-train-{i}"))
        print(f"round {i + 1}: in-process {local[-1][0]:.3f} steps/s, TorchTrainer {ray_runs[-1][0]:.3f} steps/s")

    def mean(rows: list[tuple[float, float, float]], k: int) -> float:
        return statistics.mean(r[k] for r in rows)

    ratio = statistics.median(on_ray[0] / here[0] for on_ray, here in zip(ray_runs, local))
    data_frac = mean(ray_runs, 1)
    store = "on" if prepared.store_path else "OFF"
    print()
    print(f"config: {cfg.method.name}, distillation regions {store}, {args.stop_at} steps x batch "
          f"{cfg.train.batch_size}, {cfg.model.min_size}px, loader_workers={cfg.train.loader_workers}, "
          f"{int(cfg.ray.cpus_per_worker)} thread(s), {'GPU' if cfg.ray.use_gpu else 'CPU'}")
    print(f"{'':34s}{'in-process':>12s}{'TorchTrainer':>14s}")
    print(f"{'steps/s (steady state)':34s}{mean(local, 0):12.3f}{mean(ray_runs, 0):14.3f}")
    print(f"{'data wait / step time':34s}{mean(local, 1):12.2%}{data_frac:14.2%}")
    print(f"{'wall time per fit (s, incl. start)':34s}{mean(local, 2):12.1f}{mean(ray_runs, 2):14.1f}")
    print()
    print(f"1. TorchTrainer / in-process steps/s = {ratio:.3f}, median of {opts.rounds} rounds  (target >= {TARGET_RATIO}) "
          f"{'OK' if ratio >= TARGET_RATIO else 'MISSED'}")
    print(f"2. data wait fraction under TorchTrainer = {data_frac:.2%}  (target < {TARGET_DATA_FRACTION:.0%}) "
          f"{'OK' if data_frac < TARGET_DATA_FRACTION else 'MISSED'}")
    shutil.rmtree(bench_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(lambda: main(sys.argv[1:]), "bench_train"))
