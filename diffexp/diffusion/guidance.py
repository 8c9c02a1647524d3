"""Guidance as Denoiser wrappers (MATH.md section 7): each wraps a Denoiser and is one.

- Classifier-free guidance: eps = w eps(x_t, y) + (1 - w) eps(x_t, null), i.e.
  score = w score(x_t, y) + (1 - w) score(x_t, null). **Convention**: w = 0 is the unconditional
  model, w = 1 the plain conditional model, w > 1 sharpens. Both branches run in one batched call.
- Classifier guidance: score = score(x_t) + w grad log p_phi(y | x_t), with p_phi a classifier of
  noisy inputs at every noise level; w = 1 gives the conditional score of the joint model.

The estimates are combined in eps (equivalently, score) space; x0_hat follows from
x_t = a x0 + s eps, and the output of the base parameterization from both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffexp.diffusion.denoiser import (
    Denoiser,
    DenoiserOutput,
    broadcast_like,
    resolve_log_snr,
)


def _finish(base: Denoiser, x_t: Tensor, eps_hat: Tensor, lam: Tensor) -> DenoiserOutput:
    """DenoiserOutput from eps_hat: x0_hat = (x_t - s eps_hat) / a, out in the base's terms."""
    a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    x0_hat = (x_t - s * eps_hat) / a
    out = base.parameterization.output_from(x0_hat, eps_hat, lam)
    return DenoiserOutput(x0_hat=x0_hat, eps_hat=eps_hat, out=out, log_snr=lam)


class _Wrapper(nn.Module):
    """A Denoiser around a Denoiser: same schedule and parameterization."""

    def __init__(self, base: Denoiser, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, float(scale)

    @property
    def schedule(self):
        """The base denoiser's schedule."""
        return self.base.schedule

    @property
    def parameterization(self):
        """The base denoiser's parameterization."""
        return self.base.parameterization

    @property
    def network(self) -> nn.Module:
        """The base denoiser's network."""
        return self.base.network

    @staticmethod
    def _require_labels(y: Tensor | None, kind: str) -> Tensor:
        if y is None:
            raise ValueError(
                f"{kind} guidance needs labels y to condition on; pass label=<class> (or "
                "labels=[...]) to sample/eval, or use guidance=none for unconditional samples"
            )
        return y


class ClassifierFreeGuidance(_Wrapper):
    """eps = w eps(x_t, y) + (1 - w) eps(x_t, null): w = 0 unconditional, w = 1 conditional."""

    def __init__(self, base: Denoiser, scale: float, null_label: int) -> None:
        super().__init__(base, scale)
        self.null_label = int(null_label)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | None = None,
        y: Tensor | None = None,
        *,
        log_snr: Tensor | None = None,
    ) -> DenoiserOutput:
        """The guided estimates; both branches in one batched network call."""
        y = self._require_labels(y, "classifier-free")
        lam = resolve_log_snr(self.schedule, x_t, t, log_snr)
        both = self.base(
            torch.cat([x_t, x_t]),
            y=torch.cat([y, torch.full_like(y, self.null_label)]),
            log_snr=torch.cat([lam, lam]),
        )
        eps_cond, eps_uncond = both.eps_hat.chunk(2)
        eps_hat = self.scale * eps_cond + (1.0 - self.scale) * eps_uncond
        return _finish(self.base, x_t, eps_hat, broadcast_like(lam, x_t))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, null_label={self.null_label}"


class ClassifierGuidance(_Wrapper):
    """score = score(x_t) + w grad_x log p_phi(y | x_t, lambda)."""

    def __init__(self, base: Denoiser, classifier: nn.Module, scale: float) -> None:
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

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | None = None,
        y: Tensor | None = None,
        *,
        log_snr: Tensor | None = None,
    ) -> DenoiserOutput:
        """The guided estimates: eps = eps_hat - w s grad log p(y | x_t)."""
        y = self._require_labels(y, "classifier")
        lam = resolve_log_snr(self.schedule, x_t, t, log_snr)
        pred = self.base(x_t, log_snr=lam)
        lam_b = broadcast_like(lam, x_t)
        s = torch.sigmoid(-lam_b).sqrt()
        eps_hat = pred.eps_hat - self.scale * s * self.class_log_prob_grad(x_t, y, lam)
        return _finish(self.base, x_t, eps_hat, lam_b)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
