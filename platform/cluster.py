"""Connecting to Ray: the configured cluster, the one ``ray job submit`` set, or a local one."""

from __future__ import annotations

from ovdlab.platform.config import ExperimentConfig


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Connect to ``ray.address`` (or the cluster a ``ray job submit`` set), else start a local Ray.

    A local Ray starts with its dashboard when Ray's dashboard packages are installed
    (they are, with ``ray[default]``): Ray Train V2's placement-group cleaner polls the
    training controller through the State API, which the dashboard serves, and without
    it logs "Failed to query Ray Train Controller actor state" every few seconds of
    every training run.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, configure_logging=False)
