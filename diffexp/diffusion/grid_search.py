"""Time grids fitted to a model (in the spirit of Sabour et al. 2024, "Align Your Steps").

A sampler's error at a small number of steps depends as much on where its steps are as on the
solver. For a given denoiser, sampler and number of steps this module chooses the log-SNR grid
lambda_0 > ... > lambda_steps (index 0 the clean end) that minimizes the energy distance

    D^2(P, Q) = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||   (X, X' ~ P; Y, Y' ~ Q)

between the sampler's samples on that grid (P) and a reference (Q: the same sampler with many
steps, whose discretization error is negligible, or data). D^2 is a metric between
distributions (zero only for P = Q): unlike a log-density gap it cannot be lowered by
over-concentrated samples, and it needs nothing but samples, so it works for a trained model on
images as for the oracle, for stochastic and deterministic samplers alike. Every candidate grid
is scored with the same starting noise and the same noise draws (common random numbers), so that
the differences between grids are not sampling noise.

The search: the fixed grids, then the family lambda(u) = lambda_lo + (lambda_hi - lambda_lo) u^rho
(u from 1 at the clean end to 0 at the noisy end; rho < 1 puts the steps closer together at high
SNR) over a coarse lattice of (lambda_lo, lambda_hi, rho) refined by pattern search, then each
point moved on its own (coordinate descent, ends included) while the score falls.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffexp.diffusion.denoiser import DenoiserLike
from diffexp.diffusion.samplers import TIME_GRIDS, Sampler, time_grid
from diffexp.diffusion.schedules import Schedule


def energy_distance(x: Tensor, y: Tensor, chunk: int = 2048) -> float:
    """D^2 = 2 mean ||x_i - y_j|| - mean_{i!=i'} ||x_i - x_i'|| - mean_{j!=j'} ||y_j - y_j'||."""
    x, y = x.flatten(1).double(), y.flatten(1).double()

    def mean_dist(a: Tensor, b: Tensor, same: bool) -> float:
        total = 0.0
        for start in range(0, len(a), chunk):
            total += torch.cdist(a[start : start + chunk], b).sum().item()
        pairs = len(a) * (len(b) - 1) if same else len(a) * len(b)
        return total / pairs  # the diagonal of a set with itself is zero

    return 2 * mean_dist(x, y, False) - mean_dist(x, x, True) - mean_dist(y, y, True)


def warped_log_snr(lam_lo: float, lam_hi: float, rho: float, steps: int) -> Tensor:
    """lambda_i = lambda_lo + (lambda_hi - lambda_lo) u_i^rho, u_i = 1 - i / steps."""
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return lam_lo + (lam_hi - lam_lo) * u**rho


@dataclass
class GridSearchResult:
    """The best log-SNR grid found (index 0 the clean end), its score, and the scores on the way."""

    log_snr: Tensor
    score: float
    fixed: dict[str, float]
    family: dict[str, float]
    evaluations: int
    history: list[float] = field(default_factory=list)
    # fit_time_grid's check on fresh noise: the scores of the fitted and the best fixed grid, and
    # the grid kept ("optimized", or the fixed grid's name where the fit did not hold up)
    heldout: dict[str, float] = field(default_factory=dict)
    chosen: str = "optimized"


def _is_grid(lam: Tensor, lam_min: float, lam_max: float) -> bool:
    """Strictly decreasing from index 0, within [lambda_min, lambda_max]."""
    return bool((lam[1:] < lam[:-1]).all() and lam[0] <= lam_max and lam[-1] >= lam_min)


def optimize_log_snr_grid(
    score: Callable[[Tensor], float],
    lam_min: float,
    lam_max: float,
    steps: int,
    fixed: dict[str, Tensor] | None = None,
    fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3),
    rhos: tuple[float, ...] = (0.5, 0.7, 1.0, 1.4, 2.0),
    sweeps: int = 3,
    shrink: tuple[float, ...] = (0.3, 0.15, 0.075),
) -> GridSearchResult:
    """The grid in [lambda_min, lambda_max] with the lowest ``score`` (lower is better).

    ``fixed``: named grids to start from (the sampler's fixed grids, scored and reported);
    ``fractions``: how far (as a fraction of lambda_max - lambda_min) the family's ends move in
    from lambda_min and lambda_max on the coarse lattice; ``rhos``: its warps; ``sweeps`` rounds
    of coordinate descent per step size in ``shrink`` (a fraction of the gap to the neighbour).
    """
    evaluations = 0
    best_lam: Tensor | None = None
    best = math.inf
    history: list[float] = []

    def consider(lam: Tensor) -> float:
        nonlocal evaluations, best, best_lam
        value = score(lam)
        evaluations += 1
        if value < best:
            best, best_lam = value, lam.clone()
            history.append(value)
        return value

    fixed_scores = {name: consider(lam) for name, lam in (fixed or {}).items()}
    span = lam_max - lam_min
    family: dict[tuple[float, float, float], float] = {}
    for f_lo in fractions:
        for f_hi in fractions:
            for rho in rhos:
                lam_lo, lam_hi = lam_min + f_lo * span, lam_max - f_hi * span
                if lam_hi - lam_lo < 0.1 * span:
                    continue
                family[(lam_lo, lam_hi, rho)] = consider(warped_log_snr(lam_lo, lam_hi, rho, steps))
    # pattern search on (lambda_lo, lambda_hi, log rho) from the lattice's best
    point = min(family, key=family.get) if family else None
    if point is not None:
        lo, hi, rho = point
        current = family[point]
        deltas = [0.05 * span, 0.05 * span, 0.2]
        while max(deltas[:2]) > 0.005 * span:
            moved = False
            for k in range(3):
                for sign in (1.0, -1.0):
                    cand = [lo, hi, math.log(rho)]
                    cand[k] += sign * deltas[k]
                    c_lo, c_hi, c_rho = cand[0], cand[1], math.exp(cand[2])
                    if not (lam_min <= c_lo < c_hi <= lam_max) or c_hi - c_lo < 0.1 * span:
                        continue
                    value = consider(warped_log_snr(c_lo, c_hi, c_rho, steps))
                    if value < current:
                        lo, hi, rho, current, moved = c_lo, c_hi, c_rho, value, True
            if not moved:
                deltas = [d / 2 for d in deltas]
    family_scores = {f"lo={k[0]:.3g} hi={k[1]:.3g} rho={k[2]:.3g}": v for k, v in family.items()}
    if best_lam is None:
        raise ValueError("no grid to score: give fixed grids or a non-empty family")
    # coordinate descent on each point (ends included), in steps of a fraction of the gap
    for frac in shrink:
        for _ in range(sweeps):
            improved = False
            for i in range(steps + 1):
                for sign in (1.0, -1.0):
                    lam = best_lam.clone()
                    if sign > 0:  # towards the cleaner neighbour (or lambda_max)
                        target = lam[i - 1] if i > 0 else torch.tensor(lam_max, dtype=lam.dtype)
                    else:
                        target = lam[i + 1] if i < steps else torch.tensor(lam_min, dtype=lam.dtype)
                    lam[i] = lam[i] + frac * (target - lam[i])
                    if not _is_grid(lam, lam_min, lam_max) or torch.equal(lam, best_lam):
                        continue
                    before = best
                    consider(lam)
                    improved |= best < before
            if not improved:
                break
    return GridSearchResult(
        log_snr=best_lam,
        score=best,
        fixed=fixed_scores,
        family=family_scores,
        evaluations=evaluations,
        history=history,
    )


def times_of_log_snr(schedule: Schedule, lam: Tensor) -> list[float]:
    """t_i = t(lambda_i) in [0, 1], the schedule's ends mapped exactly to 0 and 1."""
    lam_max, lam_min = (float(v) for v in schedule.endpoints)
    t = schedule.t_of_log_snr(lam.to(torch.float64)).clamp(0.0, 1.0)
    if lam[0] >= lam_max:
        t[0] = 0.0
    if lam[-1] <= lam_min:
        t[-1] = 1.0
    return [float(v) for v in t]


def fit_time_grid(
    sampler: Sampler,
    denoiser: DenoiserLike,
    shape: tuple[int, ...],
    reference: Tensor,
    *,
    seed: int = 0,
    y: Tensor | None = None,
    device: torch.device | str | None = None,
    heldout_seeds: tuple[int, ...] = (),
    **search,
) -> tuple[GridSearchResult, Sampler]:
    """The grid of ``sampler``'s steps whose samples (``shape``, noise from ``seed``) are nearest
    ``reference`` in energy distance, and the sampler on it (``time_grid="optimized"``).
    ``search``: ``optimize_log_snr_grid``'s options; its fixed grids are the sampler's.

    With ``heldout_seeds`` the fitted grid and the best fixed one are scored again on that fresh
    noise (mean over the seeds): the search's own score is optimistic for the noise it saw, and
    where the fitted grid is not the better one there, the best fixed grid is kept (its times,
    ``chosen`` names it), so that a fit never costs quality where the differences are noise."""
    schedule = denoiser.schedule
    lam_max, lam_min = (float(v) for v in schedule.endpoints)
    steps = int(sampler.steps)

    def on_grid(lam: Tensor) -> Sampler:
        times = times_of_log_snr(schedule, lam)
        return dataclasses.replace(sampler, time_grid="optimized", times=times)

    def score(lam: Tensor, noise_seed: int = seed) -> float:
        try:
            candidate = on_grid(lam)
        except ValueError:  # two times equal in float: not a grid
            return math.inf
        gen = torch.Generator(device=device).manual_seed(noise_seed)
        x = candidate.sample(denoiser, shape, y=y, generator=gen, device=device).x
        return energy_distance(x, reference) if torch.isfinite(x).all() else math.inf

    fixed = {
        kind: schedule.log_snr(time_grid(schedule, steps, kind, dtype=torch.float64)).double()
        for kind in TIME_GRIDS
    }
    result = optimize_log_snr_grid(score, lam_min, lam_max, steps, fixed=fixed, **search)
    if heldout_seeds:
        best_fixed = min(result.fixed, key=result.fixed.get)
        for name, lam in (("optimized", result.log_snr), (best_fixed, fixed[best_fixed])):
            result.heldout[name] = sum(score(lam, s) for s in heldout_seeds) / len(heldout_seeds)
        if result.heldout[best_fixed] <= result.heldout["optimized"]:
            result.log_snr, result.chosen = fixed[best_fixed], best_fixed
    return result, on_grid(result.log_snr)
