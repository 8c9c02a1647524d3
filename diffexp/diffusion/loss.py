"""One loss for every objective: draw lambda ~ p, noise, Denoiser, target, w / p (MATH.md 9).

    loss(x0) = 1/2 (w(lambda) / p(lambda)) ||eps_hat - eps||^2,   lambda ~ p, eps ~ N(0, I)
             = 1/2 (w(lambda) / p(lambda)) SNR c^2 ||target - out||^2

an unbiased one-sample estimate of L_w = 1/2 int w(lambda) E||eps_hat - eps||^2 dlambda for any
p(lambda) (importance sampling). With w = 1 it is the ELBO's diffusion term (and, with the
schedule's p, ``elbo.denoising_matching`` exactly); the ``elbo`` weighting adds the reconstruction
and prior terms, so its loss is the one-sample negative ELBO.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import (
    ReconstructionNLL,
    diffuse,
    endpoint_log_snr,
    gaussian_reconstruction_nll,
    prior_kl,
    randn_like,
    weighted_denoising_error,
    weighted_error,
)
from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.diffusion.noise_sampling import DrawnLevels, NoiseSampling, ScheduleTimes
from diffexp.diffusion.parameterizations import Parameterization
from diffexp.diffusion.schedules import Schedule
from diffexp.diffusion.weighting import Weighting, WeightingInputs, implied_log_weight

# a warning when the largest term of the loss estimate exceeds its mean by this factor (and by ten
# times what the schedule's own p gives; ``WeightedLoss.importance_weight_spread``). On the ring's
# range, measured after 6000 steps: the ELBO under logit_normal (spread 1.4e5) trains to a bound
# 1.6 nats looser than under the schedule's p (1.8), flow matching under logit_normal (2.9e3)
# 0.70 nats looser than under its schedule (1.3); the ELBO under lognormal (91) 0.15 nats looser
HEAVY_TAILED_SPREAD = 1e3


@dataclass
class LossOutput:
    """The scalar loss and its named parts (batch means, for logging and NaN reports); per
    example, the one-sample weighted diffusion loss (``diffusion``; for the ELBO, the diffusion
    term's estimate), the log-SNR it was drawn at and 1/p(lambda) there (``diffusion /
    inv_density`` is the weighted loss 1/2 w ||eps_hat - eps||^2 without the importance weight)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    diffusion: Tensor | None = None
    log_snr: Tensor | None = None
    inv_density: Tensor | None = None


# the ELBO's reconstruction term in training: x0_hat at x_{t0} from the network ("denoiser", one
# batched call with the diffusion term), or VDM's decoder mean x_{t0} / a_0 ("latent", no call)
RECONSTRUCTIONS = ("denoiser", "latent")


class WeightedLoss:
    """The objective: a weighting w(lambda), a noise-level density p(lambda) and the Denoiser's
    parameterization, composed as 1/2 (w / p) ||eps_hat - eps||^2; for the ELBO weighting, the
    reconstruction term's decoder mean by ``reconstruction`` (RECONSTRUCTIONS)."""

    def __init__(
        self,
        weighting: Weighting,
        noise_sampling: NoiseSampling | None = None,
        reconstruction: str = "denoiser",
    ) -> None:
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(
                f"model.reconstruction={reconstruction!r} is not a decoder; valid: "
                f"{', '.join(RECONSTRUCTIONS)}"
            )
        self.weighting = weighting
        self.noise_sampling = noise_sampling if noise_sampling is not None else ScheduleTimes()
        self.reconstruction = reconstruction

    def log_weight_over_density(self, denoiser: Denoiser, levels: DrawnLevels, dim: int) -> Tensor:
        """log(1/2 (w / p) SNR): the per-example log weight on ||x0 - x0_hat||^2."""
        own = isinstance(self.noise_sampling, ScheduleTimes)  # p is the schedule's density
        inputs = WeightingInputs(
            levels.log_snr,
            denoiser.parameterization,
            denoiser.schedule,
            dim,
            levels.inv_density if own else None,
        )
        w = self.weighting.log_weight(inputs)
        return levels.elbo_log_weight() if w is None else levels.elbo_log_weight() + w

    def draw_levels(
        self, denoiser: Denoiser, x0: Tensor, T: int, generator: torch.Generator | None
    ) -> tuple[DrawnLevels, Tensor]:
        """Noise levels lambda ~ p and their log weight log(1/2 (w / p) SNR) per example."""
        fixed = not self.weighting.trains_schedule
        with torch.no_grad() if fixed else contextlib.nullcontext():
            levels = self.noise_sampling.draw(denoiser.schedule, x0.shape[0], T, generator, x0)
            log_w = self.log_weight_over_density(denoiser, levels, math.prod(x0.shape[1:]))
        return levels, log_w

    def diffusion_loss(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        y: Tensor | None = None,
        T: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, DrawnLevels]:
        """(1/2 (w / p) ||eps_hat - eps||^2, ||target - out||^2, the drawn levels), per example."""
        levels, log_w = self.draw_levels(denoiser, x0, T, generator)
        est, squared = weighted_denoising_error(denoiser, x0, levels.log_snr, log_w, y, generator)
        return est, squared, levels

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        y: Tensor | None = None,
        T: int = 0,
        reconstruction_nll: ReconstructionNLL = gaussian_reconstruction_nll,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Mean over the batch of the one-sample loss (for the ELBO: -ELBO in nats)."""
        if self.weighting.includes_endpoint_terms:
            rec, prior, diffusion, levels = self.elbo_in_one_call(
                denoiser, x0, y, T, reconstruction_nll, generator
            )
            terms = {"reconstruction": rec.mean(), "prior": prior.mean()}
            terms["diffusion"] = diffusion.mean()
            loss = (rec + prior + diffusion).mean()
        else:
            diffusion, squared, levels = self.diffusion_loss(denoiser, x0, y, T, generator)
            terms = {"mse": squared.mean() / math.prod(x0.shape[1:])}
            loss = diffusion.mean()
        return LossOutput(loss, terms, diffusion, levels.log_snr, levels.inv_density)

    def elbo_in_one_call(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        y: Tensor | None,
        T: int,
        reconstruction_nll: ReconstructionNLL,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor, DrawnLevels]:
        """(reconstruction, prior, diffusion, the drawn levels) per example, the reconstruction at
        x_{t0} and the diffusion term at x_t from one network call on both (the draws in the order
        of ``endpoint_terms`` then ``diffusion_loss``, so the estimates are theirs); with
        ``reconstruction="latent"`` the decoder mean is x_{t0} / a_0 and only x_t is called."""
        n = x0.shape[0]
        lam_0, lam_1 = endpoint_log_snr(denoiser.schedule, x0)
        x_t0 = diffuse(x0, lam_0, randn_like(x0, generator))
        levels, log_w = self.draw_levels(denoiser, x0, T, generator)
        eps = randn_like(x0, generator)
        x_t = diffuse(x0, levels.log_snr, eps)
        if self.reconstruction == "latent":
            out = denoiser(x_t, y=y, log_snr=levels.log_snr).out
            rec = reconstruction_nll(x0, x_t0 / NoiseLevel(lam_0).a, lam_0)
        else:
            pred = denoiser(
                torch.cat([x_t0, x_t]),
                y=None if y is None else torch.cat([y, y]),
                log_snr=torch.cat([lam_0.expand(n), levels.log_snr]),
            )
            out, rec = pred.out[n:], reconstruction_nll(x0, pred.x0_hat[:n], lam_0)
        diffusion, _ = weighted_error(
            denoiser.parameterization, x0, eps, levels.log_snr, log_w, out
        )
        return rec, prior_kl(x0, lam_1), diffusion, levels

    def importance_weight_spread(
        self, parameterization: Parameterization, schedule: Schedule, n_points: int = 2001
    ) -> float:
        """max_lambda f(lambda) / p(lambda) over int f dlambda = E_p[f / p], with f = w g: how far
        the largest term of the loss estimate exceeds its mean on the schedule's range (1 when p
        is proportional to f; large means heavy-tailed). g = a^2 = sigmoid(lambda) stands for
        E||eps_hat - eps||^2 / d of a perfect denoiser of unit-variance Gaussian data, which
        vanishes at low log-SNR (there any p is harmless) and tends to 1 at high log-SNR."""
        lam_0, lam_1 = schedule.endpoints
        lam = torch.linspace(lam_0, lam_1, n_points, dtype=torch.float64)
        schedule = copy.deepcopy(schedule).double()
        log_w = implied_log_weight(self.weighting, parameterization, schedule, lam, dim=1)
        log_w = log_w + NoiseLevel(lam).log_alpha_bar
        with torch.no_grad():
            log_ratio = log_w - self.noise_sampling.log_density(schedule, lam)
        top = log_w.max()
        integral = torch.trapezoid(torch.exp(log_w - top), -lam).log() + top
        return float(torch.exp(log_ratio.max() - integral))

    def __repr__(self) -> str:
        return f"WeightedLoss({self.weighting!r}, {self.noise_sampling!r})"
