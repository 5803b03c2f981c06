"""Sweep: ViLD's distillation weight on COCO OVD (``configs/sweeps/vild_distill_coco.yaml``).

Ray Tune runs one trial per value (the trial's recipe, its trainings through Ray Train),
after the stages every trial shares ran once; ASHA stops trials that trail at an
evaluation. MLflow holds one run for the sweep and one child per trial, the best tagged;
a rerun resumes without repeating finished trials. Then ``ovdlab compare`` sets the runs
side by side:

    python jobs/sweep_vild_distill_coco.py --smoke            # end to end on a generated fixture, on a laptop
    python jobs/sweep_vild_distill_coco.py sweep.max_concurrent_trials=1 seed=1
    ray job submit --working-dir . -- python jobs/sweep_vild_distill_coco.py work_dir=/shared/ovdlab
"""

import sys

from ovdlab.platform.tune.job import run_sweep_job

if __name__ == "__main__":
    sys.exit(run_sweep_job("vild_distill_coco", sys.argv[1:], __doc__.splitlines()[0]))
