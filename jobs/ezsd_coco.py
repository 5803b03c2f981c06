"""EZSD on COCO (17 novel / 48 base): LN-tuned teacher, filtered CLIP proposals, weighted distillation.

The recipe of ``jobs/ezsd_shapes.py`` on ``configs/experiments/ezsd_coco.yaml``
(the dataset files made by ``ovdlab data coco-ovd``, CLIP ViT-B/32, R50-FPN on GPUs):

    ray job submit --working-dir . -- python jobs/ezsd_coco.py dataset.root=/data/coco
    python jobs/ezsd_coco.py --smoke      # end to end on a generated fixture in the COCO layout
"""

import sys

from ovdlab.platform.recipes.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("experiments/ezsd_coco", sys.argv[1:], __doc__.splitlines()[0]))
