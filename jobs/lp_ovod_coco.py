"""LP-OVOD on COCO (17 novel / 48 base): base training, retrieval of pseudo-labels, linear probe.

The recipe of ``jobs/lp_ovod_shapes.py`` on ``configs/experiments/lp_ovod_coco.yaml``
(the dataset files made by ``ovdlab data coco-ovd``, CLIP ViT-B/32, R50-FPN on GPUs):

    ray job submit --working-dir . -- python jobs/lp_ovod_coco.py dataset.root=/data/coco
    python jobs/lp_ovod_coco.py --smoke      # end to end on a generated fixture in the COCO layout
"""

import sys

from ovdlab.platform.recipes.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("experiments/lp_ovod_coco", sys.argv[1:], __doc__.splitlines()[0]))
