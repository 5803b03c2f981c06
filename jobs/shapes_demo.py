"""The shapes benchmark as a method comparison: every implemented method, the oracle, several seeds.

The README's main job, CPU-sized. The first run draws the shapes world, pretrains
the ``shapes-tiny`` CLIP teacher and the detectors' backbone (on base-class crops, the
world's ImageNet) once; every method then trains through Ray Train on the
same world, teacher and text banks as its recipe (``Method.recipe``, run by
``ovdlab.platform.recipes.runner``: finished stages are reused, an interrupted one
resumes), is evaluated with every class in the vocabulary and logged as an MLflow job
run with a child run per stage; the job prints one table of mean ± std over the seeds:

    python jobs/shapes_demo.py                                    # every method + oracle, seeds 0,1,2
    python jobs/shapes_demo.py --methods vild-text --seeds 0      # one run
    python jobs/shapes_demo.py train.max_iter=300 ray.num_workers=2   # overrides for every run
    python jobs/shapes_demo.py lp-ovod:method.retrieval_k=50          # for one method's runs
    ray job submit --working-dir . -- python jobs/shapes_demo.py work_dir=/shared/ovdlab

Rows (configs/experiments/<method>_shapes.yaml):
- ``vild-text``: region embeddings against frozen text embeddings of the base classes;
- ``vild``: plus L1 distillation of the teacher's crop embeddings of RPN proposals; its
  recipe's first stage, the proposal detector, is the ViLD-text training of the same
  seed (its RPN never saw a novel box), which the recipe runner reuses;
- ``vild-ensemble``: ViLD's distillation in a separate image branch, the two branches'
  probabilities combined at test time;
- ``lp-ovod``: prototypes with focal loss and an image branch distilled on the same
  proposals, then retrieval of pseudo-labels for the novel classes and a linear probe of
  their prototypes; ``lp-ovod w/o probe`` is its base stage, evaluated before the probe;
- ``ezsd``: a LayerNorm-tuned teacher, its CLIP proposals away from base objects and the
  base boxes distilled with the teacher's confidence as weights, a learnable temperature
  and class-conditioned box regression; ``ezsd-rpn-proposals`` distills ViLD's RPN
  proposals instead, ``ezsd-untuned-teacher`` skips the tuning (the paper's ablations);
- ``cliff``: the rows' ResNet-18 FPN detector whose object feature is diffused (10 cosine-schedule
  steps from its own VAE sample) to the teacher's image space, learned on ViLD's RPN
  proposals, and on to its text space, where cosines to the class names classify; three
  phases in ViLD-text's budget, each run's metrics the mean over 3 sampling seeds;
- ``oracle``: ViLD-text trained with the novel boxes too -- the ceiling, not a method.

Columns: AP50 of the held-out concept (``novel_concept``: stars, a shape no base box
shows), of the compositional novel pairs (``novel_comp``), of all novel, base and all
classes, the percent of base objects whose best detection is labelled with a novel class
(``base_named_novel``: base AP50 lost to novel competition, not to localization), and
the wall minutes of each method's own stages (including Ray start-up and
the proposal extraction; not the proposal detector borrowed from ViLD-text; a reused
stage reports the minutes it took when it ran). The last checkpoint of every run is reported: nothing is
selected on the evaluation split.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ovdlab.methods.registry import available_methods
from ovdlab.platform.cli import run_reporting_errors
from ovdlab.platform.config import ExperimentConfig, load_config
from ovdlab.platform.data.catalog import ensure_dataset, load_dataset
from ovdlab.platform.detector.backbone_pretraining import resolve_backbone_weights
from ovdlab.platform.evaluation.tables import format_comparison
from ovdlab.platform.pipelines.extract import teacher_checkpoint
from ovdlab.platform.predict import Predictor, showcase
from ovdlab.platform.recipes.runner import RecipeResult, run_recipe

ORACLE = "oracle"
COLUMNS = {
    "ap50_novel_concept": "AP50 novel_concept",
    "ap50_novel_comp": "AP50 novel_comp",
    "ap50_novel": "AP50 novel",
    "ap50_base": "AP50 base",
    "ap50_all": "AP50 all",
    "base_named_novel": "base named novel %",
    "train_minutes": "train min",
}
STAGE_ROWS = {"lp-ovod": ("base", "lp-ovod w/o probe")}
"""Rows of an earlier train stage of a recipe: method -> (stage name, row name)."""
ABLATIONS = {
    "ezsd-rpn-proposals": ("ezsd", "experiments/ezsd_rpn_shapes"),
    "ezsd-untuned-teacher": ("ezsd", "experiments/ezsd_untuned_shapes"),
}
"""Rows of a method run with one ingredient swapped: row -> (method, experiment)."""
PICTURE_FROM = ("lp-ovod", "vild", "vild-text")
"""The run whose detections the demo draws: the first of these that ran (last seed).
LP-OVOD first: of the methods it is the one that names the held-out concept."""


def experiment(row: str) -> str:
    """``configs/experiments/<method>_shapes.yaml`` (``vild-text`` -> ``vild_text_shapes``),
    or an ablation's own experiment."""
    if row in ABLATIONS:
        return ABLATIONS[row][1]
    return f"experiments/{row.replace('-', '_')}_shapes"


def parse_args(argv: list[str]) -> argparse.Namespace:
    methods = [*available_methods(), *ABLATIONS, ORACLE]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(_ordered(methods)),
                        help=f"comma-separated rows, from {', '.join(methods)} (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run, e.g. train.max_iter=300; "
                        "METHOD:key=value for one method's runs, e.g. lp-ovod:method.retrieval_k=50")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(methods))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {methods}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds names no seed")
    for override in args.overrides:
        prefix = override.split("=", 1)[0]
        if ":" in prefix and prefix.split(":", 1)[0] not in methods:
            parser.error(f"override {override!r}: {prefix.split(':', 1)[0]!r} is not a row; rows: {methods}")
    return args


def overrides_for(row: str, overrides: list[str]) -> list[str]:
    """The overrides of a row's runs: every plain one, and ``METHOD:key=value`` ones of
    that row or of its method (a method's knob, e.g. LP-OVOD's ``method.retrieval_k``,
    exists only on its own config, so it cannot go to every run; ``ezsd:`` reaches EZSD's
    ablation rows too)."""
    names = {row, ABLATIONS[row][0]} if row in ABLATIONS else {row}
    out = []
    for override in overrides:
        prefix, _, rest = override.partition(":")
        if "=" in prefix or not rest:
            out.append(override)
        elif prefix in names:
            out.append(rest)
    return out


def _ordered(methods: list[str]) -> list[str]:
    """ViLD-text first (ViLD's recipe reuses its training as its proposal detector, so
    ViLD's minutes are its own), the oracle last."""
    return sorted(methods, key=lambda m: (m != "vild-text", m == ORACLE, m))


def own_minutes(result: RecipeResult, until: str | None = None) -> float:
    """Minutes of the recipe's own stages (not those running another experiment, like a
    borrowed proposal detector), up to and including stage ``until`` (default: all)."""
    total = 0.0
    for stage, spec in zip(result.stages, result.recipe):
        if spec.experiment is None:
            total += stage.seconds
        if stage.name == until:
            break
    return total / 60


def draw_showcase(
    done: dict[tuple[str, int], RecipeResult], seed: int, configs: dict[str, ExperimentConfig], out_dir: Path
) -> Path | None:
    """The picture of :data:`PICTURE_FROM`'s final checkpoint on a validation image with a held-out concept."""
    method = next((m for m in PICTURE_FROM if (m, seed) in done), None)
    if method is None:
        return None
    predictor = Predictor.from_checkpoint(done[(method, seed)].checkpoint, device="cpu")
    try:
        _, png = showcase(predictor, load_dataset(configs[method], "val"), out_dir / method)
    except LookupError as err:
        print(f"no detection picture: {err}")
        return None
    return png


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    methods = _ordered(args.methods)
    configs = {m: load_config(experiment(m), overrides_for(m, args.overrides)) for m in methods}  # fail here, before any work
    first = configs[methods[0]]
    print(f"shapes world: {ensure_dataset(first)}")
    print(f"teacher: {teacher_checkpoint(first) or f'{first.teacher.model} (pretrained={first.teacher.pretrained})'}")
    print(f"backbone: {resolve_backbone_weights(first).model.backbone_weights or 'trained from scratch'}")
    print(f"runs: {', '.join(methods)} x seeds {args.seeds}; outputs under {first.work_dir}", flush=True)

    done: dict[tuple[str, int], RecipeResult] = {}
    rows: dict[str, list[dict[str, float]]] = {}
    for method in methods:
        rows[method] = []
        if method in STAGE_ROWS:
            rows[STAGE_ROWS[method][1]] = []
    for seed in args.seeds:
        for method in methods:
            print(f"\n=== {method}, seed {seed} ({len(done) + 1}/{len(methods) * len(args.seeds)}) ===", flush=True)
            result = run_recipe(experiment(method), [*overrides_for(method, args.overrides), f"seed={seed}"])
            done[(method, seed)] = result
            rows[method].append({**result.metrics, "train_minutes": own_minutes(result)})
            if method in STAGE_ROWS:
                stage, row = STAGE_ROWS[method]
                found = next(r for r in result.stages if r.name == stage)
                rows[row].append({**found.metrics, "train_minutes": own_minutes(result, stage)})
            print("\n".join(result.report_lines()), flush=True)

    table = format_comparison(rows, COLUMNS)
    out = Path(first.work_dir) / "comparison.md"
    out.write_text(f"shapes benchmark, seeds {args.seeds}, mean ± std over seeds, last checkpoint of each run\n\n{table}")
    last = next(reversed(done.values()))
    print(f"\nshapes benchmark: {len(args.seeds)} seed(s), mean ± std, last checkpoint of each run (no selection on val)")
    print(table)
    print(f"table: {out}")
    picture = draw_showcase(done, args.seeds[-1], configs, Path(first.work_dir) / "showcase")
    if picture is not None:
        print(f"detections of a validation image with a held-out concept: {picture}")
    print(f"MLflow: {last.tracking_uri}  experiment {last.experiment!r}")
    print(f"  browse: mlflow ui --backend-store-uri {last.tracking_uri}")
    print(f"  predict: ovdlab predict --checkpoint {last.checkpoint} --image IMAGE --vocab 'red circle,purple star' --out OUT")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(lambda: main(sys.argv[1:]), "shapes_demo"))
