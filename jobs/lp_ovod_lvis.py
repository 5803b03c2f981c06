"""LP-OVOD on LVIS (rare = novel, frequent + common = base): base training, retrieval of pseudo-labels, linear probe.

The recipe of ``jobs/lp_ovod_shapes.py`` on ``configs/experiments/lp_ovod_lvis.yaml``
(the dataset files made by ``ovdlab data lvis-ovd``, CLIP ViT-B/32, R50-FPN on GPUs):

    ray job submit --working-dir . -- python jobs/lp_ovod_lvis.py dataset.root=/data/lvis
    python jobs/lp_ovod_lvis.py --smoke      # end to end on a generated fixture in the LVIS layout
"""

import sys

from ovdlab.platform.recipes.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("experiments/lp_ovod_lvis", sys.argv[1:], __doc__.splitlines()[0]))
