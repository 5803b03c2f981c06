"""A sweep's command line: ``ovdlab sweep`` and ``python jobs/sweep_<...>.py [--smoke] [overrides]``.

Like a recipe job (:mod:`ovdlab.platform.recipes.job`): dotted overrides (``sweep.*`` for
the sweep, the rest for every trial), ``--smoke`` for the COCO and LVIS sweeps (the
dataset's layout fixture, tiny models, a few steps), a rerun resumes, errors as one line.
"""

from __future__ import annotations

import argparse
import logging

from ovdlab.platform.cli import run_reporting_errors
from ovdlab.platform.recipes.job import smoke_overrides
from ovdlab.platform.tune.config import load_sweep
from ovdlab.platform.tune.sweep import run_sweep


def sweep_main(sweep_name: str, overrides: list[str], smoke: bool = False) -> int:
    """Check the sweep (before any Ray work), run or resume it, print its trials."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sweep = load_sweep(sweep_name, overrides)
    if smoke:
        trial = [o for o in overrides if not o.strip().startswith("sweep.")]
        sweep = load_sweep(sweep_name, [*smoke_overrides(sweep.experiment, trial), *overrides])
    result = run_sweep(sweep)
    print("\n".join(result.report_lines()))
    print(f"compare: ovdlab compare --experiment {result.experiment}")
    return 0


def run_sweep_job(sweep_name: str, argv: list[str], description: str) -> int:
    """A sweep job script's ``main``: ``[--smoke] [overrides]`` over ``sweep_name``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="run end to end on a generated fixture in this dataset's layout")
    parser.add_argument("overrides", nargs="*", help="sweep.<field>=... for the sweep, dotted overrides for every trial")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: sweep_main(sweep_name, args.overrides, smoke=args.smoke), sweep_name)
