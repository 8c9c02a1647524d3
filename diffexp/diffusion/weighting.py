"""Training objectives: how the per-time squared error of the network is weighted.

- ``elbo``: the negative ELBO itself (reconstruction + prior + diffusion, one-sample estimate);
- ``unit``: DDPM's L_simple, the target's mean squared error with weight 1 (not an ELBO);
- ``min_snr``: Min-SNR-gamma, weight min(SNR, gamma) on the x0 error, i.e. min(SNR, gamma) c^2 on
  the target's mean squared error (not an ELBO).
Whatever the objective, the module reports the true ELBO on validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffexp.diffusion.denoiser import Denoiser, broadcast_like
from diffexp.diffusion.elbo import (
    ReconstructionNLL,
    diffuse,
    elbo_terms,
    gaussian_reconstruction_nll,
    randn_like,
    stratified_times,
)


@dataclass
class LossOutput:
    """The scalar loss and its named parts (batch means, for logging and NaN reports); for the
    ELBO, also the per-example one-sample diffusion-term estimate (``diffusion``)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    diffusion: Tensor | None = None


class Weighting:
    """Base class of training objectives."""

    name: str = ""

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        y: Tensor | None = None,
        T: int = 0,
        reconstruction_nll: ReconstructionNLL = gaussian_reconstruction_nll,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ELBO(Weighting):
    """loss = -ELBO = reconstruction + prior + diffusion, in nats per example."""

    name = "elbo"

    def __call__(
        self,
        denoiser,
        x0,
        y=None,
        T=0,
        reconstruction_nll=gaussian_reconstruction_nll,
        generator=None,
    ) -> LossOutput:
        """Mean over the batch of the one-sample -ELBO estimate."""
        terms = elbo_terms(
            denoiser, x0, y, T=T, reconstruction_nll=reconstruction_nll, generator=generator
        )
        return LossOutput(
            loss=terms.nll.mean(),
            terms={
                "reconstruction": terms.reconstruction.mean(),
                "prior": terms.prior.mean(),
                "diffusion": terms.diffusion.mean(),
            },
            diffusion=terms.diffusion,
        )


class _MSEWeighting(Weighting):
    """loss = E_t[w(lambda_t) mean_i (target_i - out_i)^2] with t stratified in [0, 1]."""

    def log_weight(self, denoiser: Denoiser, log_snr: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        denoiser,
        x0,
        y=None,
        T=0,
        reconstruction_nll=gaussian_reconstruction_nll,
        generator=None,
    ) -> LossOutput:
        """Mean over the batch of the weighted mean squared error of the target."""
        t = stratified_times(x0.shape[0], 1, generator, device=x0.device, dtype=x0.dtype)[:, 0]
        if T > 0:
            t = torch.clamp(torch.ceil(t * T), 1, T) / T
        lam = denoiser.schedule.log_snr(t)
        if not self.trains_schedule:
            lam = lam.detach()
        eps = randn_like(x0, generator)
        pred = denoiser(diffuse(x0, lam, eps), y=y, log_snr=lam)
        target = denoiser.parameterization.target(x0, eps, broadcast_like(lam, x0))
        mse = ((target - pred.out) ** 2).reshape(x0.shape[0], -1).mean(dim=1)
        loss = (torch.exp(self.log_weight(denoiser, lam)) * mse).mean()
        return LossOutput(loss=loss, terms={"mse": mse.mean()})

    trains_schedule = False


class Unit(_MSEWeighting):
    """DDPM's L_simple: weight 1 on the target's mean squared error."""

    name = "unit"

    def log_weight(self, denoiser: Denoiser, log_snr: Tensor) -> Tensor:
        """log 1."""
        return torch.zeros_like(log_snr)


class MinSNR(_MSEWeighting):
    """Min-SNR-gamma (Hang et al.): weight min(SNR, gamma) c^2 on the target's squared error."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"min_snr needs gamma > 0, got {gamma}")
        self.gamma = float(gamma)

    def log_weight(self, denoiser: Denoiser, log_snr: Tensor) -> Tensor:
        """log(min(SNR, gamma) c^2)."""
        log_min = torch.clamp(log_snr, max=torch.log(torch.tensor(self.gamma)).item())
        return log_min + denoiser.parameterization.log_x0_error_scale2(log_snr)

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma})"


WEIGHTINGS = {w.name: w for w in (ELBO, Unit, MinSNR)}
