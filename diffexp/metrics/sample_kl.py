"""KL of a sample set to a known density, with the Kozachenko-Leonenko entropy (MATH.md s10).

    KL(p_hat || q) = -H(p_hat) - E_{p_hat} log q,
    H_kNN = psi(n) - psi(k) + log V_d + (d / n) sum_i log r_{i,k},

with ``V_d = pi^(d/2) / Gamma(d/2 + 1)`` the volume of the unit d-ball and ``r_{i,k}`` the
Euclidean distance from sample ``i`` to its k-th nearest neighbour among the other samples
(``k = 5``). Unlike the signed mean log-density gap, the KL is >= 0 in expectation (up to the
estimator's small bias, its "floor") and grows for over-concentrated sample sets as well as for
spread-out or shifted ones. Compare a sampler's value with ``sample_kl_floor``: the same estimate
on exact samples of the same size.

Duplicate points: a k-th neighbour distance of exactly 0 (a point repeated more than ``k`` times)
makes ``log r`` = -inf; the estimate is then undefined (the sample set has an atom, KL = +inf) and
``knn_entropy`` raises ``ValueError`` rather than flooring the distance. Fewer than ``k + 1`` copies
of a point are fine. Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["knn_distances", "knn_entropy", "sample_kl", "sample_kl_floor"]

# cdist blocks hold at most this many float64 distances (~128 MiB)
_BLOCK_ELEMENTS = 1 << 24


def _as_points(x: Tensor) -> Tensor:
    """``x`` as a float64 ``[n, d]`` tensor (``[n]`` is read as 1-D data)."""
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"x must have shape [n] or [n, d]; got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite")
    return x.to(torch.float64)


def knn_distances(x: Tensor, k: int = 5) -> Tensor:
    """``r_{i,k}``: distance from each row of ``x [n, d]`` to its k-th nearest other row, ``[n]``.

    Computed in row blocks (``torch.cdist`` of a block against all points, self excluded by index,
    ``topk`` of the ``k`` smallest), so memory is O(block * n), not O(n^2).
    """
    x = _as_points(x)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < n; got k={k}, n={n}")
    block = max(1, min(n, _BLOCK_ELEMENTS // n))
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    for start in range(0, n, block):
        rows = x[start : start + block]
        d = torch.cdist(rows, x, compute_mode="donot_use_mm_for_euclid_dist")  # [b, n], exact
        idx = torch.arange(rows.shape[0], device=x.device)
        d[idx, start + idx] = math.inf  # exclude the point itself (not other copies of it)
        out[start : start + rows.shape[0]] = d.topk(k, dim=1, largest=False).values[:, -1]
    return out


def _log_unit_ball_volume(d: int) -> float:
    """``log V_d = (d / 2) log pi - log Gamma(d / 2 + 1)``."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def knn_entropy(x: Tensor, k: int = 5) -> float:
    """Kozachenko-Leonenko ``H = psi(n) - psi(k) + log V_d + (d/n) sum_i log r_{i,k}`` in nats."""
    x = _as_points(x)
    n, d = x.shape
    r = knn_distances(x, k)
    zeros = int((r == 0).sum())
    if zeros:
        raise ValueError(
            f"knn_entropy: {zeros} of {n} points have their {k}-th nearest neighbour at distance "
            f"0 (a point repeated more than k = {k} times); the entropy estimate is -inf and the "
            "KL undefined. Deduplicate or jitter the samples if this is intended."
        )
    psi = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    return (psi[0] - psi[1]).item() + _log_unit_ball_volume(d) + d * r.log().mean().item()


def sample_kl(x: Tensor, log_prob: Callable[[Tensor], Tensor], k: int = 5) -> float:
    """``KL(p_hat || q) = -H_kNN(x) - mean_i log q(x_i)`` in nats; ``log_prob`` gives ``log q``."""
    x = _as_points(x)
    log_q = torch.as_tensor(log_prob(x)).to(torch.float64).reshape(-1)
    if log_q.numel() != x.shape[0]:
        raise ValueError(
            f"log_prob must return one value per sample ({x.shape[0]}); got {log_q.numel()}"
        )
    if not torch.isfinite(log_q).all():
        raise ValueError("log_prob returned non-finite values")
    return -knn_entropy(x, k) - log_q.mean().item()


def sample_kl_floor(
    sample: Callable[[int, torch.Generator], Tensor],
    log_prob: Callable[[Tensor], Tensor],
    n: int,
    repeats: int = 5,
    seed: int = 0,
    k: int = 5,
) -> tuple[float, float]:
    """The floor: mean and std of ``sample_kl(x, log_prob)`` over ``repeats`` exact sets ``x ~ q``.

    ``sample(n, generator)`` draws ``n`` exact samples of ``q``; set ``r`` uses a CPU generator
    seeded with ``seed + r``. The std is the sample standard deviation (0 when ``repeats == 1``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    values = torch.tensor(
        [
            sample_kl(sample(n, torch.Generator().manual_seed(seed + r)), log_prob, k)
            for r in range(repeats)
        ],
        dtype=torch.float64,
    )
    std = values.std().item() if repeats > 1 else 0.0
    return values.mean().item(), std
