"""Benchmark of the detector's FPN RoIAlign on CPU: torchvision's kernel against the gather.

Two figures, measured side by side in one run on the same model, batches and threads:

1. Training step time (forward, backward, AdamW) of the shapes detector with
   torchvision's ``MultiScaleRoIAlign`` divided by the same step with
   :class:`~ovdlab.platform.detector.roi_align.GatherMultiScaleRoIAlign` (target >= 1.2).
2. The pooler alone, forward + backward on the step's feature maps and sampled RoIs:
   the same ratio, and the largest difference of their outputs and gradients (the
   gather computes torchvision's values; float32 rounding only).

The step is the shapes training's (``experiments/vild_text_shapes``: R18-FPN, 128 px,
batch 8, 64 RoIs per image, bfloat16 autocast where the CPU has it, ``train.amp``) on
random images with 1-6 random boxes each: speed does not depend on what the images
show. The two poolers alternate round by round and the ratio is the median of the
per-round ratios, so that machine load hits both alike.

    python jobs/bench_roi_align.py
    python jobs/bench_roi_align.py --steps 4 --rounds 1      # a smoke run (the figures need the defaults)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from ovdlab.methods.base import Vocabulary
from ovdlab.platform.cli import run_reporting_errors
from ovdlab.platform.config import load_config
from ovdlab.platform.detector.model import OVDDetector
from ovdlab.platform.detector.roi_align import GatherMultiScaleRoIAlign
from ovdlab.platform.train.loop import autocast_dtype, build_model, total_loss
from ovdlab.platform.train.schedule import build_optimizer

CONFIG = "experiments/vild_text_shapes"
STEPS = 12
"""Timed steps per pooler and round, after one untimed warm-up step."""
ROUNDS = 3
TARGET_STEP_RATIO = 1.2
EMBED_DIM = 64
BASE_CLASSES = 12

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


def random_batch(batch_size: int, size: int, generator: torch.Generator) -> Batch:
    """Images and 1-6 boxes of 8-64 px with base labels each, as the shapes world draws them."""
    images = [torch.rand(3, size, size, generator=generator) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, 7, (1,), generator=generator))
        wh = 8 + torch.rand(n, 2, generator=generator) * 56
        xy = torch.rand(n, 2, generator=generator) * (size - wh)
        labels = torch.randint(1, BASE_CLASSES + 1, (n,), generator=generator)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    return images, targets


def build(threads: int) -> tuple[OVDDetector, torch.optim.Optimizer, torch.dtype | None, int, int]:
    """The shapes detector (random weights) and its optimizer as the training loop builds them
    (``build_model``, ``build_optimizer``: fused AdamW, no decay on 1-d parameters), its
    autocast type, batch and image size."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # No teacher here (random text embeddings): a fixed temperature, which step time does not depend on.
    cfg = load_config(CONFIG, ["model.backbone_weights=null", "method.temperature=0.06"])
    model = build_model(cfg, EMBED_DIM)
    texts = nn.functional.normalize(torch.randn(BASE_CLASSES, EMBED_DIM), dim=1)
    model.set_vocabulary(Vocabulary(texts, torch.zeros(BASE_CLASSES, dtype=torch.bool),
                                    tuple(f"class {i}" for i in range(BASE_CLASSES))))
    amp = autocast_dtype(cfg, torch.device("cpu"))
    if amp == torch.bfloat16:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    return model, optimizer, amp, cfg.train.batch_size, cfg.model.min_size


def step_seconds(model: OVDDetector, optimizer: torch.optim.Optimizer, amp: torch.dtype | None,
                 batches: list[Batch]) -> float:
    """Median seconds of one training step over ``batches`` (the first one untimed)."""
    times = []
    for i, (images, targets) in enumerate(batches):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            losses = model(images, targets)
        loss = total_loss(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Recorder(nn.Module):
    """Passes the pooler's inputs through and keeps the last ones, to replay them alone."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.last: tuple[dict[str, Tensor], list[Tensor], list[tuple[int, int]]] | None = None

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        self.last = ({k: v.detach() for k, v in x.items()}, [b.detach() for b in boxes], image_shapes)
        return self.pool(x, boxes, image_shapes)


def pooler_run(pool: nn.Module, inputs: tuple) -> tuple[float, Tensor, dict[str, Tensor]]:
    """(seconds of forward + backward, output, feature gradients) of one pooler call."""
    maps, boxes, shapes = inputs
    leaves = {k: v.float().clone().requires_grad_() for k, v in maps.items()}
    boxes = [b.float() for b in boxes]  # bfloat16 under autocast; both poolers compute in float32
    start = time.perf_counter()
    out = pool(leaves, boxes, shapes)
    out.backward(torch.ones_like(out))
    seconds = time.perf_counter() - start
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    return seconds, out.detach(), grads


def timed_pooler(pool: nn.Module, inputs: tuple, repeats: int) -> float:
    """Median seconds of the pooler's forward + backward on ``inputs``."""
    return statistics.median(pooler_run(pool, inputs)[0] for _ in range(repeats))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="timed training steps per pooler and round")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating torchvision / gather rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the shapes training's cpus_per_worker)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    return args


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    model, optimizer, amp, batch_size, size = build(opts.threads)
    gather = model.roi_heads.box_pool
    if not isinstance(gather, GatherMultiScaleRoIAlign):
        raise TypeError(f"the shapes detector pools with {type(gather).__name__}, not the gather this benchmark measures")
    names = list(gather.featmap_names)
    poolers = {"torchvision": MultiScaleRoIAlign(names, 7, 2), "gather": gather}
    generator = torch.Generator().manual_seed(0)
    step_ratios, pool_ratios, times = [], [], {name: [] for name in poolers}
    recorder = _Recorder(gather)
    for round_ in range(opts.rounds):
        batches = [random_batch(batch_size, size, generator) for _ in range(opts.steps + 1)]
        for name, pool in poolers.items():
            recorder.pool = pool
            model.roi_heads.box_pool = recorder
            times[name].append(step_seconds(model, optimizer, amp, batches))
        step_ratios.append(times["torchvision"][-1] / times["gather"][-1])
        inputs = recorder.last
        pool_ratios.append(timed_pooler(poolers["torchvision"], inputs, 5) / timed_pooler(gather, inputs, 5))
        print(f"round {round_ + 1}: step {times['torchvision'][-1]:.3f} s torchvision, {times['gather'][-1]:.3f} s gather")
    _, out_tv, grad_tv = pooler_run(poolers["torchvision"], inputs)
    _, out_ga, grad_ga = pooler_run(poolers["gather"], inputs)
    out_diff = float((out_tv - out_ga).abs().max())
    grad_diff = max(float((grad_tv[k] - grad_ga[k]).abs().max()) for k in grad_tv)
    rois = sum(len(b) for b in inputs[1])
    step_ratio, pool_ratio = statistics.median(step_ratios), statistics.median(pool_ratios)
    print()
    print(f"config: {CONFIG}, batch {batch_size}, {size} px, {rois} RoIs per step, "
          f"{'bfloat16 autocast' if amp else 'float32'}, {opts.threads} thread(s), CPU")
    print(f"1. step time torchvision / gather = {step_ratio:.2f}x, median of {opts.rounds} rounds "
          f"({statistics.median(times['torchvision']):.3f} s vs {statistics.median(times['gather']):.3f} s)  "
          f"target >= {TARGET_STEP_RATIO}: {'met' if step_ratio >= TARGET_STEP_RATIO else 'MISSED'}")
    print(f"2. pooler fwd+bwd torchvision / gather = {pool_ratio:.2f}x; "
          f"largest difference: output {out_diff:.1e}, feature gradient {grad_diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(lambda: main(sys.argv[1:]), "bench_roi_align"))
