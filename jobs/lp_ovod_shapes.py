"""LP-OVOD on the shapes world: base training, retrieval of pseudo-labels, linear probe.

One recipe (``methods/lp_ovod.py``), run by the platform's recipe runner: the proposal
detector (ViLD-text's training, reused when it exists), the base stage (prototypes with
focal loss, image branch distilled on the RPN proposals' teacher embeddings), retrieval
(the top ``method.retrieval_k`` training proposals per novel class), the probe (novel
prototypes only). Each stage is an MLflow child run of the job's run; a rerun skips the
finished stages and resumes an interrupted one from its last checkpoint:

    python jobs/lp_ovod_shapes.py
    python jobs/lp_ovod_shapes.py seed=1 method.retrieval_k=50
    ray job submit --working-dir . -- python jobs/lp_ovod_shapes.py
"""

import sys

from ovdlab.platform.recipes.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("experiments/lp_ovod_shapes", sys.argv[1:], __doc__.splitlines()[0]))
