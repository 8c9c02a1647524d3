"""The discretized Gaussian decoder p(x0 | x_t0) for data on a grid of levels (MATH.md section 3).

Data with ``K = num_levels`` equally spaced values ``v_k = -1 + k w`` in [-1, 1], bin width
``w = 2 / (K - 1)``. With mean ``mu = x0_hat`` and ``sigma^2 = exp(-lambda_0) = 1 / SNR(0)``:

    p(x0 = v_k) = Phi((v_k + w/2 - mu) / sigma) - Phi((v_k - w/2 - mu) / sigma)

with the first bin's lower edge at -inf and the last bin's upper edge at +inf, so the K
probabilities sum to 1 exactly. The ELBO is then a bound on a discrete likelihood and
``bits/dim = -ELBO / (d ln 2)`` needs no dequantization offset (DDPM's L0, VDM).

Everything is computed in log space, in standard units ``m = (v_k - mu) / sigma`` (the bin centre)
and ``h = (w / 2) / sigma`` (the half width):

- edge bins: ``log Phi(m + h)`` and ``log Phi(h - m)`` (one ``log_ndtr`` each, exact in the tails);
- interior bins: by symmetry ``P(m, h) = P(-|m|, h)``, then
  ``log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b)))`` with ``a = -|m| - h``, ``b = -|m| + h``:
  no cancellation, no log(0), whether sigma is tiny (large h) or the mean is far outside [-1, 1];
- interior bins far narrower than sigma (``h < eps^(1/3)`` of the dtype, only at very low SNR):
  the midpoint rule ``log phi(m) + log(2h) + log(sinh(m h) / (m h)) - h^2 / 6`` (exact to second
  order in h), since the difference of two CDFs would lose all its digits there.

The gradient of ``log Phi`` is computed as ``phi / Phi = sqrt(2 / pi) / erfcx(-x / sqrt 2)``,
accurate in the far tails where the backward of ``torch.special.log_ndtr`` loses precision
in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DiscretizedGaussianNLL", "bin_centers", "bin_log_probs", "level_index"]

_LN2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class _LogNdtr(torch.autograd.Function):
    """log Phi(x), with the derivative phi(x) / Phi(x) = sqrt(2 / pi) / erfcx(-x / sqrt 2)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.special.log_ndtr(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (_SQRT_2_OVER_PI / torch.special.erfcx(-x * (0.5**0.5)))


def _log_ndtr(x: Tensor) -> Tensor:
    """log Phi(x), stable for all x (tails included), with an accurate gradient."""
    return _LogNdtr.apply(x)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0: log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) below."""
    near_zero = x > -_LN2
    # each branch only sees inputs where it is accurate (no inf / nan gradients from the other)
    x_near = torch.where(near_zero, x, torch.full_like(x, -_LN2))
    x_far = torch.where(near_zero, torch.full_like(x, -_LN2), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _log_sinhc(x: Tensor) -> Tensor:
    """log(sinh(x) / x) = |x| + log1p(-exp(-2|x|)) - log(2|x|); x^2 / 6 for small |x|."""
    ax = x.abs()
    small = ax < 1e-3
    ax_safe = torch.where(small, torch.ones_like(ax), ax)
    large = ax_safe + torch.log1p(-torch.exp(-2.0 * ax_safe)) - torch.log(2.0 * ax_safe)
    return torch.where(small, ax * ax / 6.0, large)


def _interior_log_prob(m: Tensor, h: Tensor) -> Tensor:
    """log(Phi(m + h) - Phi(m - h)), m the bin centre and h > 0 the half width in standard units."""
    m = -m.abs()  # the same probability, on the left of the mean: both CDFs away from 1
    narrow = h < torch.finfo(h.dtype).eps ** (1.0 / 3.0)
    # exact: log Phi(b) + log(1 - Phi(a) / Phi(b)), b = m + h, a = m - h
    h_wide = torch.where(narrow, torch.ones_like(h), h)
    log_b = _log_ndtr(m + h_wide)
    log_a = _log_ndtr(m - h_wide)
    exact = log_b + _log1mexp(torch.minimum(log_a - log_b, torch.full_like(log_b, -1e-30)))
    # midpoint: log phi(m) + log(2h) + log(sinh(m h) / (m h)) - h^2 / 6
    h_narrow = torch.where(narrow, h, torch.full_like(h, 1e-6))
    midpoint = (
        -0.5 * m * m
        - _HALF_LOG_2PI
        + torch.log(2.0 * h_narrow)
        + _log_sinhc(m * h_narrow)
        - h_narrow * h_narrow / 6.0
    )
    return torch.where(narrow, midpoint, exact)


def _log_prob_of_level(k: Tensor, mean: Tensor, log_snr: Tensor, num_levels: int) -> Tensor:
    """log p(x0 = v_k) for integer levels k, elementwise (all arguments broadcast together)."""
    inv_sigma = torch.exp(0.5 * log_snr)
    width = 2.0 / (num_levels - 1)
    centre = k.to(mean.dtype) * 2.0 / (num_levels - 1) - 1.0  # exactly -1 and 1 at the ends
    m = (centre - mean) * inv_sigma
    h = (0.5 * width) * inv_sigma
    m, h = torch.broadcast_tensors(m, h)
    first = _log_ndtr(m + h)  # (-inf, v_0 + w/2]
    last = _log_ndtr(h - m)  # [v_{K-1} - w/2, +inf)
    interior = _interior_log_prob(m, h)
    out = torch.where(k == 0, first, interior)
    return torch.where(k == num_levels - 1, last, out)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """x's floating dtype, at least float32 (half precision is computed in float32)."""
    return torch.promote_types(torch.float32, x.dtype) if x.is_floating_point() else torch.float32


def _check_levels(num_levels: int) -> int:
    """num_levels as an int, refusing fewer than 2 levels."""
    if int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2; got {num_levels}")
    return int(num_levels)


def _expand_log_snr(log_snr: Tensor | float, like: Tensor) -> Tensor:
    """log_snr as a tensor broadcasting against ``like``: 0-d, or [B, ...] padded with 1s."""
    lam = torch.as_tensor(log_snr, dtype=like.dtype, device=like.device)
    if lam.dim() > like.dim():
        raise ValueError(
            f"log_snr of shape {tuple(lam.shape)} has more dimensions than the data "
            f"{tuple(like.shape)}"
        )
    return lam.reshape(*lam.shape, *([1] * (like.dim() - lam.dim()))) if lam.dim() else lam


def bin_centers(num_levels: int, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """v_k = 2 k / (num_levels - 1) - 1 (= -1 + k w, w = 2 / (num_levels - 1)), k = 0..K-1."""
    k = torch.arange(
        _check_levels(num_levels), dtype=dtype or torch.get_default_dtype(), device=device
    )
    return k * 2.0 / (num_levels - 1) - 1.0


def level_index(x: Tensor, num_levels: int) -> Tensor:
    """k = round((x + 1) (num_levels - 1) / 2), clamped to [0, num_levels - 1] (long)."""
    k_max = _check_levels(num_levels) - 1
    return torch.round((x + 1.0) * (0.5 * k_max)).clamp_(0, k_max).long()


def bin_log_probs(mean: Tensor, log_snr: Tensor | float, num_levels: int) -> Tensor:
    """log p(x0 = v_k), k = 0..K-1, under N(mean, exp(-log_snr)) discretized: [..., num_levels].

    ``log_snr`` is a scalar, a tensor of the shape of ``mean``, or a per-example tensor [B] (viewed
    as [B, 1, ..., 1]). The probabilities over the last dimension sum to 1.
    """
    num_levels = _check_levels(num_levels)
    dtype = _compute_dtype(mean)  # log_snr is cast to it
    mean = mean.to(dtype)
    lam = _expand_log_snr(log_snr, mean)
    k = torch.arange(num_levels, device=mean.device)
    return _log_prob_of_level(k, mean.unsqueeze(-1), lam.unsqueeze(-1), num_levels)


class DiscretizedGaussianNLL:
    """-log p(x0 | x_t0) = -sum_i log p(x0_i = v_k), the discretized N(x0_hat, 1 / SNR(0)) [B].

    ``x0`` holds data on the grid ``v_k = 2 k / (num_levels - 1) - 1`` (values are snapped to the
    nearest level); ``log_snr_0`` is 0-d or [B]. Returns nats per example, summed over all
    non-batch dimensions.
    """

    def __init__(self, num_levels: int = 256) -> None:
        self.num_levels = _check_levels(num_levels)

    def __call__(self, x0: Tensor, x0_hat: Tensor, log_snr_0: Tensor) -> Tensor:
        """-sum over non-batch dims of log p(x0 = v_k | mean x0_hat, variance exp(-log_snr_0))."""
        dtype = _compute_dtype(x0_hat)  # log_snr_0 is cast to it, as in the Gaussian NLL
        x0_hat = x0_hat.to(dtype)
        k = level_index(x0.to(dtype), self.num_levels)
        lam = _expand_log_snr(log_snr_0, x0_hat)
        log_p = _log_prob_of_level(k, x0_hat, lam, self.num_levels)
        return -log_p.reshape(log_p.shape[0], -1).sum(dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_levels={self.num_levels})"
