"""The exact denoiser of a Gaussian mixture, as a network (MATH.md section 8).

It returns whatever the configured parameterization asks for, computed from the mixture's exact
posterior mean and score, so ``Denoiser(Oracle(...), parameterization, schedule)`` is a perfect
model: the ground truth every ELBO estimator and sampler is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffexp.data.mixtures import GaussianMixture
from diffexp.diffusion.denoiser import broadcast_like
from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.diffusion.parameterizations import Parameterization


class Oracle(nn.Module):
    """out = parameterization.output_from(E[x0 | x_t], -s grad log q(x_t)).

    It is called like any network, on the parameterization's scaled input c_in x_t, and undoes
    the scaling.

    Unconditional unless ``conditional``: then a label y selects its mixture component, and
    y = ``num_classes`` (the null token of classifier-free guidance) or None is unconditional.
    """

    def __init__(
        self,
        mixture: GaussianMixture,
        parameterization: Parameterization,
        conditional: bool = False,
    ) -> None:
        super().__init__()
        self.mixture = mixture
        self.conditional = bool(conditional)
        self.num_classes = mixture.num_components if conditional else 0
        self.parameterization = parameterization
        self.dim = mixture.dim
        self.register_buffer("_anchor", torch.zeros(()))  # carries device/dtype moves

    def forward(self, net_in: Tensor, log_snr: Tensor, y: Tensor | None = None) -> Tensor:
        """The exact target for x_t = net_in / c_in at log_snr (conditional on component y)."""
        if net_in.dim() != 2 or net_in.shape[1] != self.dim:
            raise ValueError(
                f"the oracle of a {self.dim}-D mixture got shape {tuple(net_in.shape)}"
            )
        mixture = self.mixture.to(dtype=net_in.dtype, device=net_in.device)
        lam = broadcast_like(log_snr, net_in)
        x_t = self.parameterization.x_t_of_network_input(net_in, lam)
        x0_hat = mixture.posterior_mean(x_t, lam[:, 0])
        score = mixture.score(x_t, lam[:, 0])
        if self.conditional and y is not None:
            real = (y != self.num_classes)[:, None]  # the null token stays unconditional
            component = y.clamp(max=self.num_classes - 1)
            x0_hat = torch.where(real, mixture.posterior_mean(x_t, lam[:, 0], y=component), x0_hat)
            score = torch.where(real, mixture.score(x_t, lam[:, 0], y=component), score)
        eps_hat = -NoiseLevel(lam).s * score
        return self.parameterization.output_from(x0_hat, eps_hat, lam)


class OracleClassifier(nn.Module):
    """The exact noisy classifier of a mixture: logits = log p(y = k | x_t) = log r_k(x_t)."""

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.mixture = mixture
        self.num_classes = mixture.num_components

    def forward(self, x_t: Tensor, log_snr: Tensor) -> Tensor:
        """log r_k(x_t) under q(x_t) at log_snr (normalized logits)."""
        mixture = self.mixture.to(dtype=x_t.dtype, device=x_t.device)
        return mixture.responsibilities(x_t, broadcast_like(log_snr, x_t)[:, 0])
