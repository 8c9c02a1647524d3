"""One noise level of the variance-preserving process, from its log-SNR (MATH.md section 1).

x_t = a x0 + s eps with a^2 = sigmoid(lambda), s^2 = sigmoid(-lambda), lambda = log(a^2 / s^2):
every coefficient the samplers, the ELBO, the parameterizations and the Gaussian-mixture oracle
need follows from lambda alone. ``NoiseLevel(lambda)`` computes each one once, on first use,
elementwise, in lambda's dtype, in a numerically stable form (so
``NoiseLevel(lam).s`` is bit for bit ``torch.sigmoid(-lam).sqrt()``): sigmoid(lambda) and
sigmoid(-lambda) for a^2 and s^2 (never 1 - the other, which cancels at either end), logsigmoid
for their logs, exp(-lambda / 2) for sigma.

Shapes are the caller's: view lambda as [n, 1, ..., 1] (``denoiser.broadcast_like``) before
building the level to broadcast its coefficients against x; cast it (e.g. to float64) first to
compute them in that precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, eq=False)
class NoiseLevel:
    """The coefficients of x_t = a x0 + s eps at log-SNR ``log_snr`` = lambda (any shape)."""

    log_snr: Tensor

    @cached_property
    def alpha_bar(self) -> Tensor:
        """a^2 = alpha_bar = sigmoid(lambda)."""
        return torch.sigmoid(self.log_snr)

    @cached_property
    def s2(self) -> Tensor:
        """s^2 = 1 - alpha_bar = sigmoid(-lambda)."""
        return torch.sigmoid(-self.log_snr)

    @cached_property
    def a(self) -> Tensor:
        """a = sqrt(sigmoid(lambda))."""
        return self.alpha_bar.sqrt()

    @cached_property
    def s(self) -> Tensor:
        """s = sqrt(sigmoid(-lambda))."""
        return self.s2.sqrt()

    @cached_property
    def snr(self) -> Tensor:
        """SNR = a^2 / s^2 = exp(lambda)."""
        return torch.exp(self.log_snr)

    @cached_property
    def sigma(self) -> Tensor:
        """sigma = s / a = exp(-lambda / 2), Karras et al.'s noise level of x / a."""
        return torch.exp(-0.5 * self.log_snr)

    @cached_property
    def log_alpha_bar(self) -> Tensor:
        """log a^2 = logsigmoid(lambda)."""
        return F.logsigmoid(self.log_snr)

    @cached_property
    def log_s2(self) -> Tensor:
        """log s^2 = logsigmoid(-lambda)."""
        return F.logsigmoid(-self.log_snr)

    @cached_property
    def rectified_flow_time(self) -> Tensor:
        """t_rf = s / (a + s) = sigmoid(-lambda / 2), the rectified-flow time (MATH.md s9)."""
        return torch.sigmoid(-0.5 * self.log_snr)
