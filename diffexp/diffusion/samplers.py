"""Samplers that consume a Denoiser (MATH.md section 6).

Every sampler returns the samples and its number of network evaluations (NFE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import posterior
from diffexp.diffusion.schedules import Schedule

TIME_GRIDS = ("uniform", "log_snr")


def time_grid(schedule: Schedule, steps: int, kind: str = "uniform", **like) -> Tensor:
    """Times t_0 = 0 < ... < t_steps = 1: uniform in t, or uniform in log-SNR."""
    if steps < 1:
        raise ValueError(f"a sampler needs at least one step, got steps={steps}")
    if kind == "uniform":
        return torch.linspace(0.0, 1.0, steps + 1, **like)
    if kind == "log_snr":
        lam_0, lam_1 = schedule.endpoints
        lam = torch.linspace(lam_0, lam_1, steps + 1, **like)
        t = schedule.t_of_log_snr(lam)
        t[0], t[-1] = 0.0, 1.0
        return t
    raise ValueError(f"unknown time grid {kind!r}; valid: {list(TIME_GRIDS)}")


@dataclass
class SampleOutput:
    """Samples and the number of network evaluations that produced them."""

    x: Tensor
    nfe: int


class Sampler:
    """Base class: ``sample(denoiser, shape, y, generator)`` draws from the model."""

    def sample(
        self,
        denoiser: Denoiser,
        shape: tuple[int, ...],
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> SampleOutput:
        raise NotImplementedError


class Ancestral(Sampler):
    """DDPM's ancestral sampler: x_s ~ q(x_s | x_t, x0 = x0_hat(x_t)) down a time grid.

    The chain starts at x_1 ~ N(0, I); with ``final_denoise`` the last step returns
    x0_hat(x_{t0}), the decoder's mean, instead of the noisy x_{t0} (one more NFE).
    """

    def __init__(self, steps: int = 1000, time_grid: str = "uniform", final_denoise: bool = True):
        if time_grid not in TIME_GRIDS:
            raise ValueError(f"unknown time grid {time_grid!r}; valid: {list(TIME_GRIDS)}")
        self.steps, self.grid, self.final_denoise = int(steps), time_grid, bool(final_denoise)

    @torch.no_grad()
    def sample(self, denoiser, shape, y=None, generator=None, device=None, dtype=torch.float32):
        """x_{t_{i-1}} = mu_q(x_{t_i}, x0_hat) + sigma_q z for i = steps..1."""
        like = {"device": device, "dtype": dtype}
        t = time_grid(denoiser.schedule, self.steps, self.grid, **like)
        lam = denoiser.schedule.log_snr(t)
        x = torch.randn(shape, generator=generator, **like)
        nfe = 0
        for i in range(self.steps, 0, -1):
            x0_hat = denoiser(x, y=y, log_snr=lam[i]).x0_hat
            nfe += 1
            mean, var = posterior(x, x0_hat, lam[i - 1], lam[i])
            x = mean + var.sqrt() * torch.randn(shape, generator=generator, **like)
        if self.final_denoise:
            x = denoiser(x, y=y, log_snr=lam[0]).x0_hat
            nfe += 1
        return SampleOutput(x=x, nfe=nfe)

    def __repr__(self) -> str:
        return f"Ancestral(steps={self.steps}, time_grid={self.grid!r})"
