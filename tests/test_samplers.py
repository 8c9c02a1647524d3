"""Samplers against the Gaussian-mixture oracle: enough steps reproduce the mixture."""

from __future__ import annotations

import pytest
import torch

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion import schedules as S
from diffexp.diffusion.samplers import Ancestral, time_grid
from diffexp.metrics.sliced_wasserstein import sliced_wasserstein
from tests.helpers import ENDS, oracle_denoiser


@pytest.mark.parametrize("param", ["eps", "x0"])
def test_ancestral_sampler_with_the_oracle_reproduces_the_mixture(param):
    den = oracle_denoiser("ring8", param, S.Cosine(**ENDS)).float()
    mixture = make_mixture("ring8")
    n = 4000
    result = Ancestral(steps=500).sample(den, (n, 2), generator=torch.Generator().manual_seed(0))
    assert result.nfe == 501
    ref, ref2 = (mixture.sample(n, generator=torch.Generator().manual_seed(s))[0] for s in (1, 2))
    distance = sliced_wasserstein(result.x, ref, n_projections=512)
    floor = sliced_wasserstein(ref2, ref, n_projections=512)
    assert distance < 1.5 * floor, (distance, floor)
    # and the samples sit on the modes as sharply as the data does
    gap = mixture.log_prob(result.x).mean() - mixture.log_prob(ref).mean()
    assert abs(gap.item()) < 0.1, gap


def test_ancestral_sampler_with_too_few_steps_is_measurably_worse():
    den = oracle_denoiser("ring8", "eps", S.Cosine(**ENDS)).float()
    mixture = make_mixture("ring8")
    n = 4000
    ref = mixture.sample(n, generator=torch.Generator().manual_seed(1))[0]
    gen = torch.Generator().manual_seed(0)
    coarse = Ancestral(steps=2, final_denoise=False).sample(den, (n, 2), generator=gen).x
    fine = Ancestral(steps=500).sample(den, (n, 2), generator=gen).x
    assert sliced_wasserstein(coarse, ref) > 2 * sliced_wasserstein(fine, ref)


def test_time_grids():
    sched = S.Cosine(**ENDS)
    t = time_grid(sched, 10, "uniform", dtype=torch.float64)
    torch.testing.assert_close(t, torch.linspace(0, 1, 11, dtype=torch.float64))
    t = time_grid(sched, 10, "log_snr", dtype=torch.float64)
    lam = sched.log_snr(t)
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((10,), -1.8, dtype=torch.float64))
    with pytest.raises(ValueError, match="valid"):
        time_grid(sched, 10, "karras-typo")


def test_deterministic_given_the_generator():
    den = oracle_denoiser("mixture1d", "v").float()
    a = Ancestral(steps=20).sample(den, (100, 1), generator=torch.Generator().manual_seed(3)).x
    b = Ancestral(steps=20).sample(den, (100, 1), generator=torch.Generator().manual_seed(3)).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)
