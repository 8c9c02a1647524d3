"""The ELBO's consistency form (MATH.md section 3) against the denoising form, on the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion.consistency import (
    bridge,
    consistency_term,
    consistency_terms,
    expected_log_ratio,
    log_ratio,
    transition,
)
from diffexp.diffusion.elbo import diffuse, elbo_terms, gaussian_kl, posterior, randn_like
from tests.helpers import F64, oracle_denoiser


def _data(n: int, seed: int = 0) -> torch.Tensor:
    mixture = make_mixture("ring8").to(dtype=F64)
    return mixture.sample(n, generator=torch.Generator().manual_seed(seed))[0]


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


def test_bridge_is_gaussian_conditioning_of_the_chain():
    lam_prev, lam, lam_next = (torch.tensor(v, dtype=F64) for v in (3.0, 1.0, -2.0))
    z_prev, z_next = torch.tensor([[0.7]], dtype=F64), torch.tensor([[-1.3]], dtype=F64)
    mean, var = bridge(z_prev, z_next, lam_prev, lam, lam_next)
    # z | z_prev ~ N(a z_prev, v); z_next | z ~ N(b z, w): condition the joint on z_next
    a, v = transition(lam_prev, lam)
    b, w = transition(lam, lam_next)
    cov, var_next = b * v, b**2 * v + w
    expected_mean = a * z_prev + cov / var_next * (z_next - b * a * z_prev)
    expected_var = v - cov**2 / var_next
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var.expand_as(var), rtol=1e-12, atol=1e-12)


def test_bridge_from_the_data_is_the_forward_posterior():
    """i = 0: z_{-1} = x0 has log-SNR +inf, and the bridge is q(z_0 | z_1, x0)."""
    lam, lam_next = torch.tensor(6.0, dtype=F64), torch.tensor(2.0, dtype=F64)
    x0, z_next = torch.tensor([[0.4, -1.0]], dtype=F64), torch.tensor([[0.9, 0.2]], dtype=F64)
    mean, var = bridge(x0, z_next, torch.tensor(math.inf, dtype=F64), lam, lam_next)
    p_mean, p_var = posterior(z_next, x0, lam, lam_next)
    torch.testing.assert_close(mean, p_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, p_var.expand_as(var), rtol=1e-12, atol=1e-12)


def test_stratified_steps_estimate_the_same_bound():
    """n_t = 4 stratified steps, scaled by T / n_t, against the denoising form's exact loop."""
    den, x0, T = oracle_denoiser("ring8"), _data(20_000, 4), 10
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        denoising = elbo_terms(den, x0, T=T, exact=True, generator=g)
        consistency = consistency_terms(den, x0, T=T, n_t=4, generator=g)
    m, se = _mean_se(consistency.nll - denoising.nll)
    assert abs(m) < 4 * se and se < 0.3, (m, se)


def test_transition_composes_to_the_marginal():
    lam_s, lam_t = torch.tensor(4.0, dtype=F64), torch.tensor(-1.0, dtype=F64)
    alpha, var = transition(lam_s, lam_t)
    a_s2, a_t2 = torch.sigmoid(lam_s), torch.sigmoid(lam_t)
    # a_t x0 + noise: alpha^2 a_s^2 = a_t^2 and alpha^2 s_s^2 + var = s_t^2
    assert (alpha**2 * a_s2).item() == pytest.approx(a_t2.item(), rel=1e-12)
    assert (alpha**2 * (1 - a_s2) + var).item() == pytest.approx(1 - a_t2.item(), rel=1e-12)


def test_expected_log_ratio_is_the_mean_of_sampled_log_ratios():
    g = torch.Generator().manual_seed(0)
    mean, var = torch.tensor([[0.3, -0.2]], dtype=F64), torch.tensor([[0.5, 0.2]], dtype=F64)
    q_mean, q_var = torch.tensor([[0.1, 0.0]], dtype=F64), torch.tensor([[0.6, 0.3]], dtype=F64)
    p_mean, p_var = torch.tensor([[0.4, -0.5]], dtype=F64), torch.tensor([[0.4, 0.25]], dtype=F64)
    z = mean + var.sqrt() * torch.randn(400_000, 2, generator=g, dtype=F64)
    sampled = log_ratio(z, q_mean, q_var, p_mean, p_var)
    m, se = _mean_se(sampled)
    closed = expected_log_ratio(mean, var, q_mean, q_var, p_mean, p_var).item()
    assert abs(m - closed) < 4 * se


@pytest.mark.parametrize("sample_middle", [False, True])
def test_consistency_form_has_the_denoising_forms_expectation(sample_middle):
    """Both forms rearrange one log-ratio: equal means at T = 10 (exact loops, same examples)."""
    den, x0, T = oracle_denoiser("ring8"), _data(20_000), 10
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        denoising = elbo_terms(den, x0, T=T, exact=True, generator=g)
        consistency = consistency_terms(
            den, x0, T=T, exact=True, generator=g, sample_middle=sample_middle
        )
    diff = consistency.nll - denoising.nll
    m, se = _mean_se(diff)
    assert abs(m) < 4 * se, (m, se)
    assert se < 0.15  # precise enough to catch a term missing from either form


def test_luos_literal_inner_kl_is_a_looser_bound():
    """KL(q(z_i|z_{i-1}) || p(z_i|z_{i+1})) draws z_i ignoring z_{i+1}: -ELBO comes out higher."""
    den, x0, T = oracle_denoiser("ring8"), _data(20_000), 10
    g = torch.Generator().manual_seed(2)
    i = torch.full((x0.shape[0],), 4.0, dtype=F64)
    lam = lambda k: den.schedule.log_snr(torch.full_like(i, k / T))  # noqa: E731
    with torch.no_grad():
        bridged = consistency_term(den, x0, i, T, generator=g)
        z_prev = diffuse(x0, lam(3), randn_like(x0, g))
        alpha_pn, var_pn = transition(lam(3), lam(5))
        z_next = alpha_pn[:, None] * z_prev + var_pn[:, None].sqrt() * randn_like(x0, g)
        alpha, var = transition(lam(3), lam(4))
        p_mean, p_var = posterior(z_next, den(z_next, log_snr=lam(5)).x0_hat, lam(4), lam(5))
        literal = gaussian_kl(alpha[:, None] * z_prev, var[:, None], p_mean, p_var).sum(dim=1)
    (mb, seb), (ml, sel) = _mean_se(bridged), _mean_se(literal)
    assert ml - mb > 10 * math.hypot(seb, sel), (mb, ml)


def test_consistency_estimator_is_far_noisier_than_the_denoising_one_at_large_T():
    den, x0, T = oracle_denoiser("ring8"), _data(5000), 1000
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        denoising = elbo_terms(den, x0, T=T, n_t=1, generator=g).nll.std().item()
        consistency = consistency_terms(den, x0, T=T, n_t=1, generator=g).nll.std().item()
    assert consistency > 4 * denoising, (denoising, consistency)


def test_consistency_form_needs_a_discrete_model():
    with pytest.raises(ValueError, match="T > 0"):
        consistency_terms(oracle_denoiser(), _data(4), T=0)
