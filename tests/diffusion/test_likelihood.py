"""The PF-ODE log-likelihood of the Gaussian-mixture oracle against the true log-density."""

from __future__ import annotations

import math

import pytest
import torch

from diffexp.data.mixtures import GaussianMixture, make_mixture
from diffexp.diffusion import schedules as S
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.likelihood import (
    divergence_exact,
    divergence_hutchinson,
    ode_log_likelihood,
    rademacher,
)
from diffexp.diffusion.parameterizations import Eps
from diffexp.networks import Oracle
from tests.helpers import ENDS, F64, oracle_denoiser


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ring_points():
    mixture = make_mixture("ring8").to(dtype=F64)
    x0 = mixture.sample(256, generator=_gen(5))[0]
    return mixture, x0


@pytest.mark.parametrize("param", ["eps", "x0"])
def test_ode_likelihood_of_the_oracle_is_the_true_log_density(param, ring_points):
    mixture, x0 = ring_points
    den = oracle_denoiser("ring8", param, S.LogLinear(**ENDS))
    result = ode_log_likelihood(den, x0)
    error = result["log_likelihood_nats"] - mixture.log_prob(x0)
    assert error.abs().max() < 0.05, error.abs().max()
    assert error.mean().abs() < 0.005, error.mean()
    # bits/dim of the same density, d = 2
    torch.testing.assert_close(result["bpd"], -result["log_likelihood_nats"] / (2 * math.log(2)))
    torch.testing.assert_close(
        result["log_likelihood_nats"], result["prior_log_prob"] + result["delta_log_prob"]
    )
    assert 20 < result["nfe"] < 1000


def test_ode_likelihood_depends_on_the_schedule_only_through_its_endpoints(ring_points):
    mixture, x0 = ring_points
    x0 = x0[:64]
    lls = [
        ode_log_likelihood(oracle_denoiser("ring8", "eps", sched), x0)["log_likelihood_nats"]
        for sched in (S.Cosine(**ENDS), S.LogLinear(**ENDS))
    ]
    torch.testing.assert_close(lls[0], lls[1], rtol=0, atol=1e-6)


def test_hutchinson_divergence_is_unbiased_at_fixed_points():
    den = oracle_denoiser("ring8", "eps", S.LogLinear(**ENDS))
    x = torch.randn(64, 2, dtype=F64, generator=_gen(1)) * 1.5
    x.requires_grad_(True)
    out = den(x, log_snr=torch.tensor(1.0, dtype=F64))
    exact = divergence_exact(out.score, x)
    # grad . score = the Laplacian of log q: compare with autograd's full Jacobian trace
    jac = torch.autograd.functional.jacobian(
        lambda x: den(x, log_snr=torch.tensor(1.0, dtype=F64)).score.sum(0), x
    )  # [2, 64, 2]
    torch.testing.assert_close(exact, jac[0, :, 0] + jac[1, :, 1])
    probes = rademacher((4000, *x.shape), _gen(2), dtype=F64)
    samples = torch.stack(
        [divergence_hutchinson(out.score, x, probes[k : k + 1]) for k in range(0, 4000, 1)]
    )  # [4000, 64]: one-probe estimates
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert ((mean - exact).abs() <= 4 * stderr + 1e-9).all()


def test_hutchinson_likelihood_agrees_with_the_exact_one_within_its_monte_carlo_error(
    ring_points,
):
    _, x0 = ring_points
    den = oracle_denoiser("ring8", "eps", S.LogLinear(**ENDS))
    exact = ode_log_likelihood(den, x0, exact_divergence=True)["log_likelihood_nats"]
    one = ode_log_likelihood(den, x0, exact_divergence=False, generator=_gen(0))
    diff = one["log_likelihood_nats"] - exact
    stderr = diff.std() / math.sqrt(diff.numel())
    assert diff.std() > 0.01  # it is a random estimate
    assert diff.mean().abs() < 3 * stderr, (diff.mean(), stderr)
    # more probes, less variance (about 1 / sqrt(K))
    eight = ode_log_likelihood(
        den, x0, exact_divergence=False, hutchinson_samples=8, generator=_gen(0)
    )
    diff8 = eight["log_likelihood_nats"] - exact
    assert diff8.std() < 0.6 * diff.std()
    assert diff8.mean().abs() < 3 * diff8.std() / math.sqrt(diff8.numel())


def test_high_dimension_defaults_to_hutchinson_and_stays_unbiased():
    d = 24  # > 16: Hutchinson by default
    means = torch.zeros(2, d, dtype=F64)
    means[0, 0], means[1, 0] = -1.0, 1.0
    mixture = GaussianMixture(means, torch.tensor([0.3, 0.5], dtype=F64))
    param = Eps()
    den = Denoiser(Oracle(mixture, param), param, S.LogLinear(**ENDS)).double()
    x0 = mixture.sample(128, generator=_gen(3))[0]
    result = ode_log_likelihood(den, x0, rtol=1e-4, atol=1e-4, generator=_gen(4))
    error = result["log_likelihood_nats"] - mixture.log_prob(x0)
    stderr = error.std() / math.sqrt(error.numel())
    assert error.std() > 0  # estimated, not exact
    assert error.mean().abs() < 3 * stderr + 0.01, (error.mean(), stderr)
    torch.testing.assert_close(result["bpd"], -result["log_likelihood_nats"] / (d * math.log(2)))
