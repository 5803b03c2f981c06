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

from __future__ import annotations

import logging
import sys

from ovdlab.platform.cli import run_reporting_errors
from ovdlab.platform.recipes.runner import run_recipe

EXPERIMENT = "experiments/lp_ovod_shapes"


def main(overrides: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_recipe(EXPERIMENT, overrides)
    print("\n".join(result.report_lines()))
    print(f"MLflow: {result.tracking_uri}  experiment {result.experiment!r}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(lambda: main(sys.argv[1:]), "lp_ovod_shapes"))
