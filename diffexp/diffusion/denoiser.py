"""The one seam: a Denoiser maps (x_t, t or log-SNR, y) to x0_hat, eps_hat and the score.

Whatever the network predicts, the parameterization converts it; the schedule supplies log-SNR.
The ELBO, samplers, metrics and guidance talk to a Denoiser, never to a raw network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.diffusion.parameterizations import Parameterization
from diffexp.diffusion.schedules import Schedule
from diffexp.diffusion.tensors import full_precision


def broadcast_like(v: Tensor, x: Tensor) -> Tensor:
    """View a per-example tensor [n] (or a scalar) as [n, 1, ..., 1] to broadcast against x."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.dim() == 0:
        v = v.expand(x.shape[0])
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def resolve_log_snr(
    schedule: Schedule, x_t: Tensor, t: Tensor | None, log_snr: Tensor | None
) -> Tensor:
    """Per-example log-SNR [n] from exactly one of t (lambda = schedule(t)) and log_snr."""
    if (t is None) == (log_snr is None):
        raise ValueError("give exactly one of t and log_snr")
    if log_snr is None:
        log_snr = schedule.log_snr(torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device))
    log_snr = torch.as_tensor(log_snr, dtype=x_t.dtype, device=x_t.device)
    return log_snr.expand(x_t.shape[0]) if log_snr.dim() == 0 else log_snr


@dataclass
class DenoiserOutput:
    """The denoiser's estimates at one noise level; ``log_snr`` is broadcast against x."""

    x0_hat: Tensor
    eps_hat: Tensor
    out: Tensor
    log_snr: Tensor

    @property
    def score(self) -> Tensor:
        """grad log q(x_t) = -eps_hat / s (Tweedie)."""
        return -self.eps_hat / NoiseLevel(self.log_snr).s


@runtime_checkable
class DenoiserLike(Protocol):
    """What samplers, metrics and guidance call: a Denoiser, or a wrapper that is one."""

    network: nn.Module
    parameterization: Parameterization
    schedule: Schedule

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor | None = None,
        y: Tensor | None = None,
        *,
        log_snr: Tensor | None = None,
    ) -> DenoiserOutput:
        """Estimates at time t (lambda = schedule(t)) or directly at ``log_snr``."""
        ...


class Denoiser(nn.Module):
    """network + parameterization + schedule -> x0_hat, eps_hat, score.

    The network is called on c_in x_t (the parameterization's input scaling, 1 for most) and the
    log-SNR; the parameterization turns its output into x0_hat and eps_hat.
    """

    def __init__(self, network: nn.Module, parameterization: Parameterization, schedule: Schedule):
        super().__init__()
        self.network = network
        self.parameterization = parameterization
        self.schedule = schedule

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | None = None,
        y: Tensor | None = None,
        *,
        log_snr: Tensor | None = None,
    ) -> DenoiserOutput:
        """Estimates at time t (lambda = schedule(t)) or directly at ``log_snr``.

        Only the network runs under an ambient autocast (bf16-mixed); its output is cast back
        to x_t's dtype, and the schedule and the parameterization run in that dtype."""
        with full_precision(x_t):
            log_snr = resolve_log_snr(self.schedule, x_t, t, log_snr)
            lam = broadcast_like(log_snr, x_t)
            net_in = self.parameterization.network_input(x_t, lam)
        out = self.network(net_in, log_snr, y).to(x_t.dtype)
        if out.shape != x_t.shape:
            raise ValueError(
                f"{type(self.network).__name__} returned shape {tuple(out.shape)} for input "
                f"{tuple(x_t.shape)}; a denoising network must return the input's shape"
            )
        with full_precision(x_t):
            x0_hat, eps_hat = self.parameterization.convert(out, x_t, lam)
        return DenoiserOutput(x0_hat=x0_hat, eps_hat=eps_hat, out=out, log_snr=lam)
