"""Guidance as Denoiser wrappers (MATH.md section 7): each wraps a Denoiser and is DenoiserLike.

- Classifier-free guidance: eps = w eps(x_t, y) + (1 - w) eps(x_t, null), i.e.
  score = w score(x_t, y) + (1 - w) score(x_t, null). **Convention**: w = 0 is the unconditional
  model, w = 1 the plain conditional model, w > 1 sharpens. Both branches run in one batched call.
  With an ``interval`` [lambda_lo, lambda_hi] (Kynkaanniemi et al. 2024) w applies only where
  lambda_lo <= lambda <= lambda_hi and the plain conditional model (w = 1) elsewhere.
- Classifier guidance: score = score(x_t) + w grad log p_phi(y | x_t), with p_phi a classifier of
  noisy inputs at every noise level; w = 1 gives the conditional score of the joint model.

The estimates are combined in eps (equivalently, score) space; x0_hat follows from
x_t = a x0 + s eps, and the output of the base parameterization from both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffexp.diffusion.denoiser import (
    DenoiserLike,
    DenoiserOutput,
    broadcast_like,
    resolve_log_snr,
)
from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.diffusion.parameterizations import Parameterization
from diffexp.diffusion.schedules import Schedule


class GuidedDenoiser(nn.Module):
    """A Denoiser around a Denoiser (same schedule, parameterization and network): ``forward``
    resolves lambda once and finishes the estimates; a guidance method implements only its
    combination rule, ``guided_eps``."""

    kind = "guided"  # the method's name in error messages

    def __init__(self, base: DenoiserLike, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, float(scale)

    @property
    def schedule(self) -> Schedule:
        """The base denoiser's schedule."""
        return self.base.schedule

    @property
    def parameterization(self) -> Parameterization:
        """The base denoiser's parameterization."""
        return self.base.parameterization

    @property
    def network(self) -> nn.Module:
        """The base denoiser's network."""
        return self.base.network

    def guided_eps(self, x_t: Tensor, y: Tensor, log_snr: Tensor) -> Tensor:
        """The guided eps_hat at per-example ``log_snr`` [n] (the combination rule)."""
        raise NotImplementedError

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | None = None,
        y: Tensor | None = None,
        *,
        log_snr: Tensor | None = None,
    ) -> DenoiserOutput:
        """The guided estimates: x0_hat = (x_t - s eps_hat) / a, out in the base's terms."""
        if y is None:
            raise ValueError(
                f"{self.kind} guidance needs labels y to condition on; pass label=<class> (or "
                "labels=[...]) to sample/eval, or use guidance=none for unconditional samples"
            )
        lam = resolve_log_snr(self.schedule, x_t, t, log_snr)
        eps_hat = self.guided_eps(x_t, y, lam)
        lam = broadcast_like(lam, x_t)
        level = NoiseLevel(lam)
        a, s = level.a, level.s
        x0_hat = (x_t - s * eps_hat) / a
        out = self.parameterization.output_from(x0_hat, eps_hat, lam)
        return DenoiserOutput(x0_hat=x0_hat, eps_hat=eps_hat, out=out, log_snr=lam)


class ClassifierFreeGuidance(GuidedDenoiser):
    """eps = w eps(x_t, y) + (1 - w) eps(x_t, null): w = 0 unconditional, w = 1 conditional."""

    kind = "classifier-free"

    def __init__(
        self,
        base: DenoiserLike,
        scale: float,
        null_label: int,
        interval: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(base, scale)
        self.null_label = int(null_label)
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))

    def guided_eps(self, x_t: Tensor, y: Tensor, log_snr: Tensor) -> Tensor:
        """w eps(x_t, y) + (1 - w) eps(x_t, null), w = 1 outside the interval; both branches in
        one batched network call, the conditional one alone where no example is inside."""
        w: Tensor | float = self.scale
        if self.interval is not None:
            lo, hi = self.interval
            inside = (log_snr >= lo) & (log_snr <= hi)
            if not bool(inside.any()):
                return self.base(x_t, y=y, log_snr=log_snr).eps_hat
            w = broadcast_like(torch.where(inside, self.scale, 1.0).to(x_t.dtype), x_t)
        both = self.base(
            torch.cat([x_t, x_t]),
            y=torch.cat([y, torch.full_like(y, self.null_label)]),
            log_snr=torch.cat([log_snr, log_snr]),
        )
        eps_cond, eps_uncond = both.eps_hat.chunk(2)
        return w * eps_cond + (1.0 - w) * eps_uncond

    def extra_repr(self) -> str:
        shown = f"scale={self.scale}, null_label={self.null_label}"
        return shown if self.interval is None else f"{shown}, interval={list(self.interval)}"


class ClassifierGuidance(GuidedDenoiser):
    """score = score(x_t) + w grad_x log p_phi(y | x_t, lambda)."""

    kind = "classifier"

    def __init__(self, base: DenoiserLike, classifier: nn.Module, scale: float) -> None:
        super().__init__(base, scale)
        self.classifier = classifier

    def class_log_prob_grad(self, x_t: Tensor, y: Tensor, log_snr: Tensor) -> Tensor:
        """grad_x log p_phi(y | x_t) by autograd (the classifier takes (x_t, log_snr) -> logits)."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = torch.log_softmax(self.classifier(x, log_snr), dim=-1)
            selected = log_p.gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, x)
        return grad

    def guided_eps(self, x_t: Tensor, y: Tensor, log_snr: Tensor) -> Tensor:
        """eps_hat - w s grad log p_phi(y | x_t)."""
        eps_hat = self.base(x_t, log_snr=log_snr).eps_hat
        s = NoiseLevel(broadcast_like(log_snr, x_t)).s
        return eps_hat - self.scale * s * self.class_log_prob_grad(x_t, y, log_snr)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
