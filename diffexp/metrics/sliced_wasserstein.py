"""Sliced 2-Wasserstein distance between two sample sets."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein", "wasserstein2_1d"]


def _as_2d(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [n] or [n, d] with n >= 1; got {tuple(x.shape)}")
    return x.to(torch.float64)


def wasserstein2_1d(a: Tensor, b: Tensor) -> Tensor:
    """Squared W2 between empirical measures, per column: ``int_0^1 (F_a^-1(u) - F_b^-1(u))^2 du``.

    ``a [n, p]`` and ``b [m, p]`` hold ``p`` one-dimensional sample sets. For ``n == m`` this is
    the mean squared difference of the sorted values; otherwise the two step quantile functions
    are compared exactly on the common refinement of the levels ``i / n`` and ``j / m``
    (integer arithmetic in units of ``1 / (n m)``). Returns ``[p]``.
    """
    a, _ = torch.sort(a, dim=0)
    b, _ = torch.sort(b, dim=0)
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return (a - b).square().mean(0)
    device = a.device
    # Right end points of the common refinement, in units of 1 / (n m).
    ends = torch.unique(
        torch.cat(
            [
                torch.arange(1, n + 1, device=device, dtype=torch.long) * m,
                torch.arange(1, m + 1, device=device, dtype=torch.long) * n,
            ]
        )
    )
    widths = torch.diff(ends, prepend=ends.new_zeros(1)).to(a.dtype) / (n * m)
    # On (start, end] the quantile of a is a[ceil(end / m) - 1], that of b is b[ceil(end / n) - 1].
    idx_a = (ends + m - 1) // m - 1
    idx_b = (ends + n - 1) // n - 1
    return (widths[:, None] * (a[idx_a] - b[idx_b]).square()).sum(0)


def sliced_wasserstein(a: Tensor, b: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """``SW2(a, b) = sqrt(E_theta[W2^2(theta . a, theta . b)])``, theta uniform on the unit sphere.

    ``a [n, d]`` and ``b [m, d]`` (or ``[n]`` / ``[m]`` for 1-D data) are sample sets; the sizes
    may differ (the 1-D distances then compare the empirical quantile functions exactly, see
    ``wasserstein2_1d``). The expectation is a mean over ``n_projections`` random directions drawn
    from a CPU generator seeded with ``seed`` (deterministic); for ``d = 1`` the only direction is
    used and the result is the exact empirical W2. Computed in float64.
    """
    a = _as_2d(a, "a")
    b = _as_2d(b, "b").to(a.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1; got {n_projections}")
    dim = a.shape[1]
    if dim == 1:
        directions = torch.ones(1, 1, dtype=torch.float64)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        directions = torch.randn(dim, n_projections, generator=generator, dtype=torch.float64)
        directions = directions / directions.norm(dim=0, keepdim=True)
    directions = directions.to(a.device)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    chunk = max(1, 2**24 // max(a.shape[0] + b.shape[0], 1))  # bound the memory per chunk
    for start in range(0, directions.shape[1], chunk):
        proj = directions[:, start : start + chunk]
        total = total + wasserstein2_1d(a @ proj, b @ proj).sum()
    return float((total / directions.shape[1]).sqrt())
