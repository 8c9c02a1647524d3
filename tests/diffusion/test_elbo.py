"""The ELBO's terms against closed forms, and the oracle's ELBO against the true likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion import schedules as S
from diffexp.diffusion.elbo import (
    denoising_kl,
    denoising_matching,
    diffuse,
    elbo_terms,
    endpoint_terms,
    gaussian_kl,
    gaussian_reconstruction_nll,
    posterior,
    prior_kl,
    stratified_times,
)
from tests.helpers import ENDS, F64, conf_options, oracle_denoiser


def _x(n=64, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), g


def test_posterior_is_bayes_rule():
    x0, g = _x()
    lam_s, lam_t = torch.tensor(2.0, dtype=F64), torch.tensor(-1.0, dtype=F64)
    x_t = diffuse(x0, lam_t, torch.randn(x0.shape, generator=g, dtype=F64))
    mean, var = posterior(x_t, x0, lam_s, lam_t)
    # q(x_s|x0) = N(a_s x0, s_s^2), q(x_t|x_s) = N(alpha x_s, s_ts^2): complete the square
    a_s2, a_t2 = torch.sigmoid(lam_s), torch.sigmoid(lam_t)
    alpha2 = a_t2 / a_s2
    s_s2, s_ts2 = 1 - a_s2, 1 - alpha2
    precision = 1 / s_s2 + alpha2 / s_ts2
    expected_mean = (a_s2.sqrt() * x0 / s_s2 + alpha2.sqrt() * x_t / s_ts2) / precision
    torch.testing.assert_close(var.expand_as(x0), (1 / precision).expand_as(x0))
    torch.testing.assert_close(mean, expected_mean)


def test_denoising_kl_matches_torch_distributions():
    x0, g = _x()
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=F64)
    lam_s = torch.rand(64, generator=g, dtype=F64) * 4
    lam_t = lam_s - torch.rand(64, generator=g, dtype=F64) * 3 - 0.01
    x_t = diffuse(x0, lam_t, torch.randn(x0.shape, generator=g, dtype=F64))
    mq, vq = posterior(x_t, x0, lam_s, lam_t)
    mp, vp = posterior(x_t, x0_hat, lam_s, lam_t)
    reference = kl_divergence(Normal(mq, vq.sqrt()), Normal(mp, vp.sqrt())).sum(1)
    torch.testing.assert_close(denoising_kl(x0, x0_hat, lam_s, lam_t), reference)
    torch.testing.assert_close(gaussian_kl(mq, vq, mp, vp).sum(1), reference)


def test_prior_kl_matches_torch_distributions():
    x0, _ = _x()
    for lam in (-8.0, -2.0, 1.0):
        lam1 = torch.tensor(lam, dtype=F64)
        a, s = torch.sigmoid(lam1).sqrt(), torch.sigmoid(-lam1).sqrt()
        reference = kl_divergence(Normal(a * x0, s), Normal(0.0, 1.0)).sum(1)
        torch.testing.assert_close(prior_kl(x0, lam1), reference)


def test_reconstruction_matches_normal_log_prob():
    x0, g = _x()
    x0_hat = x0 + 0.01 * torch.randn(x0.shape, generator=g, dtype=F64)
    lam0 = torch.tensor(9.0, dtype=F64)
    reference = -Normal(x0_hat, torch.exp(-lam0 / 2)).log_prob(x0).sum(1)
    torch.testing.assert_close(gaussian_reconstruction_nll(x0, x0_hat, lam0), reference)


def test_stratified_times_cover_each_stratum_once():
    t = stratified_times(8, 4, torch.Generator().manual_seed(0), dtype=F64)
    assert t.shape == (8, 4)
    for row in t:  # per example: one time in each quarter of [0, 1)
        assert sorted((row * 4).floor().tolist()) == [0, 1, 2, 3]
    assert ((t * 32).floor().unique().numel()) == 32  # and the batch together on a finer grid


@pytest.mark.parametrize("param", conf_options("parameterization"))
def test_oracle_denoiser_obeys_tweedie_and_matches_the_mixture(param):
    den = oracle_denoiser("ring8", param)
    mixture = make_mixture("ring8").to(dtype=F64)
    g = torch.Generator().manual_seed(0)
    x0, _ = mixture.sample(500, generator=g)
    for lam in (-6.0, 0.0, 4.0, 9.0):
        lam_t = torch.full((500,), lam, dtype=F64)
        x_t = diffuse(x0, lam_t, torch.randn(x0.shape, generator=g, dtype=F64))
        pred = den(x_t, log_snr=lam_t)
        lam64 = torch.tensor(lam, dtype=F64)
        a, s2 = torch.sigmoid(lam64).sqrt(), torch.sigmoid(-lam64)
        torch.testing.assert_close(pred.x0_hat, mixture.posterior_mean(x_t, lam_t))
        torch.testing.assert_close(pred.score, mixture.score(x_t, lam_t))
        # Tweedie: a E[x0|x_t] = x_t + s^2 grad log q(x_t)
        torch.testing.assert_close(a * pred.x0_hat, x_t + s2 * pred.score)


def _mean_and_se(v: torch.Tensor) -> tuple[float, float]:
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


def test_oracle_continuous_elbo_is_within_002_nats_of_the_true_log_likelihood():
    # each stratified time's estimate has a std of ~13 nats (the integrand at high SNR is mostly
    # noise that cancels the reconstruction term), so this takes 6.4M oracle evaluations
    den = oracle_denoiser("ring8", "eps").float()
    mixture = make_mixture("ring8")
    x0, _ = mixture.sample(8000, generator=torch.Generator().manual_seed(1))
    terms = elbo_terms(den, x0, n_t=800, generator=torch.Generator().manual_seed(2))
    # paired per example: what remains is the Monte Carlo error of the ELBO estimator
    gap, se = _mean_and_se(mixture.log_prob(x0).double() - terms.elbo.double())
    assert se < 0.005
    assert gap > -3 * se  # a bound (up to Monte Carlo error)
    assert abs(gap) < 0.02, (gap, se)


def test_vdm_invariance_equal_endpoints_give_equal_continuous_elbo():
    mixture = make_mixture("ring8")
    x0, _ = mixture.sample(4000, generator=torch.Generator().manual_seed(3))
    true_ll = mixture.log_prob(x0).double()
    estimates = {}
    for i, sched in enumerate([S.Linear(**ENDS), S.Cosine(**ENDS), S.LogLinear(**ENDS)]):
        den = oracle_denoiser("ring8", "eps", sched).float()
        terms = elbo_terms(den, x0, n_t=500, generator=torch.Generator().manual_seed(10 + i))
        # the gap to the true log-likelihood, paired per example, carries only Monte Carlo error
        estimates[type(sched).__name__] = _mean_and_se(true_ll - terms.elbo.double())
    names = list(estimates)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (ma, sa), (mb, sb) = estimates[a], estimates[b]
            assert abs(ma - mb) < 4 * math.hypot(sa, sb), estimates
    # and the comparison is informative: the Monte Carlo error is small (log-linear spends its
    # samples evenly in log-SNR and has the least; VDM's point about learning the schedule)
    assert all(se < 0.04 for _, se in estimates.values()), estimates
    assert estimates["LogLinear"][1] < min(estimates["Linear"][1], estimates["Cosine"][1])


def test_discrete_elbo_increases_with_T_towards_the_continuous_one():
    den = oracle_denoiser("ring8", "eps", S.LogLinear(**ENDS)).float()
    mixture = make_mixture("ring8")
    x0, _ = mixture.sample(2000, generator=torch.Generator().manual_seed(4))
    elbos = {}
    for T in (2, 10, 50, 250, 1000):
        g = torch.Generator().manual_seed(5)
        terms = elbo_terms(den, x0, T=T, exact=True, n_t=20, generator=g)
        elbos[T] = _mean_and_se(terms.elbo.double())
    cont = _mean_and_se(
        elbo_terms(den, x0, n_t=400, generator=torch.Generator().manual_seed(6)).elbo.double()
    )
    values = [m for m, _ in elbos.values()]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), elbos
    # the discretization gap shrinks like 1/T: T = 1000 is within 0.1 nats of the continuous
    # limit (from below, up to Monte Carlo error) and less than half as far as T = 250
    (m250, _), (m1000, se1000), (mc, sec) = elbos[250], elbos[1000], cont
    assert -4 * math.hypot(se1000, sec) < mc - m1000 < min(0.1, (mc - m250) / 2), (elbos, cont)


def test_exact_loop_equals_expectation_of_the_one_sample_estimate():
    den = oracle_denoiser("mixture1d", "x0", S.Cosine(**ENDS))
    mixture = make_mixture("mixture1d").to(dtype=F64)
    x0, _ = mixture.sample(400, generator=torch.Generator().manual_seed(6))
    exact = elbo_terms(den, x0, T=20, exact=True, generator=torch.Generator().manual_seed(7))
    sampled = elbo_terms(den, x0, T=20, n_t=20, generator=torch.Generator().manual_seed(8))
    (me, se_e), (ms, se_s) = _mean_and_se(exact.diffusion), _mean_and_se(sampled.diffusion)
    assert abs(me - ms) < 4 * math.hypot(se_e, se_s)


def test_band_split_sums_to_the_diffusion_term():
    den = oracle_denoiser("ring8", "v")
    x0, _ = make_mixture("ring8").to(dtype=F64).sample(200)
    terms = elbo_terms(den, x0, n_t=8)
    bands = terms.diffusion_in_bands([math.inf, 5.0, 0.0, -5.0, -math.inf])
    torch.testing.assert_close(sum(bands), terms.diffusion)


@pytest.mark.parametrize("T, exact", [(0, False), (20, False), (20, True)])
@pytest.mark.parametrize("param", conf_options("parameterization"))
def test_elbo_terms_in_grouped_calls_equal_one_call_per_level(param, T, exact):
    """Grouping the noise levels into few network calls changes no draw: the terms equal one call
    per level (max_elements=0) and the composition of endpoint_terms and denoising_matching."""
    den = oracle_denoiser("ring8", param)
    x0, _ = (
        make_mixture("ring8").to(dtype=F64).sample(50, generator=torch.Generator().manual_seed(3))
    )
    n_t = 6

    def terms(max_elements):
        gen = torch.Generator().manual_seed(4)
        return elbo_terms(
            den, x0, T=T, n_t=n_t, exact=exact, generator=gen, max_elements=max_elements
        )

    grouped, three_levels, per_level = terms(2**20), terms(3 * 50 * 2), terms(0)
    gen = torch.Generator().manual_seed(4)
    rec, prior = endpoint_terms(den, x0, None, n_t, generator=gen)
    k = T if exact else n_t
    t = (torch.arange(1, T + 1, dtype=F64) / T).expand(50, T) if exact else None
    if t is None:
        t = stratified_times(50, n_t, gen, dtype=F64)
    parts = torch.stack(
        [denoising_matching(den, x0, t[:, j], None, T, gen)[0] for j in range(k)], 1
    )
    for got in (grouped, three_levels, per_level):
        torch.testing.assert_close(got.reconstruction, rec, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.prior, prior, rtol=0, atol=0)
        torch.testing.assert_close(got.diffusion_parts, parts / k, rtol=1e-12, atol=1e-12)
