"""The ELBO and its three terms, in discrete and continuous time (MATH.md sections 2 and 3).

    -log p(x0) <= reconstruction + prior + diffusion     (all three in nats per example)

- reconstruction = -E log p(x0 | x_{t0}), t0 = 0, p = N(x0_hat, 1 / SNR(0));
- prior          = KL(q(x_1 | x0) || N(0, I));
- diffusion      = the denoising-matching term:
                   sum_i 1/2 (SNR(t_{i-1}) - SNR(t_i)) E||x0 - x0_hat||^2
                   for T steps, or -1/2 E_t[SNR'(t) ||x0 - x0_hat||^2] in continuous time (T = 0).

The diffusion term is computed on the error of whatever the network predicts, with the weight of
its parameterization (``log_x0_error_scale2``), so every parameterization gives the same number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffexp.diffusion.denoiser import Denoiser, broadcast_like
from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.diffusion.noise_sampling import ScheduleTimes, stratified_times
from diffexp.diffusion.parameterizations import Parameterization
from diffexp.diffusion.schedules import Schedule

SCHEDULE_TIMES = ScheduleTimes()


def diffuse(x0: Tensor, log_snr: Tensor, eps: Tensor) -> Tensor:
    """x_t = a x0 + s eps, a^2 = sigmoid(lambda), s^2 = sigmoid(-lambda)."""
    level = NoiseLevel(broadcast_like(log_snr, x0))
    return level.a * x0 + level.s * eps


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, from ``generator`` when given."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def snr_difference(log_snr_s: Tensor, log_snr_t: Tensor) -> Tensor:
    """SNR(s) - SNR(t) = exp(lambda_t) expm1(lambda_s - lambda_t), computed in log space."""
    return torch.exp(log_snr_t) * torch.expm1(log_snr_s - log_snr_t)


def posterior(
    x_t: Tensor, x0: Tensor, log_snr_s: Tensor, log_snr_t: Tensor
) -> tuple[Tensor, Tensor]:
    """q(x_s|x_t,x0) = N(mu_q, sigma_q^2), mu_q = alpha_ts s_s^2/s_t^2 x_t + a_s s_ts^2/s_t^2 x0."""
    level_s = NoiseLevel(broadcast_like(log_snr_s, x_t))
    level_t = NoiseLevel(broadcast_like(log_snr_t, x_t))
    log_alpha_ts2 = level_t.log_alpha_bar - level_s.log_alpha_bar  # a_t^2 / a_s^2
    s_ts2 = -torch.expm1(log_alpha_ts2)  # s_{t|s}^2 = 1 - a_t^2 / a_s^2 (variance preserving)
    s_s2, s_t2 = level_s.s2, level_t.s2
    mean = torch.exp(0.5 * log_alpha_ts2) * (s_s2 / s_t2) * x_t + level_s.a * (s_ts2 / s_t2) * x0
    var = s_ts2 * s_s2 / s_t2
    return mean, var


def gaussian_kl(mean_q: Tensor, var_q: Tensor, mean_p: Tensor, var_p: Tensor) -> Tensor:
    """KL(N(mean_q, var_q) || N(mean_p, var_p)), elementwise."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


def denoising_kl(x0: Tensor, x0_hat: Tensor, log_snr_s: Tensor, log_snr_t: Tensor) -> Tensor:
    """KL(q(x_s|x_t,x0) || p(x_s|x_t)) = 1/2 (SNR(s) - SNR(t)) ||x0 - x0_hat||^2, per example."""
    return 0.5 * snr_difference(log_snr_s, log_snr_t) * sum_except_batch((x0 - x0_hat) ** 2)


def prior_kl(x0: Tensor, log_snr_1: Tensor) -> Tensor:
    """KL(q(x_1|x0) || N(0, I)) = 1/2 sum_i (a_1^2 x0_i^2 + s_1^2 - 1 - log s_1^2), per example."""
    level = NoiseLevel(broadcast_like(log_snr_1, x0))
    a2 = level.alpha_bar
    # s^2 - 1 - log s^2 = -a^2 - logsigmoid(-lambda)
    per_dim = a2 * x0**2 - a2 - level.log_s2
    return 0.5 * sum_except_batch(per_dim.expand_as(x0))


def gaussian_reconstruction_nll(x0: Tensor, x0_hat: Tensor, log_snr_0: Tensor) -> Tensor:
    """-log N(x0; x0_hat, 1/SNR(0) I) = 1/2 sum_i (SNR (x0_i - x0_hat_i)^2 + log 2 pi - lambda)."""
    lam = broadcast_like(log_snr_0, x0)
    per_dim = NoiseLevel(lam).snr * (x0 - x0_hat) ** 2 + math.log(2 * math.pi) - lam
    return 0.5 * sum_except_batch(per_dim.expand_as(x0))


@dataclass
class ELBOTerms:
    """Per-example terms in nats; ``diffusion_parts`` [n, K] sum to ``diffusion``."""

    reconstruction: Tensor
    prior: Tensor
    diffusion: Tensor
    diffusion_log_snr: Tensor
    diffusion_parts: Tensor

    @property
    def nll(self) -> Tensor:
        """-ELBO = reconstruction + prior + diffusion (an upper bound on -log p(x0))."""
        return self.reconstruction + self.prior + self.diffusion

    @property
    def elbo(self) -> Tensor:
        """The ELBO in nats per example."""
        return -self.nll

    def bits_per_dim(self, dim: int) -> Tensor:
        """bits/dim = -ELBO / (d ln 2)."""
        return self.nll / (dim * math.log(2.0))

    def diffusion_in_bands(self, edges: list[float]) -> list[Tensor]:
        """The diffusion term split by log-SNR band (edges descending), per example."""
        out = []
        for hi, lo in zip(edges[:-1], edges[1:], strict=True):
            mask = (self.diffusion_log_snr <= hi) & (self.diffusion_log_snr > lo)
            out.append((self.diffusion_parts * mask).sum(dim=1))
        return out


ReconstructionNLL = Callable[[Tensor, Tensor, Tensor], Tensor]


def weighted_denoising_error(
    denoiser: Denoiser,
    x0: Tensor,
    log_snr: Tensor,
    log_x0_weight: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """exp(log_x0_weight) ||x0 - x0_hat(x_t)||^2 = exp(log_x0_weight) c^2 ||target - out||^2 per
    example at x_t = a x0 + s eps, eps ~ N(0, I) -> (that [n], ||target - out||^2 [n])."""
    eps = randn_like(x0, generator)
    out = denoiser(diffuse(x0, log_snr, eps), y=y, log_snr=log_snr).out
    return weighted_error(denoiser.parameterization, x0, eps, log_snr, log_x0_weight, out)


def weighted_error(
    param: Parameterization,
    x0: Tensor,
    eps: Tensor,
    log_snr: Tensor,
    log_x0_weight: Tensor,
    out: Tensor,
) -> tuple[Tensor, Tensor]:
    """(exp(log_x0_weight) c^2 ||target - out||^2, ||target - out||^2) per example, ``out`` the
    network's output at x_t = a x0 + s eps."""
    log_w = log_x0_weight + param.log_x0_error_scale2(log_snr)
    target = param.target(x0, eps, broadcast_like(log_snr, x0))
    squared = sum_except_batch((target - out) ** 2)
    return torch.exp(log_w) * squared, squared


def denoising_matching(
    denoiser: Denoiser,
    x0: Tensor,
    t: Tensor,
    y: Tensor | None = None,
    T: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One-sample estimates of the diffusion term at times t [n] -> (estimate [n], log_snr [n]).

    Continuous (T = 0): 1/2 (-lambda'(t)) SNR(t) c^2 ||target - out||^2.
    Discrete: t is mapped to the step i = ceil(t T), and the estimate is
    T * 1/2 (SNR(t_{i-1}) - SNR(t_i)) c^2 ||target - out||^2.
    Both are the weighted loss of ``loss.py`` with w = 1 and the schedule's p(lambda):
    1/2 (1 / p(lambda)) SNR ||x0 - x0_hat||^2.
    """
    levels = SCHEDULE_TIMES.from_uniform(denoiser.schedule, t, T)
    lam = levels.log_snr
    est, _ = weighted_denoising_error(denoiser, x0, lam, levels.elbo_log_weight(), y, generator)
    return est, lam


def endpoint_log_snr(schedule: Schedule, like: Tensor) -> Tensor:
    """(lambda(0), lambda(1)) in ``like``'s dtype and device (differentiable for a learned
    schedule)."""
    return schedule.log_snr(torch.tensor([0.0, 1.0], device=like.device, dtype=like.dtype))


def endpoint_terms(
    denoiser: Denoiser,
    x0: Tensor,
    y: Tensor | None = None,
    n_rec: int = 1,
    reconstruction_nll: ReconstructionNLL = gaussian_reconstruction_nll,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(reconstruction, prior) per example: -log p(x0 | x_{t0}) averaged over n_rec noise draws,
    and KL(q(x_1 | x0) || N(0, I)) in closed form."""
    lam_0, lam_1 = endpoint_log_snr(denoiser.schedule, x0)
    rec = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
    for _ in range(n_rec):
        x_t0 = diffuse(x0, lam_0, randn_like(x0, generator))
        rec = rec + reconstruction_nll(x0, denoiser(x_t0, y=y, log_snr=lam_0).x0_hat, lam_0) / n_rec
    return rec, prior_kl(x0, lam_1)


def default_max_elements(device: torch.device) -> int:
    """Numbers of x per network call in ``elbo_terms`` (rows x dimensions): 2^13 on a CPU, where
    calls of a few thousand rows are already compute-bound and larger ones leave the cache (the
    ring's MLP, 2 cores: 4 % faster than one call per level at 2000 examples, 45 % at 128, slower
    from 2^15 on); 2^22 on an accelerator, where a call's launch overhead dominates small calls."""
    return 2**13 if torch.device(device).type == "cpu" else 2**22


def elbo_terms(
    denoiser: Denoiser,
    x0: Tensor,
    y: Tensor | None = None,
    *,
    T: int = 0,
    n_t: int = 1,
    exact: bool = False,
    reconstruction_nll: ReconstructionNLL = gaussian_reconstruction_nll,
    generator: torch.Generator | None = None,
    max_elements: int | None = None,
) -> ELBOTerms:
    """The three ELBO terms per example, the diffusion term by n_t stratified times (or exactly).

    The reconstruction term is averaged over n_t noise draws (also with ``exact``); the prior
    term is in closed form.

    ``exact`` (discrete T only) sums the diffusion term over all T steps: the "ELBO loop".

    The noise levels share network calls: each call takes as many levels' copies of the batch as
    fit in ``max_elements`` numbers of x (at least one level; 0: one call per level; None:
    ``default_max_elements`` of x0's device). The draws are made in the same order whatever the
    grouping, so only float rounding depends on it.
    """
    n = x0.shape[0]
    n_rec = max(1, n_t)  # the reconstruction term averaged over n_t noise draws
    lam_0, lam_1 = endpoint_log_snr(denoiser.schedule, x0)
    eps_rec = [randn_like(x0, generator) for _ in range(n_rec)]
    if exact:
        if T <= 0:
            raise ValueError("the exact ELBO loop needs a discrete model: T > 0")
        # each step's own time: t = i / T exactly, weight 1/T so that T * (1/T) = 1
        steps = torch.arange(1, T + 1, device=x0.device, dtype=x0.dtype) / T
        t = steps.expand(n, T)
        scale = 1.0 / T
    else:
        t = stratified_times(n, n_t, generator, device=x0.device, dtype=x0.dtype)
        scale = 1.0 / n_t
    k = t.shape[1]
    levels = SCHEDULE_TIMES.from_uniform(denoiser.schedule, t.T.reshape(-1), T)  # level-major
    lam = levels.log_snr.expand(k * n)
    eps = torch.cat([randn_like(x0, generator) for _ in range(k)])
    x0_k = x0.repeat(k, *([1] * (x0.dim() - 1)))
    x_t = torch.cat([diffuse(x0, lam_0, e) for e in eps_rec] + [diffuse(x0_k, lam, eps)])
    lam_all = torch.cat([lam_0.expand(n_rec * n), lam])
    y_all = None if y is None else y.repeat(n_rec + k)
    if max_elements is None:
        max_elements = default_max_elements(x0.device)
    x0_hat, out = _denoise_in_groups(denoiser, x_t, lam_all, y_all, n, max_elements)

    rec = (
        sum(reconstruction_nll(x0, x0_hat[i * n : (i + 1) * n], lam_0) for i in range(n_rec))
        / n_rec
    )
    log_w = levels.elbo_log_weight().expand(k * n)
    est, _ = weighted_error(denoiser.parameterization, x0_k, eps, lam, log_w, out[n_rec * n :])
    parts = est.reshape(k, n).T * scale
    return ELBOTerms(
        reconstruction=rec,
        prior=prior_kl(x0, lam_1),
        diffusion=parts.sum(dim=1),
        diffusion_log_snr=lam.reshape(k, n).T,
        diffusion_parts=parts,
    )


def _denoise_in_groups(
    denoiser: Denoiser, x_t: Tensor, log_snr: Tensor, y: Tensor | None, n: int, max_elements: int
) -> tuple[Tensor, Tensor]:
    """(x0_hat, out) for rows that come in blocks of n, as many blocks per call as fit in
    ``max_elements`` numbers (at least one block)."""
    per_row = math.prod(x_t.shape[1:])
    rows = n * max(1, max_elements // (n * per_row)) if max_elements > 0 else n
    x0_hat, out = [], []
    for i in range(0, x_t.shape[0], rows):
        sl = slice(i, i + rows)
        pred = denoiser(x_t[sl], y=None if y is None else y[sl], log_snr=log_snr[sl])
        x0_hat.append(pred.x0_hat)
        out.append(pred.out)
    return torch.cat(x0_hat), torch.cat(out)
