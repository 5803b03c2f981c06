"""CLIFF's latent diffusion: a cosine noise schedule, an MLP noise predictor, DDPM steps.

Everything here works on ``[R, D]`` rows (one latent per region), ``D`` the CLIP width.

- Schedule (Nichol & Dhariwal 2021, Eq. 17): ``abar(t) = f(t) / f(0)``,
  ``f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2``, ``beta_t = 1 - abar(t) / abar(t - 1)``
  clipped at 0.999; CLIFF uses ``s = 0.008`` and ``T = 10``. Index ``t`` in ``0..T-1``
  is the step from noise level ``t`` to ``t + 1`` (the paper's ``t = 9, 8, 7`` are the
  first three reverse steps of ten).
- Forward process: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; the network predicts
  ``eps`` (CLIFF's noise is object-centric: ``eps`` is the region's VAE sample, not
  ``N(0, I)``).
- Reverse step (Ho et al. 2020, Eqs. 6-7, with the ``x_0`` parameterisation):
  ``x0 = clamp((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1)``,
  ``mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t``,
  ``x_{t-1} = mean + sqrt(beta_t (1 - abar_{t-1}) / (1 - abar_t)) z`` (no ``z`` at ``t = 0``),
  ``z`` drawn from the caller's generator so that sampling is reproducible.
- Noise predictor (CLIFF's diffuser): a sinusoidal time embedding and a condition
  embedding (LayerNorm -> ReLU -> Linear) added to the latent, two residual bottleneck
  blocks ``D -> 2D -> D``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def cosine_betas(steps: int, s: float = 0.008) -> Tensor:
    """``beta_t`` of the cosine schedule (float64, ``[steps]``), clipped at 0.999."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class CosineSchedule(nn.Module):
    """The schedule's constants as (non-persistent) buffers, so they follow the model's device."""

    def __init__(self, steps: int, s: float = 0.008) -> None:
        super().__init__()
        betas = cosine_betas(steps, s)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        constants = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "coef_x0": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "coef_xt": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
            "posterior_variance": betas * (1 - alpha_bar_prev) / (1 - alpha_bar),
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.steps = steps

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` for per-row steps ``t`` ``[R]``."""
        abar = self.alpha_bar[t][:, None].to(x0.dtype)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Transformer-style embedding of integer steps ``t`` ``[R]`` -> ``[R, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


class Bottleneck(nn.Module):
    """``D -> 2D -> D`` with a LayerNorm in front; the last layer starts at zero, so a fresh
    block is the identity of the residual stream."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Diffuser(nn.Module):
    """``eps_theta(x_t, t, cond)``: latent plus time and condition embeddings through two
    residual bottleneck blocks (CLIFF's diffuser)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.condition = nn.Sequential(nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([Bottleneck(dim), Bottleneck(dim)])

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        emb = self.time(sinusoidal_embedding(t, self.dim).to(x_t.dtype)) + self.condition(cond)
        h = x_t
        for block in self.blocks:
            h = h + block(h + emb)
        return h


def reverse_step(
    schedule: CosineSchedule,
    eps: Tensor,
    x_t: Tensor,
    t: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDPM step ``x_t -> x_{t-1}`` given the predicted noise ``eps``; returns
    ``(x_{t-1}, x0)`` with ``x0`` the clamped prediction of the clean latent."""
    abar = schedule.alpha_bar[t].to(x_t.dtype)
    x0 = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1.0, 1.0)
    mean = schedule.coef_x0[t].to(x_t.dtype) * x0 + schedule.coef_xt[t].to(x_t.dtype) * x_t
    if t == 0:
        return mean, x0
    noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return mean + schedule.posterior_variance[t].to(x_t.dtype).sqrt() * noise, x0


def sample(
    diffuser: Diffuser,
    schedule: CosineSchedule,
    x_start: Tensor,
    cond: Tensor,
    steps: range,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Reverse steps ``steps`` (descending) from ``x_start``; returns the last ``(x, x0)``."""
    x, x0 = x_start, x_start
    for t in steps:
        step = torch.full((len(x),), t, dtype=torch.int64, device=x.device)
        x, x0 = reverse_step(schedule, diffuser(x, step, cond), x, t, generator)
    return x, x0
