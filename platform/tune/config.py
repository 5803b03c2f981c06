"""A sweep's YAML (``configs/sweeps/*.yaml``): which experiment, which keys over which values.

::

    name: vild-distill-shapes
    experiment: experiments/vild_shapes
    overrides: []                    # every trial's, before its own values
    params:
      method.distill_weight: {values: [0.1, 0.25, 0.5, 1.0]}
    search: grid                     # grid | random | optuna
    metric: ap50_novel
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    max_concurrent_trials: 2         # at most; fewer when the cluster fits fewer
    trial_cpus: 0.25                 # a trial's driver (its trainings' workers ask ray.*)
    seed: 0                          # random and Optuna search

A parameter's domain is one of ``values`` (a grid, or a choice for random and Optuna
search), ``uniform``, ``loguniform`` (``[low, high]``) or ``randint`` (``[low, high)``).
Any dotted key of the experiment config can be swept; every value is checked against the
experiment config before any Ray work (:func:`load_sweep`).

Command-line overrides: ``sweep.<field>=...`` changes the sweep (``sweep.num_samples=8``,
``sweep.params.method.distill_weight=[0.5,1.0]``: a list is a ``values`` domain); any
other dotted override goes to every trial's experiment config (``train.max_iter=600``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ovdlab.platform.config import (
    CONFIGS_DIR,
    ConfigError,
    Section,
    apply_overrides,
    load_config,
    parse_override,
)

SWEEPS_DIR = CONFIGS_DIR / "sweeps"
SWEEP_PREFIX = "sweep."
METRICS = {
    "coco": ("ap50_novel", "ap50_base", "ap50_all", "ap", "ap50_novel_comp", "ap50_novel_concept"),
    "lvis": ("ap", "apr", "apc", "apf"),
}
"""What an evaluation reports (COCO protocol, also shapes: its novel kinds; LVIS), so
what a sweep can select on."""


class Domain(Section):
    """One parameter's values: exactly one of the fields (see the module doc)."""

    values: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Domain:
        given = [name for name in ("values", "uniform", "loguniform", "randint") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of values, uniform, loguniform, randint (got {', '.join(given) or 'none'})")
        if self.values is not None and not self.values:
            raise ValueError("values must not be empty")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"bounds must be increasing, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform bounds must be positive, got {list(self.loguniform)}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ("values", "uniform", "loguniform", "randint") if getattr(self, name) is not None)

    def probes(self) -> list[Any]:
        """Values that stand for the domain when checking the config and comparing stage keys:
        every listed value, or the bounds (``randint``'s last integer)."""
        if self.values is not None:
            return list(self.values)
        low, high = self.uniform or self.loguniform or self.randint  # type: ignore[misc]
        return [low, high - 1] if self.randint is not None else [low, high]

    def describe(self) -> str:
        return f"{self.kind} {list(getattr(self, self.kind))}"


class SchedulerConfig(Section):
    """Early stopping of trials. ``asha``: asynchronous successive halving over the
    trials' evaluations (``training_iteration`` counts a trial's reports: each evaluation
    during training, then its final one); ``fifo``: every trial runs to its end."""

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int = Field(100, ge=1)


class SweepConfig(Section):
    """A sweep (see the module doc)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str
    overrides: list[str] = Field(default_factory=list)
    params: dict[str, Domain] = Field(min_length=1)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)
    metric: str = "ap50_novel"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent_trials: int = Field(2, ge=1)
    trial_cpus: float = Field(0.25, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _grid_needs_values(self) -> SweepConfig:
        if self.search == "grid":
            ranged = [key for key, domain in self.params.items() if domain.values is None]
            if ranged:
                raise ValueError(f"search: grid needs listed values; {', '.join(ranged)} use a range (use random or optuna)")
        return self

    def trial_count(self) -> int:
        """Trials the sweep runs: grid points times ``num_samples``, else ``num_samples``."""
        if self.search != "grid":
            return self.num_samples
        count = self.num_samples
        for domain in self.params.values():
            count *= len(domain.values or [])
        return count


def sweep_path(name: str | Path) -> Path:
    """A sweep YAML by path or by name under ``configs/sweeps``."""
    path = Path(name)
    path = path if path.suffix in {".yaml", ".yml"} else path.with_suffix(".yaml")
    for candidate in (path, SWEEPS_DIR / path, SWEEPS_DIR / path.name):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"sweep config not found: {name} (looked in the current folder and {SWEEPS_DIR})")


def _apply_sweep_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``sweep.params.<dotted key>=<list or mapping>`` sets a domain; other ``sweep.*`` fields as usual."""
    plain: list[str] = []
    params = dict(raw.get("params") or {})
    for text in overrides:
        parts, value = parse_override(text[len(SWEEP_PREFIX):])
        if parts[0] == "params" and len(parts) > 1:
            params[".".join(parts[1:])] = {"values": value} if isinstance(value, list) else value
        else:
            plain.append(text[len(SWEEP_PREFIX):])
    return apply_overrides({**raw, "params": params}, plain)


def _format(err: ValidationError, path: Path) -> str:
    lines = [f"{'.'.join(str(p) for p in item['loc']) or '<root>'}: {item['msg']}" for item in err.errors()]
    return f"invalid sweep {path}:\n  " + "\n  ".join(f"sweep.{line}" for line in lines)


def load_sweep(name: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read, override and check a sweep: its fields, then every probe value of every
    parameter in the experiment config (a wrong key or value names it), all before any
    Ray work."""
    path = sweep_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    overrides = list(overrides or [])
    sweep_overrides = [o for o in overrides if o.strip().startswith(SWEEP_PREFIX)]
    trial_overrides = [o for o in overrides if not o.strip().startswith(SWEEP_PREFIX)]
    raw = _apply_sweep_overrides(raw, sweep_overrides)
    raw["overrides"] = [*(raw.get("overrides") or []), *trial_overrides]
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, path)) from None
    cfg = load_config(sweep.experiment, sweep.overrides)
    reported = METRICS["lvis" if cfg.dataset.kind == "lvis" else "coco"]
    if sweep.metric not in reported:
        raise ConfigError(f"sweep.metric: {sweep.metric!r} is not reported on {cfg.dataset.kind}; one of {', '.join(reported)}")
    for key, domain in sweep.params.items():
        for value in domain.probes():
            try:
                load_config(sweep.experiment, [*sweep.overrides, override(key, value)])
            except ConfigError as err:
                raise ConfigError(f"sweep.params.{key} = {value!r} does not fit {sweep.experiment}: {err}") from None
    return sweep


def override(key: str, value: Any) -> str:
    """``key=value`` as a dotted override (the value as YAML reads it back: JSON)."""
    return f"{key}={json.dumps(value, default=float)}"
