"""EZSD on LVIS (rare = novel, frequent + common = base): LN-tuned teacher, filtered CLIP proposals, weighted distillation.

The recipe of ``jobs/ezsd_shapes.py`` on ``configs/experiments/ezsd_lvis.yaml``
(the dataset files made by ``ovdlab data lvis-ovd``, CLIP ViT-B/32, R50-FPN on GPUs):

    ray job submit --working-dir . -- python jobs/ezsd_lvis.py dataset.root=/data/lvis
    python jobs/ezsd_lvis.py --smoke      # end to end on a generated fixture in the LVIS layout
"""

import sys

from ovdlab.platform.recipes.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("experiments/ezsd_lvis", sys.argv[1:], __doc__.splitlines()[0]))
