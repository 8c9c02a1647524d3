"""What the network predicts: x0, eps, score or v (MATH.md section 4).

With x_t = a x0 + s eps (a^2 = sigmoid(lambda), s^2 = sigmoid(-lambda)) every parameterization is
the same denoiser written in other coordinates. Each one knows
- its training ``target`` given (x0, eps),
- how to turn a network output into (x0_hat, eps_hat) (``convert``) and back (``output_from``),
- ``log_x0_error_scale2``: log c^2 with ||x0 - x0_hat||^2 = c^2 ||target - out||^2, which turns the
  ELBO's weight on the x0 error, 1/2 (SNR(s) - SNR(t)), into the weight on its own error.
The score is always -eps_hat / s (Tweedie, MATH.md section 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def a_s(log_snr: Tensor) -> tuple[Tensor, Tensor]:
    """(a, s) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda)))."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


class Parameterization:
    """Base class; ``log_snr`` arguments are broadcastable against x (e.g. shape [n, 1])."""

    name: str = ""

    def target(self, x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
        """The quantity the network is trained to predict."""
        raise NotImplementedError

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the network output."""
        raise NotImplementedError

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """The network output that corresponds to (x0_hat, eps_hat)."""
        raise NotImplementedError

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log c^2, with ||x0 - x0_hat||^2 = c^2 ||target - out||^2."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class X0(Parameterization):
    """Predict x0: x0_hat = out, eps_hat = (x_t - a out) / s, c = 1."""

    name = "x0"

    def target(self, x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
        """x0."""
        return x0

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """x0_hat = out, eps_hat = (x_t - a out) / s."""
        a, s = a_s(log_snr)
        return out, (x_t - a * out) / s

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """out = x0_hat."""
        return x0_hat

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log 1."""
        return torch.zeros_like(log_snr)


class Eps(Parameterization):
    """Predict the noise: eps_hat = out, x0_hat = (x_t - s out) / a, c^2 = 1 / SNR."""

    name = "eps"

    def target(self, x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
        """eps."""
        return eps

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """x0_hat = (x_t - s out) / a, eps_hat = out."""
        a, s = a_s(log_snr)
        return (x_t - s * out) / a, out

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """out = eps_hat."""
        return eps_hat

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log(s^2 / a^2) = -lambda."""
        return -log_snr


class Score(Parameterization):
    """Predict grad log q(x_t): x0_hat = (x_t + s^2 out) / a, eps_hat = -s out, c^2 = s^4 / a^2."""

    name = "score"

    def target(self, x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
        """grad log q(x_t | x0) = -eps / s."""
        return -eps / a_s(log_snr)[1]

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """x0_hat = (x_t + s^2 out) / a, eps_hat = -s out."""
        a, s = a_s(log_snr)
        return (x_t + s**2 * out) / a, -s * out

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """out = -eps_hat / s."""
        return -eps_hat / a_s(log_snr)[1]

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log(s^4 / a^2) = 2 logsigmoid(-lambda) - logsigmoid(lambda)."""
        return 2.0 * F.logsigmoid(-log_snr) - F.logsigmoid(log_snr)


class V(Parameterization):
    """Predict v = a eps - s x0: x0_hat = a x_t - s out, eps_hat = s x_t + a out, c^2 = s^2."""

    name = "v"

    def target(self, x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
        """v = a eps - s x0."""
        a, s = a_s(log_snr)
        return a * eps - s * x0

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """x0_hat = a x_t - s out, eps_hat = s x_t + a out."""
        a, s = a_s(log_snr)
        return a * x_t - s * out, s * x_t + a * out

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """out = a eps_hat - s x0_hat."""
        a, s = a_s(log_snr)
        return a * eps_hat - s * x0_hat

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log s^2 = logsigmoid(-lambda)."""
        return F.logsigmoid(-log_snr)


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {p.name: p for p in (X0, Eps, Score, V)}


def get_parameterization(name: str) -> Parameterization:
    """The parameterization called ``name`` (x0, eps, score or v)."""
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}; valid: {sorted(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[name]()
