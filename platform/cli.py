"""The ``ovdlab`` command: data preparation, evaluation, extraction, training, prediction, sweeps, comparison.

Each sub-command is a thin wrapper over a library function so that jobs, tests and
the command line run the same code. Configs are validated (and fail naming the
field) before any Ray work starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from ovdlab.platform.config import (
    ConfigError, ExperimentConfig, ShapesConfig, dump_yaml, load_config, load_layered, parse_override, uncalibrated,
)

log = logging.getLogger("ovdlab")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum``.

    argparse then answers an out-of-range value with a usage error naming the option,
    before any dataset, model or Ray work starts.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def probability(text: str) -> float:
    """An argparse ``type`` for a number in [0, 1] (a score threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _config_minimum(section: type[BaseModel], field: str) -> int:
    """The lower bound (``ge``) of a config field, so the command line and the config agree."""
    return int(section.model_json_schema()["properties"][field]["minimum"])


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (path, or name under configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iter=300")


def _load(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    """The resolved config, where each ``method`` key came from, and its content hash."""
    cfg = _load(args)
    print(dump_yaml(cfg), end="")
    origins = load_layered(args.config).origins
    overridden = {".".join(parse_override(text)[0]) for text in args.overrides}
    for key in type(cfg.method).model_fields:
        dotted = f"method.{key}"
        where = "command line" if dotted in overridden else origins.get(dotted, "the method's default")
        if key in uncalibrated(cfg.method):
            where += " (set from the teacher's logit scale when a stage loads the teacher)"
        print(f"# {dotted}: {where}")
    print(f"# content hash: {cfg.content_hash()}")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from ovdlab.platform.data.shapes import generate_shapes

    fields = {
        "seed": args.seed,
        "train_images": args.images,
        "val_images": args.val_images,
        "image_size": args.size,
        "image_format": args.format,
    }
    if args.novel:
        fields["novel"] = [name.strip() for name in args.novel.split(",") if name.strip()]
    cfg = ShapesConfig(**{k: v for k, v in fields.items() if v is not None})
    out = generate_shapes(Path(args.out), cfg)
    print(f"shapes dataset ready in {out}")
    return 0


def cmd_data_coco(args: argparse.Namespace) -> int:
    from ovdlab.platform.data.coco_ovd import convert_coco_ovd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(args.instances_train, out / "ovd_ins_train2017_b.json", "train"),
            (args.instances_val, out / "ovd_ins_val2017_all.json", "val")]
    for src, dst, mode in jobs:
        if src:
            counts = convert_coco_ovd(Path(src), dst, mode=mode)
            print(f"{mode}: {dst} {json.dumps(counts)}")
    return 0


def cmd_data_lvis(args: argparse.Namespace) -> int:
    from ovdlab.platform.data.lvis_ovd import convert_lvis_ovd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(args.train, out / "lvis_v1_train_fc.json", "train"), (args.val, out / "lvis_v1_val_ovd.json", "val")]
    for src, dst, mode in jobs:
        if src:
            counts = convert_lvis_ovd(Path(src), dst, mode=mode)
            print(f"{mode}: {dst} {json.dumps(counts)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ovdlab.platform.evaluation import evaluate, resolve_kind
    from ovdlab.platform.evaluation.common import load_json_input
    from ovdlab.platform.evaluation.tables import format_split_table

    gt = load_json_input(Path(args.dataset), "ground truth")
    kind = resolve_kind(args.kind, gt, f"--dataset {args.dataset}")
    log.info("scoring %s with the %s protocol (--kind %s)", args.results, kind, args.kind)
    metrics = evaluate(kind, gt, Path(args.results))
    print(format_split_table(metrics))
    if args.log:
        from ovdlab.platform.evaluation.reporting import log_evaluation

        overrides = [f"dataset.kind={kind}"] + ([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else [])
        cfg = load_config(args.config, overrides + list(args.overrides or []))
        run_id = log_evaluation(cfg, metrics, run_name=args.run_name or f"eval-{Path(args.results).stem}")
        print(f"logged to MLflow run {run_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovdlab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config and its content hash")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="make datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("shapes", help="generate the synthetic shapes world")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int_at_least(0))
    p.add_argument("--images", type=int_at_least(_config_minimum(ShapesConfig, "train_images")), help="training images")
    p.add_argument("--val-images", type=int_at_least(_config_minimum(ShapesConfig, "val_images")))
    p.add_argument("--size", type=int_at_least(_config_minimum(ShapesConfig, "image_size")), help="image side in pixels")
    p.add_argument("--format", choices=["png", "jpg"])
    p.add_argument("--novel", help="comma-separated novel classes, e.g. 'red circle,green square'")
    p.set_defaults(func=cmd_data_shapes)

    p = data.add_parser("coco-ovd", help="convert COCO 2017 instances into the 48/17 OVD files")
    p.add_argument("--instances-train", help="instances_train2017.json")
    p.add_argument("--instances-val", help="instances_val2017.json")
    p.add_argument("--out", required=True, help="folder for the converted files")
    p.set_defaults(func=cmd_data_coco)

    p = data.add_parser("lvis-ovd", help="convert LVIS v1 into base (f+c) training and tagged val files")
    p.add_argument("--train", help="lvis_v1_train.json")
    p.add_argument("--val", help="lvis_v1_val.json")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data_lvis)

    p = sub.add_parser("eval", help="evaluate a COCO results file with OVD splits")
    p.add_argument("--dataset", required=True, help="annotation json with split-tagged categories")
    p.add_argument("--results", required=True, help="COCO results json")
    p.add_argument("--kind", choices=["auto", "coco", "lvis", "shapes"], default="auto",
                   help="benchmark protocol; auto (default) reads it from --dataset, an explicit kind must agree")
    p.add_argument("--log", action="store_true", help="log metrics and tables to MLflow")
    p.add_argument("--config", default=None, help="experiment config for tracking settings")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--run-name", default=None)
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train and evaluate one method through Ray Train (rerun to resume)")
    _config_args(p)
    p.add_argument("--stop-at", type=int_at_least(1), default=None, help="end this fit after that step; rerun to continue")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="detect an arbitrary vocabulary in an image with a trained checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint folder written by training, or its model.pt")
    source.add_argument("--run", help="MLflow run id of a training run (its final checkpoint)")
    p.add_argument("--image", required=True)
    p.add_argument("--vocab", required=True, help="comma-separated class names, e.g. 'red circle,purple star'")
    p.add_argument("--out", required=True, help="folder for detections.json and detections.png")
    p.add_argument("--score-thresh", type=probability, default=None, help="drop boxes below this score (default 0.3)")
    p.add_argument("--config", default=None, help="with --run: experiment config naming the tracking store")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embeddings", help="where a checkpoint's region embeddings of ground-truth boxes lie against every class's text")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by training, or its model.pt")
    p.add_argument("--split", choices=["val", "train"], default="val", help="the checkpoint's dataset split (default val)")
    p.add_argument("--max-images", type=int_at_least(1), default=None, help="the first N images with a box (default all)")
    p.add_argument("--teacher", action="store_true", help="also the teacher's crop embeddings of the same boxes")
    p.set_defaults(func=cmd_embeddings)

    p = sub.add_parser("extract", help="fill the region store (proposals + teacher embeddings) with Ray Data; rerun to resume")
    _config_args(p)
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("sweep", help="Ray Tune sweep of config keys (configs/sweeps/*.yaml); rerun to resume")
    p.add_argument("sweep", help="sweep YAML (path, or name under configs/sweeps/)")
    p.add_argument("overrides", nargs="*", help="sweep.<field>=... for the sweep, other dotted overrides for every trial")
    p.add_argument("--smoke", action="store_true", help="COCO/LVIS sweeps: run on a generated fixture in the dataset's layout")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="compare the methods of an MLflow experiment: table and figures")
    p.add_argument("--experiment", default="shapes", help="MLflow experiment (default: shapes)")
    p.add_argument("--work-dir", default="work", help="work dir whose MLflow database to read (default: work)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the work dir's database)")
    p.add_argument("--metric", default="ap50_novel", help="picks each method's best setting (default: ap50_novel)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.train.max_iter = '1200'\"")
    p.add_argument("--out", default=None, help="folder for comparison.md and the figures (default: <work dir>/comparison)")
    p.set_defaults(func=cmd_compare)

    return parser


def cmd_sweep(args: argparse.Namespace) -> int:
    from ovdlab.platform.tune.job import sweep_main

    return sweep_main(args.sweep, args.overrides, smoke=args.smoke)


def cmd_compare(args: argparse.Namespace) -> int:
    from ovdlab.platform.evaluation.compare import compare
    from ovdlab.platform.tracking import tracker_from_config

    overrides = [f"work_dir={args.work_dir}", f"tracking.experiment={args.experiment}"]
    cfg = load_config(None, overrides + ([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []))
    tracker = tracker_from_config(cfg)
    result = compare(tracker, Path(args.out) if args.out else cfg.work_path("comparison"), args.metric, args.filter)
    print(result.table)
    print("\n".join(f"wrote {path}" for path in result.files))
    print(f"MLflow comparison run {result.run_id} in {tracker.uri}, experiment {tracker.experiment!r}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ovdlab.platform.pipelines.extract import run_extraction

    summary = run_extraction(_load(args), args.split)
    print(summary.format())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ovdlab.platform.evaluation.tables import format_split_table
    from ovdlab.platform.train.trainer import train

    cfg = _load(args)
    result = train(cfg, stop_at=args.stop_at)
    if result.metrics is None:
        print(f"run {result.run_name} stopped at step {result.step}/{cfg.train.max_iter}; rerun the same command to continue")
    else:
        print(format_split_table(result.metrics))
        print(f"final checkpoint (step {result.step}, reported as trained: no selection on the evaluation split): {result.checkpoint}")
        print(f"COCO results: {result.results_path}")
    print(f"MLflow: {result.tracking_uri} experiment {result.experiment!r} run {result.mlflow_run_id}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ovdlab.platform.predict import DEFAULT_SCORE_THRESH, Predictor, parse_vocab, save_outputs

    vocab = parse_vocab(args.vocab)
    if args.checkpoint:
        predictor = Predictor.from_checkpoint(args.checkpoint)
    else:
        overrides = [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []
        predictor = Predictor.from_mlflow_run(args.run, load_config(args.config, overrides))
    thresh = DEFAULT_SCORE_THRESH if args.score_thresh is None else args.score_thresh
    detections = predictor.predict(args.image, vocab, score_thresh=thresh)
    json_path, png_path = save_outputs(detections, args.image, args.out, seen=predictor.train_classes)
    for det in detections:
        print(f"{det['label']:>20s} {det['score']:.3f} {det['box']}")
    print(f"{len(detections)} detection(s): {json_path}, {png_path}")
    return 0


def cmd_embeddings(args: argparse.Namespace) -> int:
    from ovdlab.platform.data.catalog import load_dataset
    from ovdlab.platform.evaluation.embedding_geometry import measure_checkpoint
    from ovdlab.platform.predict import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint)
    dataset = load_dataset(predictor.cfg, args.split)
    for source, geometry in measure_checkpoint(predictor, dataset, args.max_images, args.teacher).items():
        print(f"{source}: {geometry.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: args.func(args), "ovdlab")


def run_reporting_errors(func: Callable[[], int], prog: str) -> int:
    """``func()``'s exit code; a bad config (2) or bad input (1) as one line on stderr, no traceback.

    Shared by ``ovdlab`` and the job scripts: the message already names the field or
    file, and a traceback would bury it.
    """
    try:
        return func()
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
