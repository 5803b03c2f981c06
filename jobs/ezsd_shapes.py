"""EZSD on the shapes world: LN-tuned teacher, filtered CLIP proposals, weighted distillation.

One recipe (``methods/ezsd.py``), run by the platform's recipe runner: the teacher (its
LayerNorms tuned on base crops, the crop accuracy before and after logged), the store
(CLIP proposals scored by the tuned teacher, those on base objects dropped, embedded with
their confidence next to the base ground-truth boxes), the detector training. Each stage
is an MLflow child run of the job's run; a rerun skips the finished stages and resumes an
interrupted one from its last checkpoint:

    python jobs/ezsd_shapes.py
    python jobs/ezsd_shapes.py seed=1 method.distill_weight=0.5
    python jobs/ezsd_shapes.py teacher.ln_tuned=false     # the untuned-teacher ablation
    ray job submit --working-dir . -- python jobs/ezsd_shapes.py
"""

import sys

from ovdlab.platform.recipes.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("experiments/ezsd_shapes", sys.argv[1:], __doc__.splitlines()[0]))
