"""w(lambda): how a training objective weights noise levels (MATH.md section 9).

Every objective is a weighted ELBO (Kingma & Gao 2023): its diffusion loss is

    L_w = 1/2 int w(lambda) E||eps_hat - eps||^2 dlambda,

whatever the parameterization and whatever density p(lambda) draws the training noise levels
(``noise_sampling.py``). A weighting is only the function w; the loss of ``loss.py`` divides it
by p. Weightings defined by what a method trains on, "weight 1 on the target's squared error at
t ~ U(0, 1) through the schedule" (``unit``, ``min_snr``), carry that density p_sched(lambda) =
1/|lambda'(t)| and the parameterization's error factor c^2 inside w, so their implied w(lambda)
depends on the schedule and the parameterization (eps/unit/cosine: sech(lambda/2); v or flow:
exp(-lambda/2)), and they keep that w under any other p(lambda).

- ``elbo``: w = 1; with the reconstruction and prior terms, the negative ELBO itself;
- ``unit``: DDPM's L_simple, mean over dimensions of the target's squared error under t ~ U;
- ``min_snr``: Min-SNR-gamma, weight min(SNR, gamma) on the x0 error's mean square under t ~ U;
- ``sigmoid``: Kingma & Gao's w = sigmoid(b - lambda);
- ``edm``: EDM's loss weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 on the mean square of
  D - x0 under ln sigma ~ N(P_mean, P_std^2), i.e. w = p_LN(lambda) (exp(-lambda) + sigma_d^2) /
  sigma_d^2 up to a constant.
Only ``elbo`` is a bound on -log p(x0); the module reports the true ELBO on validation whatever
the objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from diffexp.diffusion.noise_sampling import LogNormal
from diffexp.diffusion.parameterizations import Parameterization
from diffexp.diffusion.schedules import Schedule


@dataclass
class WeightingInputs:
    """What a weighting may depend on: lambda [n], the parameterization (its error factor), the
    schedule (its density p_sched) and the data's dimension d."""

    log_snr: Tensor
    parameterization: Parameterization
    schedule: Schedule
    dim: int
    # 1 / p_sched(lambda) when lambda was drawn by the schedule's own t ~ U(0, 1)
    schedule_inv_density: Tensor | None = field(default=None, repr=False)

    def schedule_log_density(self) -> Tensor:
        """log p_sched(lambda) = -log|lambda'(t(lambda))| (from the draw when it is known)."""
        if self.schedule_inv_density is not None:
            return -torch.log(self.schedule_inv_density)
        return self.schedule.log_density(self.log_snr)


class Weighting:
    """Base class: ``log_weight`` is log w(lambda) in eps coordinates (None: w = 1 exactly)."""

    name: str = ""
    # the ELBO adds the reconstruction and prior terms and trains a learned schedule's shape
    includes_endpoint_terms: bool = False
    trains_schedule: bool = False

    def log_weight(self, inputs: WeightingInputs) -> Tensor | None:
        """log w(lambda)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ELBO(Weighting):
    """w = 1: the continuous-time diffusion term of the negative ELBO (VDM)."""

    name = "elbo"
    includes_endpoint_terms = True
    trains_schedule = True

    def log_weight(self, inputs: WeightingInputs) -> None:
        """log 1 (None, so that the ELBO's terms are computed exactly as ``elbo_terms`` does)."""
        return None


class Unit(Weighting):
    """DDPM's L_simple: mean_i (target_i - out_i)^2 at t ~ U(0, 1), i.e.
    w = 2 p_sched(lambda) / (d SNR c^2)."""

    name = "unit"

    def log_weight(self, inputs: WeightingInputs) -> Tensor:
        """log w = log(2 / d) + log p_sched - lambda - log c^2."""
        lam = inputs.log_snr
        log_c2 = inputs.parameterization.log_x0_error_scale2(lam)
        return math.log(2.0 / inputs.dim) + inputs.schedule_log_density() - lam - log_c2


class MinSNR(Weighting):
    """Min-SNR-gamma (Hang et al.): min(SNR, gamma) mean_i (x0_i - x0_hat_i)^2 at t ~ U(0, 1),
    i.e. w = 2 p_sched(lambda) min(SNR, gamma) / (d SNR)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"min_snr needs gamma > 0, got {gamma}")
        self.gamma = float(gamma)

    def log_weight(self, inputs: WeightingInputs) -> Tensor:
        """log w = log(2 / d) + log p_sched + min(lambda, log gamma) - lambda."""
        lam = inputs.log_snr
        log_min = torch.clamp(lam, max=math.log(self.gamma))
        return math.log(2.0 / inputs.dim) + inputs.schedule_log_density() + log_min - lam

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma})"


class Sigmoid(Weighting):
    """Kingma & Gao's sigmoid weighting: w = sigmoid(b - lambda), monotone."""

    name = "sigmoid"

    def __init__(self, bias: float = 0.0) -> None:
        self.bias = float(bias)

    def log_weight(self, inputs: WeightingInputs) -> Tensor:
        """log w = logsigmoid(b - lambda)."""
        return F.logsigmoid(self.bias - inputs.log_snr)

    def __repr__(self) -> str:
        return f"Sigmoid(bias={self.bias:g})"


class EDMWeighting(Weighting):
    """EDM (Karras et al. 2022): weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 on the mean square
    of D - x0, ln sigma ~ N(P_mean, P_std^2): w = 2 p_LN(lambda) (exp(-lambda) + sigma_d^2) /
    (d sigma_d^2), p_LN the log-normal's density of lambda truncated to the schedule's range.

    With ``noise_sampling=lognormal`` (the same P_mean, P_std) and ``parameterization=edm``, the
    loss is EDM's: the mean square of F's error, unit weight.
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2) -> None:  # noqa: N803
        if not sigma_data > 0:
            raise ValueError(f"weighting.sigma_data must be > 0 (the data's std), got {sigma_data}")
        self.sigma_data = float(sigma_data)
        self.density = LogNormal(P_mean, P_std)

    def log_weight(self, inputs: WeightingInputs) -> Tensor:
        """log w = log(2 / d) + log p_LN(lambda) + log(exp(-lambda) + sigma_d^2) - log sigma_d^2."""
        lam = inputs.log_snr
        log_sd2 = 2.0 * math.log(self.sigma_data)
        return (
            math.log(2.0 / inputs.dim)
            + self.density.log_density(inputs.schedule, lam)
            + torch.logaddexp(-lam, torch.full_like(lam, log_sd2))
            - log_sd2
        )

    def __repr__(self) -> str:
        return (
            f"EDMWeighting(sigma_data={self.sigma_data:g}, P_mean={self.density.P_mean:g}, "
            f"P_std={self.density.P_std:g})"
        )


def implied_log_weight(
    weighting: Weighting,
    parameterization: Parameterization,
    schedule: Schedule,
    log_snr: Tensor,
    dim: int,
) -> Tensor:
    """log w(lambda) of an objective at the given log-SNRs, whatever p(lambda) trains it."""
    inputs = WeightingInputs(log_snr, parameterization, schedule, dim)
    with torch.no_grad():
        log_w = weighting.log_weight(inputs)
    return torch.zeros_like(log_snr) if log_w is None else log_w.detach()


def is_monotone(log_snr: Tensor, log_weight: Tensor, rtol: float = 1e-6) -> bool:
    """Whether w(lambda) never increases with lambda (i.e. increases with t): then the objective
    is the ELBO of Gaussian-noise-augmented data (Kingma & Gao)."""
    order = torch.argsort(log_snr)
    w = torch.exp(log_weight[order] - log_weight.max())
    return bool((w[1:] <= w[:-1] * (1 + rtol) + rtol).all())
