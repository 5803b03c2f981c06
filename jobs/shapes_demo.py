"""ViLD-text on the synthetic shapes world: train through Ray Train, evaluate, log to MLflow.

The README's main job, CPU-sized (a few minutes on a laptop; the first run also draws
the shapes world and pretrains the ``shapes-tiny`` CLIP teacher once):

    python jobs/shapes_demo.py                              # local Ray, started here
    python jobs/shapes_demo.py train.max_iter=100 ray.num_workers=2
    ray job submit --working-dir . -- python jobs/shapes_demo.py work_dir=/shared/ovdlab

Under ``ray job submit`` the job runs in a copy of the working directory, so give an
absolute (shared) ``work_dir`` to keep the data, checkpoints and MLflow store.

Recipe (configs/experiments/vild_text_shapes.yaml + command-line overrides):
1. the shapes world (base classes annotated for training, novel ones only in val);
2. the teacher: ``shapes-tiny``, a small CLIP pretrained on the world's crops/captions;
3. ViLD-text: region embeddings against frozen text embeddings of the base classes;
4. evaluation with every class in the vocabulary: novel AP50 > 0 comes only from the
   text embeddings, since no novel box was ever a training target.
"""

from __future__ import annotations

import logging
import sys

from ovdlab.platform.cli import run_reporting_errors
from ovdlab.platform.config import load_config
from ovdlab.platform.data.catalog import ensure_dataset
from ovdlab.platform.evaluation.tables import format_split_table
from ovdlab.platform.pipelines.extract import teacher_checkpoint
from ovdlab.platform.train.trainer import train

CONFIG = "experiments/vild_text_shapes"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(CONFIG, argv)

    root = ensure_dataset(cfg)
    teacher = teacher_checkpoint(cfg)  # shapes-tiny is pretrained on the world once, then reused
    print(f"shapes world: {root}")
    print(f"teacher: {teacher or f'{cfg.teacher.model} (pretrained={cfg.teacher.pretrained})'}")

    result = train(cfg)

    if result.metrics is None:
        print(f"training stopped at step {result.step}/{cfg.train.max_iter}; rerun to continue")
        return 1
    print(format_split_table(result.metrics))
    print(f"best checkpoint (step {result.best_step}): {result.best_checkpoint}")
    print(f"COCO results: {result.results_path}")
    print(f"MLflow: {result.tracking_uri}  experiment {result.experiment!r}  run {result.mlflow_run_id}")
    print(f"  browse: mlflow ui --backend-store-uri {result.tracking_uri}")
    print(f"  predict: ovdlab predict --checkpoint {result.best_checkpoint} --image IMAGE --vocab 'red circle,purple star' --out OUT")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(lambda: main(sys.argv[1:]), "shapes_demo"))
