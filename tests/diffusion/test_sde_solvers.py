"""The exponential-integrator SDE sampler (``DPMSolverPP2MSDE``) converges on the ring's exact
denoiser in the strong sense: at one Brownian path, the error to a fine reference solution as the
log-SNR steps double.

One path at every resolution: the reference draws one z per fine step; a coarse step that spans
two steps t -> u -> s takes z = (m(u->s) c(t->u) z_1 + c(u->s) z_2) / c(t->s), where
m(t->s) = (a_s/a_t) e^{-(1+eta) h} and c(t->s) = s_s sqrt(1 - e^{-2 eta h}) are the step's decay
and noise scale (``exponential_integrator_step``). This is exact: the linear part and the noise
are integrated exactly, and m(u->s)^2 c(t->u)^2 + c(u->s)^2 = c(t->s)^2, so the coarse
noise is the fine path's noise over the same interval.

Observed orders (log2 of the mean error ratio, 16 -> 32 -> 64 steps against 512, 1000 samples,
float64): eta = 0 (the ODE, DPM-Solver++(2M)): 2.1 and 1.8; eta = 0.5: 1.1 and 1.2; eta = 1: 0.9
and 1.0. With noise the strong order is 1, as for any scheme that sees the path only through
its increments: x0_hat(x_t) along a Brownian path is not smooth enough for the multistep
extrapolation to gain an order. The floors are the smaller observed order less 0.2-0.3.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.diffusion.samplers import DPMSolverPP2MSDE, Grid, NFECounter
from tests.helpers import oracle_denoiser

N, FINE = 1000, 512
ORDER_FLOOR = {0.0: 1.6, 0.5: 0.9, 1.0: 0.7}


def _decay_and_scale(lam_t: torch.Tensor, lam_s: torch.Tensor, eta: float):
    """m(t->s) and c(t->s) of one exponential-integrator step."""
    level_t, level_s = NoiseLevel(lam_t), NoiseLevel(lam_s)
    h = 0.5 * (lam_s - lam_t)
    m = level_s.a / level_t.a * torch.exp(-(1.0 + eta) * h)
    c = level_s.s * (-torch.expm1(-2.0 * eta * h)).sqrt()
    return m, c


def _coarsen(z: torch.Tensor, lam: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of the grid with every other point of ``lam`` (noisiest first), from ``z``."""
    pairs = []
    for k in range(0, len(z), 2):
        lam_t, lam_u, lam_s = lam[k], lam[k + 1], lam[k + 2]
        m2, c2 = _decay_and_scale(lam_u, lam_s, eta)
        _, c1 = _decay_and_scale(lam_t, lam_u, eta)
        _, c = _decay_and_scale(lam_t, lam_s, eta)
        pairs.append((m2 * c1 * z[k] + c2 * z[k + 1]) / c)
    return torch.stack(pairs), lam[::2]


def _solve(den, steps: int, eta: float, x1: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x at t = 0 after ``steps`` log-SNR steps from x1, the k-th step drawing z[k]."""
    sampler = DPMSolverPP2MSDE(steps=steps, eta=eta, time_grid="log_snr", final_denoise=False)
    grid = Grid.build(den.schedule, steps, "log_snr", dtype=torch.float64)
    draws = iter(z)
    return sampler.run(NFECounter(den), x1, grid, lambda: next(draws), end=0)


@pytest.mark.parametrize("eta", sorted(ORDER_FLOOR))
def test_dpmpp_2m_sde_converges_strongly_at_its_order(eta):
    den = oracle_denoiser("ring8", "eps")
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(FINE, N, 2, generator=gen, dtype=torch.float64)
    grid = Grid.build(den.schedule, FINE, "log_snr", dtype=torch.float64)
    lam = grid.log_snr.flip(0)  # noisiest first, as the steps run
    reference = _solve(den, FINE, eta, x1, z)
    levels, errors = {}, {}
    steps, noise = FINE, z
    while steps > 16:
        noise, lam = _coarsen(noise, lam, eta)
        steps //= 2
        levels[steps] = noise
    for steps in (16, 32, 64):
        x = _solve(den, steps, eta, x1, levels[steps])
        errors[steps] = (x - reference).norm(dim=1).mean().item()
    orders = [math.log2(errors[s] / errors[2 * s]) for s in (16, 32)]
    assert min(orders) >= ORDER_FLOOR[eta], (errors, orders)
