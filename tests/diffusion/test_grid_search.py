"""The grid search of ``time_grid=optimized``: the energy distance against its closed form, the
warped family, the search on a score with a known minimum, optimized times in the samplers, and
on the oracle an optimized grid whose sample KL beats every fixed grid's."""

from __future__ import annotations

import math

import pytest
import torch

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion import samplers as S
from diffexp.diffusion.grid_search import (
    energy_distance,
    fit_time_grid,
    optimize_log_snr_grid,
    times_of_log_snr,
    warped_log_snr,
)
from diffexp.metrics.sample_kl import sample_kl
from tests.helpers import oracle_denoiser


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _abs_normal_mean(m: float, s: float) -> float:
    """E|Z| for Z ~ N(m, s^2): s sqrt(2/pi) exp(-m^2 / 2s^2) + m (1 - 2 Phi(-m/s))."""
    phi = 0.5 * (1 + math.erf(-m / (s * math.sqrt(2))))
    return s * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * s**2)) + m * (1 - 2 * phi)


@pytest.mark.parametrize("mu", [0.0, 0.5, 2.0])
def test_energy_distance_of_two_normals_matches_the_closed_form(mu):
    """D^2(N(0,1), N(mu,1)) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|, X - Y ~ N(-mu, 2)."""
    n = 4000
    # the normal's quantiles at (i + 1/2) / n: an empirical law within O(1/n) of N(0, 1), so
    # that the comparison is not blurred by sampling noise (random draws: +- 0.03 at this n)
    x = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    y = mu + x.flip(0)
    exact = 2 * _abs_normal_mean(mu, math.sqrt(2)) - 2 * _abs_normal_mean(0.0, math.sqrt(2))
    assert energy_distance(x, y, chunk=1000) == pytest.approx(exact, abs=2e-3)


def test_energy_distance_is_symmetric_and_chunk_free():
    x = torch.randn(300, 3, generator=_gen(0))
    y = torch.randn(200, 3, generator=_gen(1)) + 0.3
    d = energy_distance(x, y)
    assert d == pytest.approx(energy_distance(y, x), rel=1e-12)
    assert d == pytest.approx(energy_distance(x, y, chunk=7), rel=1e-12)
    assert energy_distance(x.view(300, 3, 1, 1), y.view(200, 3, 1, 1)) == pytest.approx(d)


def test_the_warped_family_spans_the_ends_and_bends_towards_high_snr():
    lam = warped_log_snr(-4.0, 8.0, 0.5, 10)
    assert lam[0] == 8.0 and lam[-1] == -4.0 and (lam[1:] < lam[:-1]).all()
    gaps = lam[:-1] - lam[1:]
    assert gaps[0] < gaps[-1]  # rho < 1: the steps are shorter at high SNR
    torch.testing.assert_close(
        warped_log_snr(-4.0, 8.0, 1.0, 4), torch.tensor([8.0, 5.0, 2.0, -1.0, -4.0]).double()
    )


def test_the_search_finds_a_known_grid():
    """A score with its minimum at a grid outside the warped family: the search gets within a
    small distance of it, better than every start."""
    target = torch.tensor([9.0, 6.5, 5.5, 2.0, -1.0, -6.0], dtype=torch.float64)

    def score(lam: torch.Tensor) -> float:
        return float(((lam - target) ** 2).sum())

    fixed = {"log_snr": torch.linspace(10.0, -8.0, 6, dtype=torch.float64)}
    result = optimize_log_snr_grid(score, -8.0, 10.0, 5, fixed=fixed)
    assert result.score < 0.05 * min(result.fixed.values())
    assert result.score < 0.05 * min(result.family.values())
    torch.testing.assert_close(result.log_snr, target, atol=0.2, rtol=0)
    assert result.history == sorted(result.history, reverse=True)
    assert result.evaluations >= len(result.family) + 1


def test_optimized_times_are_the_grid_a_sampler_walks():
    den = oracle_denoiser()
    times = [0.0, 0.1, 0.25, 0.6, 1.0]
    seen: list[S.StepInfo] = []
    sampler = S.DDIM(steps=4, eta=0.0, time_grid="optimized", times=times)
    sampler.sample(den, (8, 2), generator=_gen(0), dtype=torch.float64, callback=seen.append)
    assert [float(info.t) for info in seen] == [1.0, 0.6, 0.25, 0.1, 0.0]
    assert "times=[0.0, 0.1, 0.25, 0.6, 1.0]" in repr(sampler)
    assert "times" not in repr(S.DDIM(steps=4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"time_grid": "log_snr", "times": [0.0, 0.5, 1.0]}, "time_grid=optimized only"),
        ({"time_grid": "optimized", "times": [0.0, 1.0]}, "cannot run steps=2"),
        ({"time_grid": "optimized", "times": [0.0, 0.6, 0.5]}, "increase strictly"),
        ({"time_grid": "optimized", "times": [0.0, 0.5, 1.2]}, "within [0, 1]"),
    ],
)
def test_bad_optimized_times_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        S.DDIM(steps=2, **kwargs)


def test_an_optimized_grid_without_times_refuses_to_sample():
    with pytest.raises(ValueError, match="python -m diffexp.optimize_grid"):
        S.DDIM(steps=2, time_grid="optimized").sample(oracle_denoiser(), (4, 2))


def test_a_fit_that_does_not_hold_up_on_fresh_noise_keeps_the_best_fixed_grid():
    """DDIM (deterministic) with a reference drawn on its log-SNR grid from the held-out noise:
    there no grid is better than that one, so the fit keeps the best fixed grid's times."""
    den = oracle_denoiser().float()
    sampler = S.DDIM(steps=3, eta=0.0, time_grid="log_snr", final_denoise="last_step")
    ref = sampler.sample(den, (400, 2), generator=_gen(9)).x
    result, kept = fit_time_grid(
        sampler, den, (400, 2), ref, seed=0, heldout_seeds=(9,), fractions=(0.0, 0.2), sweeps=1
    )
    assert set(result.heldout) == {"optimized", result.chosen}
    assert result.chosen in S.TIME_GRIDS and result.heldout[result.chosen] < 0  # same samples
    assert kept.time_grid == "optimized"
    fixed = S.Grid.build(den.schedule, 3, result.chosen, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(kept.times, dtype=torch.float64), fixed.t)


@pytest.mark.slow
def test_on_the_oracle_the_optimized_grid_beats_every_fixed_grid_in_kl():
    """Euler-Maruyama at 5 NFE: the grid fitted by energy distance (2000 samples) has a lower
    sample KL to the true density (20 000 fresh samples) than the uniform, log-SNR and Karras
    grids; measured 0.05 against 0.2 or more for the best fixed one."""
    den = oracle_denoiser().float()
    mixture = make_mixture("ring8").to(dtype=torch.float64)
    steps, n = 5, 2000
    sampler = S.ReverseSDE(steps=steps, final_denoise="last_step")
    ref = S.ReverseSDE(steps=200, final_denoise="last_step").sample(den, (n, 2), generator=_gen(1))
    result, optimized = fit_time_grid(sampler, den, (n, 2), ref.x, seed=0, sweeps=1)
    assert optimized.time_grid == "optimized" and optimized.steps == steps
    assert optimized.times == times_of_log_snr(den.schedule, result.log_snr)
    assert set(result.fixed) == set(S.TIME_GRIDS) and result.score < min(result.fixed.values())

    def kl(s: S.Sampler) -> float:
        x = s.sample(den, (20_000, 2), generator=_gen(5)).x.double()
        return sample_kl(x, mixture.log_prob) if torch.isfinite(x).all() else math.inf

    fixed = {
        k: kl(S.ReverseSDE(steps=steps, final_denoise="last_step", time_grid=k))
        for k in S.TIME_GRIDS
    }
    assert kl(optimized) < 0.1 < min(fixed.values()), fixed
