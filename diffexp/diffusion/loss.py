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
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import (
    ReconstructionNLL,
    endpoint_terms,
    gaussian_reconstruction_nll,
    weighted_denoising_error,
)
from diffexp.diffusion.noise_sampling import NoiseLevels, NoiseSampling, ScheduleTimes
from diffexp.diffusion.weighting import Weighting, WeightingInputs


@dataclass
class LossOutput:
    """The scalar loss and its named parts (batch means, for logging and NaN reports); per
    example, the one-sample weighted diffusion loss (``diffusion``; for the ELBO, the diffusion
    term's estimate) and the log-SNR it was drawn at."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    diffusion: Tensor | None = None
    log_snr: Tensor | None = None


class WeightedLoss:
    """The objective: a weighting w(lambda), a noise-level density p(lambda) and the Denoiser's
    parameterization, composed as 1/2 (w / p) ||eps_hat - eps||^2."""

    def __init__(self, weighting: Weighting, noise_sampling: NoiseSampling | None = None) -> None:
        self.weighting = weighting
        self.noise_sampling = noise_sampling if noise_sampling is not None else ScheduleTimes()

    def log_weight_over_density(self, denoiser: Denoiser, levels: NoiseLevels, dim: int) -> Tensor:
        """log(1/2 (w / p) SNR): the per-example log weight on ||x0 - x0_hat||^2."""
        lam = levels.log_snr
        log_w = torch.log(0.5 * levels.inv_density)
        known = None
        if isinstance(self.noise_sampling, ScheduleTimes):
            known = -torch.log(levels.inv_density)  # p is the schedule's own density
        inputs = WeightingInputs(lam, denoiser.parameterization, denoiser.schedule, dim, known)
        w = self.weighting.log_weight(inputs)
        if w is not None:
            log_w = log_w + w
        return log_w + lam

    def diffusion_loss(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        y: Tensor | None = None,
        T: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(1/2 (w / p) ||eps_hat - eps||^2, ||target - out||^2, lambda), each per example."""
        fixed = not self.weighting.trains_schedule
        with torch.no_grad() if fixed else contextlib.nullcontext():
            levels = self.noise_sampling.draw(denoiser.schedule, x0.shape[0], T, generator, x0)
            log_w = self.log_weight_over_density(denoiser, levels, math.prod(x0.shape[1:]))
        est, squared = weighted_denoising_error(denoiser, x0, levels.log_snr, log_w, y, generator)
        return est, squared, levels.log_snr

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
            rec, prior = endpoint_terms(denoiser, x0, y, 1, reconstruction_nll, generator)
            diffusion, _, lam = self.diffusion_loss(denoiser, x0, y, T, generator)
            terms = {"reconstruction": rec.mean(), "prior": prior.mean()}
            terms["diffusion"] = diffusion.mean()
            return LossOutput(
                loss=(rec + prior + diffusion).mean(), terms=terms, diffusion=diffusion, log_snr=lam
            )
        diffusion, squared, lam = self.diffusion_loss(denoiser, x0, y, T, generator)
        mse = squared.mean() / math.prod(x0.shape[1:])
        return LossOutput(
            loss=diffusion.mean(), terms={"mse": mse}, diffusion=diffusion, log_snr=lam
        )

    def __repr__(self) -> str:
        return f"WeightedLoss({self.weighting!r}, {self.noise_sampling!r})"
