"""What the network predicts: x0, eps, score, v, EDM's preconditioned F or a flow velocity.

MATH.md sections 4 and 9.

With x_t = a x0 + s eps (a^2 = sigmoid(lambda), s^2 = sigmoid(-lambda)) every parameterization is
the same denoiser written in other coordinates. Each one knows
- its training ``target`` given (x0, eps),
- how to turn a network output into (x0_hat, eps_hat) (``convert``) and back (``output_from``),
- ``log_x0_error_scale2``: log c^2 with ||x0 - x0_hat||^2 = c^2 ||target - out||^2, which turns the
  ELBO's weight on the x0 error, 1/2 (SNR(s) - SNR(t)), into the weight on its own error;
- ``input_scale``: c_in, what the network's input x_t is multiplied by (None: 1, x_t as it is).
The score is always -eps_hat / s (Tweedie, MATH.md section 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffexp.diffusion.noise_level import NoiseLevel


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

    def input_scale(self, log_snr: Tensor) -> Tensor | None:
        """c_in: the network sees c_in x_t; None means c_in = 1 (no scaling)."""
        return None

    def network_input(self, x_t: Tensor, log_snr: Tensor) -> Tensor:
        """c_in x_t, what the network is given."""
        scale = self.input_scale(log_snr)
        return x_t if scale is None else scale * x_t

    def x_t_of_network_input(self, net_in: Tensor, log_snr: Tensor) -> Tensor:
        """x_t = net_in / c_in, the inverse of ``network_input``."""
        scale = self.input_scale(log_snr)
        return net_in if scale is None else net_in / scale

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
        level = NoiseLevel(log_snr)
        return out, (x_t - level.a * out) / level.s

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
        level = NoiseLevel(log_snr)
        return (x_t - level.s * out) / level.a, out

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
        return -eps / NoiseLevel(log_snr).s

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """x0_hat = (x_t + s^2 out) / a, eps_hat = -s out."""
        level = NoiseLevel(log_snr)
        a, s = level.a, level.s
        return (x_t + s**2 * out) / a, -s * out

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """out = -eps_hat / s."""
        return -eps_hat / NoiseLevel(log_snr).s

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log(s^4 / a^2) = 2 logsigmoid(-lambda) - logsigmoid(lambda)."""
        level = NoiseLevel(log_snr)
        return 2.0 * level.log_s2 - level.log_alpha_bar


class V(Parameterization):
    """Predict v = a eps - s x0: x0_hat = a x_t - s out, eps_hat = s x_t + a out, c^2 = s^2."""

    name = "v"

    def target(self, x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
        """v = a eps - s x0."""
        level = NoiseLevel(log_snr)
        a, s = level.a, level.s
        return a * eps - s * x0

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """x0_hat = a x_t - s out, eps_hat = s x_t + a out."""
        level = NoiseLevel(log_snr)
        a, s = level.a, level.s
        return a * x_t - s * out, s * x_t + a * out

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """out = a eps_hat - s x0_hat."""
        level = NoiseLevel(log_snr)
        a, s = level.a, level.s
        return a * eps_hat - s * x0_hat

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log s^2 = logsigmoid(-lambda)."""
        return NoiseLevel(log_snr).log_s2


class EDM(Parameterization):
    """Karras et al.'s preconditioning: x0_hat = D = c_skip x_ve + c_out F(c_in x_ve), x_ve = x_t/a.

    With sigma = s / a and D2 = s^2 + a^2 sigma_d^2 = a^2 (sigma^2 + sigma_d^2), in terms of x_t:
    x0_hat = sigma_d^2 a / D2 x_t + s sigma_d / sqrt(D2) F, the network's input x_t / sqrt(D2)
    (= c_in x_ve), and c^2 = c_out^2 = s^2 sigma_d^2 / D2. The network is conditioned on
    log-SNR, an affine function of EDM's c_noise = ln(sigma) / 4 = -lambda / 8.
    With sigma_d = 1, F = -v.
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"edm needs sigma_data > 0 (the data's std), got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def _coefficients(self, log_snr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a, s, sqrt(D2)) with D2 = s^2 + a^2 sigma_d^2."""
        level = NoiseLevel(log_snr)
        return level.a, level.s, torch.sqrt(level.s2 + level.alpha_bar * self.sigma_data**2)

    def target(self, x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
        """F = (x0 - c_skip x_ve) / c_out = (s x0 - sigma_d^2 a eps) / (sigma_d sqrt(D2))."""
        a, s, d = self._coefficients(log_snr)
        sd = self.sigma_data
        return (s * x0 - sd**2 * a * eps) / (sd * d)

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """x0_hat = sigma_d^2 a / D2 x_t + s sigma_d / sqrt(D2) F, eps_hat = (x_t - a x0_hat) / s
        = s / D2 x_t - a sigma_d / sqrt(D2) F."""
        a, s, d = self._coefficients(log_snr)
        sd = self.sigma_data
        x0_hat = (sd**2 * a / d**2) * x_t + (s * sd / d) * out
        eps_hat = (s / d**2) * x_t - (a * sd / d) * out
        return x0_hat, eps_hat

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """F = (s x0_hat - sigma_d^2 a eps_hat) / (sigma_d sqrt(D2)) (the target's form)."""
        return self.target(x0_hat, eps_hat, log_snr)

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log c_out^2 = log(s^2 sigma_d^2 / D2)."""
        level = NoiseLevel(log_snr)
        return (
            level.log_s2
            + 2 * math.log(self.sigma_data)
            - torch.log(level.s2 + level.alpha_bar * self.sigma_data**2)
        )

    def input_scale(self, log_snr: Tensor) -> Tensor:
        """c_in on x_t: 1 / sqrt(D2) = 1 / (a sqrt(sigma^2 + sigma_d^2))."""
        return 1.0 / self._coefficients(log_snr)[2]

    def __repr__(self) -> str:
        return f"EDM(sigma_data={self.sigma_data})"


class Flow(Parameterization):
    """Flow matching on the rectified-flow path z = (1 - t) x0 + t eps = x_t / (a + s).

    With t = s / (a + s), the network sees z (c_in = 1 / (a + s)) and predicts u = eps - x0:
    x0_hat = z - t u_hat, eps_hat = z + (1 - t) u_hat, c^2 = t^2.
    """

    name = "flow"

    def target(self, x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
        """u = eps - x0."""
        return eps - x0

    def convert(self, out: Tensor, x_t: Tensor, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """x0_hat = z - t u_hat, eps_hat = z + (1 - t) u_hat, z = x_t / (a + s)."""
        z = self.network_input(x_t, log_snr)
        t = NoiseLevel(log_snr).rectified_flow_time
        return z - t * out, z + (1.0 - t) * out

    def output_from(self, x0_hat: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
        """u = eps_hat - x0_hat."""
        return eps_hat - x0_hat

    def log_x0_error_scale2(self, log_snr: Tensor) -> Tensor:
        """log t^2 = 2 logsigmoid(-lambda / 2)."""
        return 2.0 * F.logsigmoid(-0.5 * log_snr)

    def input_scale(self, log_snr: Tensor) -> Tensor:
        """c_in = 1 / (a + s)."""
        level = NoiseLevel(log_snr)
        return 1.0 / (level.a + level.s)
