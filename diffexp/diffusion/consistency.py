"""The ELBO's other form: consistency terms over two latents (MATH.md section 3, Luo eq. 45).

A T-step model has latents z_0..z_T at t_i = i / T (z_{-1} = x0, the data). Rearranging the same
log-ratio log p(x0, z_{0:T}) / q(z_{0:T} | x0) gives

    -ELBO = reconstruction + prior' + sum_{i=0..T-1} consistency_i,
    prior'         = E_{q(z_{T-1}|x0)} KL(q(z_T | z_{T-1}) || N(0, I)),
    consistency_i  = E_{q(z_{i-1}, z_{i+1} | x0)} E_{q(z_i | z_{i-1}, z_{i+1})}
                         [log q(z_i | z_{i-1}) - log p(z_i | z_{i+1})],

whose expectation is exactly the denoising form's (``elbo.elbo_terms``). The inner expectation
over z_i is in closed form (a Gaussian bridge between z_{i-1} and z_{i+1}), so each term is a
Monte Carlo estimate over the two latents z_{i-1}, z_{i+1} only.

Luo writes the inner term as KL(q(z_i | z_{i-1}) || p(z_i | z_{i+1})), which draws z_i without
its dependence on z_{i+1}; that expression is not the ELBO but a looser bound (-ELBO higher:
measured in ``tests/diffusion/test_consistency.py``). Here z_i follows the bridge, as the derivation
requires.

``diffusion`` of the returned terms is the sum of the consistency terms alone: with prior'
instead of the prior, its mean differs from the denoising form's diffusion term, and only the
totals (``nll``) are the same bound.
Everything is computed in float64: the transitions near t = 0 have variances of ~1e-6.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffexp.diffusion.denoiser import Denoiser, broadcast_like
from diffexp.diffusion.elbo import (
    ELBOTerms,
    ReconstructionNLL,
    diffuse,
    gaussian_reconstruction_nll,
    posterior,
    randn_like,
    stratified_times,
    sum_except_batch,
)
from diffexp.diffusion.noise_level import NoiseLevel


def transition(log_snr_s: Tensor, log_snr_t: Tensor) -> tuple[Tensor, Tensor]:
    """q(z_t|z_s) = N(alpha_ts z_s, s_ts^2): (alpha_ts, s_ts^2), alpha_ts^2 = a_t^2 / a_s^2."""
    log_alpha2 = NoiseLevel(log_snr_t).log_alpha_bar - NoiseLevel(log_snr_s).log_alpha_bar
    return torch.exp(0.5 * log_alpha2), -torch.expm1(log_alpha2)


def bridge(
    z_prev: Tensor, z_next: Tensor, log_snr_prev: Tensor, log_snr: Tensor, log_snr_next: Tensor
) -> tuple[Tensor, Tensor]:
    """q(z|z_prev,z_next) = N(m, v), m = alpha s_n^2/s_pn^2 z_prev + alpha_n s^2/s_pn^2 z_next."""
    alpha, var = transition(log_snr_prev, log_snr)  # q(z | z_prev)
    alpha_n, var_n = transition(log_snr, log_snr_next)  # q(z_next | z)
    var_pn = var_n + alpha_n**2 * var  # q(z_next | z_prev)
    w_prev = broadcast_like(alpha * var_n / var_pn, z_prev)
    w_next = broadcast_like(alpha_n * var / var_pn, z_prev)
    return w_prev * z_prev + w_next * z_next, broadcast_like(var * var_n / var_pn, z_prev)


def expected_log_ratio(
    mean: Tensor, var: Tensor, q_mean: Tensor, q_var: Tensor, p_mean: Tensor, p_var: Tensor
) -> Tensor:
    """E_{z~N(mean,var)}[log N(z; q_mean, q_var) - log N(z; p_mean, p_var)], summed per example."""
    e_q = ((mean - q_mean) ** 2 + var) / q_var
    e_p = ((mean - p_mean) ** 2 + var) / p_var
    return 0.5 * sum_except_batch(torch.log(p_var / q_var) + e_p - e_q)


def log_ratio(z: Tensor, q_mean: Tensor, q_var: Tensor, p_mean: Tensor, p_var: Tensor) -> Tensor:
    """log N(z; q_mean, q_var) - log N(z; p_mean, p_var), summed per example."""
    e_q = (z - q_mean) ** 2 / q_var
    e_p = (z - p_mean) ** 2 / p_var
    return 0.5 * sum_except_batch(torch.log(p_var / q_var) + e_p - e_q)


def consistency_term(
    denoiser: Denoiser,
    x0: Tensor,
    i: Tensor,
    T: int,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    sample_middle: bool = False,
) -> Tensor:
    """One-sample consistency_i per example (float64); i [n] in 0..T-1, z_{-1} = x0.

    The expectation over z_i is in closed form, or (``sample_middle``) one draw from the bridge:
    the plain one-sample log-ratio over the three latents z_{i-1}, z_i, z_{i+1}.
    """
    schedule = denoiser.schedule
    x0 = x0.double()
    i = i.double()
    lam = schedule.log_snr(i / T).double()
    lam_next = schedule.log_snr((i + 1) / T).double()
    lam_prev_latent = schedule.log_snr((i - 1).clamp_min(0) / T).double()
    lam_prev = torch.where(i > 0, lam_prev_latent, torch.full_like(lam, math.inf))
    z_prev = diffuse(x0, lam_prev, randn_like(x0, generator))
    alpha_pn, var_pn = transition(lam_prev, lam_next)
    z_next = broadcast_like(alpha_pn, x0) * z_prev + broadcast_like(var_pn, x0).sqrt() * randn_like(
        x0, generator
    )
    mean, var = bridge(z_prev, z_next, lam_prev, lam, lam_next)
    alpha, q_var = transition(lam_prev, lam)
    net_dtype = next((p.dtype for p in denoiser.parameters()), torch.float64)
    x0_hat = denoiser(z_next.to(net_dtype), y=y, log_snr=lam_next.to(net_dtype)).x0_hat.double()
    p_mean, p_var = posterior(z_next, x0_hat, lam, lam_next)
    q_mean = broadcast_like(alpha, x0) * z_prev
    if sample_middle:
        z = mean + var.sqrt() * randn_like(x0, generator)
        return log_ratio(z, q_mean, broadcast_like(q_var, x0), p_mean, p_var)
    return expected_log_ratio(mean, var, q_mean, broadcast_like(q_var, x0), p_mean, p_var)


def consistency_prior(
    x0: Tensor, log_snr_last: Tensor, log_snr_1: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """One-sample E_{q(z_{T-1}|x0)} KL(q(z_T|z_{T-1}) || N(0,I)) = 1/2 sum(alpha^2 z^2 + s^2 -
    1 - log s^2), per example (float64)."""
    x0 = x0.double()
    z = diffuse(x0, log_snr_last.double(), randn_like(x0, generator))
    alpha, var = transition(log_snr_last.double(), log_snr_1.double())
    per_dim = alpha**2 * z**2 + var - 1.0 - torch.log(var)
    return 0.5 * sum_except_batch(per_dim)


def consistency_terms(
    denoiser: Denoiser,
    x0: Tensor,
    y: Tensor | None = None,
    *,
    T: int,
    n_t: int = 1,
    exact: bool = False,
    reconstruction_nll: ReconstructionNLL = gaussian_reconstruction_nll,
    generator: torch.Generator | None = None,
    sample_middle: bool = False,
) -> ELBOTerms:
    """The consistency form's terms per example; the sum over i by n_t stratified steps (each
    scaled by T / n_t) or, with ``exact``, by all T steps (each with its own latents).
    ``sample_middle``: draw z_i instead of integrating it out (see ``consistency_term``)."""
    if T <= 0:
        raise ValueError("the consistency form needs a discrete model: T > 0")
    n = x0.shape[0]
    ends = torch.tensor([0.0, (T - 1) / T, 1.0], device=x0.device, dtype=torch.float64)
    lam_0, lam_last, lam_1 = denoiser.schedule.log_snr(ends).double()
    net_dtype = next((p.dtype for p in denoiser.parameters()), x0.dtype)
    x_t0 = diffuse(x0, lam_0, randn_like(x0.double(), generator)).to(net_dtype)
    x0_hat = denoiser(x_t0, y=y, log_snr=lam_0.to(net_dtype)).x0_hat
    rec = reconstruction_nll(x0, x0_hat.to(x0.dtype), lam_0.to(x0.dtype))
    prior = consistency_prior(x0, lam_last, lam_1, generator)
    if exact:
        steps = torch.arange(T, device=x0.device).expand(n, T)
        scale = 1.0
    else:
        t = stratified_times(n, n_t, generator, device=x0.device, dtype=torch.float64)
        steps = torch.clamp(torch.floor(t * T), 0, T - 1)
        scale = T / n_t
    parts = [
        consistency_term(denoiser, x0, steps[:, j], T, y, generator, sample_middle) * scale
        for j in range(steps.shape[1])
    ]
    parts_t = torch.stack(parts, dim=1)
    # tagged with the log-SNR the network sees (z_{i+1}'s), as the denoising form tags its terms
    lams = denoiser.schedule.log_snr((steps.double() + 1) / T).double().expand_as(parts_t)
    return ELBOTerms(
        reconstruction=rec.double(),
        prior=prior,
        diffusion=parts_t.sum(dim=1),
        diffusion_log_snr=lams,
        diffusion_parts=parts_t,
    )
