"""CLIFF on COCO: the object feature diffused to CLIP image and text space, three phases.

One recipe (``methods/cliff/method.py``), run by the platform's recipe runner: the
proposal detector (ViLD-text's training, whose RPN gives the class-agnostic proposals the
image chain learns from), stage 1 (object -> text), stage 2 (object -> image -> text),
the low-LR final stage, and an evaluation over ``eval.seeds`` sampling seeds (mean and
spread of every metric). Each stage is an MLflow child run of the job's run; a rerun skips
the finished stages and resumes an interrupted one from its last checkpoint:

    python jobs/cliff_coco.py
    python jobs/cliff_coco.py seed=1 method.diffusion_steps=5 eval.seeds=5
    ray job submit --working-dir . -- python jobs/cliff_coco.py work_dir=/shared/ovdlab
"""

import sys

from ovdlab.platform.recipes.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("experiments/cliff_coco", sys.argv[1:], __doc__.splitlines()[0]))
