"""Sweep configs: domains, overrides, and every value checked against the experiment before any Ray work."""

from __future__ import annotations

import pytest

from ovdlab.platform.config import ConfigError, load_config
from ovdlab.platform.tune.config import SWEEPS_DIR, Domain, load_sweep, override

SHIPPED = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_sweep_loads_and_fits_its_experiment(name):
    sweep = load_sweep(name)
    assert sweep.trial_count() >= 3
    for key, domain in sweep.params.items():
        for value in domain.probes():
            load_config(sweep.experiment, [*sweep.overrides, override(key, value)])


def test_the_issue_asks_for_these_sweeps():
    assert {"vild_distill_shapes", "vild_distill_coco", "cliff_steps_shapes", "cliff_steps_coco", "cliff_kl_shapes",
            "ezsd_distill_shapes", "lp_ovod_retrieval_shapes"} <= set(SHIPPED)
    vild = load_sweep("vild_distill_shapes")
    assert vild.trial_count() >= 4 and vild.max_concurrent_trials == 2 and vild.scheduler.kind == "asha"
    assert list(vild.params) == ["method.distill_weight"]
    assert load_sweep("cliff_steps_shapes").params["method.diffusion_steps"].values == [5, 10, 20]
    assert load_sweep("cliff_kl_shapes").search == "optuna"


def test_domains_take_exactly_one_kind_with_ordered_bounds():
    assert Domain(values=[1, 2]).probes() == [1, 2]
    assert Domain(uniform=(0.3, 0.9)).probes() == [0.3, 0.9]
    assert Domain(randint=(1, 5)).probes() == [1, 4]  # randint's high is exclusive
    for bad in ({}, {"values": [1], "uniform": (0, 1)}, {"values": []}, {"uniform": (1, 0)}, {"loguniform": (0, 1)}):
        with pytest.raises(ValueError):
            Domain(**bad)


def test_overrides_split_between_the_sweep_and_every_trial():
    sweep = load_sweep("vild_distill_shapes", ["sweep.params.method.distill_weight=[0.5,2.0]", "sweep.max_concurrent_trials=1",
                                               "train.max_iter=40"])
    assert sweep.params["method.distill_weight"].values == [0.5, 2.0] and sweep.max_concurrent_trials == 1
    assert sweep.overrides[-1] == "train.max_iter=40" and sweep.trial_count() == 2
    ranged = load_sweep("vild_distill_shapes", ["sweep.search=random", "sweep.num_samples=3",
                                                "sweep.params.method.distill_weight={uniform: [0.1, 1.0]}"])
    assert ranged.params["method.distill_weight"].uniform == (0.1, 1.0) and ranged.trial_count() == 3


def test_a_bad_sweep_fails_naming_the_field_or_the_value():
    with pytest.raises(ConfigError, match="sweep.max_concurrent_trials"):
        load_sweep("vild_distill_shapes", ["sweep.max_concurrent_trials=0"])
    with pytest.raises(ConfigError, match="search: grid needs listed values"):
        load_sweep("vild_distill_shapes", ["sweep.params.method.distill_weight={uniform: [0.1, 1.0]}"])
    with pytest.raises(ConfigError, match=r"(?s)sweep.params.method.distil_weight = 0.5 does not fit .*method.distil_weight: unknown field"):
        load_sweep("vild_distill_shapes", ["sweep.params.method.distil_weight=[0.5]"])
    with pytest.raises(ConfigError, match="train.max_iter"):
        load_sweep("vild_distill_shapes", ["train.max_iter=0"])
    with pytest.raises(ConfigError, match="sweep.metric: 'apr' is not reported on shapes"):
        load_sweep("vild_distill_shapes", ["sweep.metric=apr"])
    with pytest.raises(ConfigError, match="sweep config not found: nope"):
        load_sweep("nope")


def test_a_value_becomes_an_override_that_reads_back_the_same():
    assert override("method.distill_weight", 0.25) == "method.distill_weight=0.25"
    assert override("train.steps", [10, 20]) == "train.steps=[10, 20]"
    assert load_config("experiments/vild_shapes", [override("teacher.prompt", "names")]).teacher.prompt == "names"
