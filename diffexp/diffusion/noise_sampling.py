"""p(lambda): the density of training noise levels (MATH.md section 9).

The loss is 1/2 E_{lambda ~ p}[(w(lambda) / p(lambda)) ||eps_hat - eps||^2], so p(lambda) only
importance-samples the integral 1/2 int w(lambda) E||eps_hat - eps||^2 dlambda over the schedule's
range [lambda(1), lambda(0)]: it changes the estimator's variance, never its expectation.

Every sampler draws by inverse CDF from one stratified uniform per example (one offset per batch,
then stride 1/n, as the ELBO's times), and returns 1/p(lambda) with each lambda:
- ``ScheduleTimes``: t ~ U(0, 1), lambda = schedule(t), 1/p = -d lambda/dt (the default; for a
  T-step model t is mapped to its step i = ceil(t T) and 1/p to T expm1(lambda_{i-1} - lambda_i),
  the discrete ELBO's weight). Differentiable in a learned schedule's parameters.
- ``LogNormal``: EDM's ln sigma ~ N(P_mean, P_std^2), i.e. lambda = -2 ln sigma ~ N(-2 P_mean,
  (2 P_std)^2), truncated to the schedule's range.
- ``LogitNormal``: SD3's rectified-flow time t_rf = sigmoid(n), n ~ N(m, s^2); since
  lambda = 2 log((1 - t_rf) / t_rf) = -2 n, lambda ~ N(-2 m, (2 s)^2), truncated likewise.
- ``Adaptive``: Kingma & Gao's p(lambda) proportional to a running average of the weighted loss
  in bins of lambda (or to its root mean square), learned while training (state in checkpoints).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffexp.diffusion.schedules import Schedule


def stratified_times(
    n: int, k: int = 1, generator: torch.Generator | None = None, device=None, dtype=None
) -> Tensor:
    """t[i, j] = (u + (i + j n) / (n k)) mod 1: one uniform u, stratified per example and batch."""
    u = torch.rand((), generator=generator, device=device, dtype=dtype or torch.float32)
    idx = torch.arange(n * k, device=device, dtype=u.dtype).reshape(k, n).T
    return torch.remainder(u + idx / (n * k), 1.0)


@dataclass
class DrawnLevels:
    """Drawn log-SNRs [n] and the inverse of their density, 1 / p(lambda) [n]."""

    log_snr: Tensor
    inv_density: Tensor

    def elbo_log_weight(self) -> Tensor:
        """log(1/2 (1 / p(lambda)) SNR): the ELBO's (w = 1) weight on ||x0 - x0_hat||^2."""
        return torch.log(0.5 * self.inv_density) + self.log_snr


class NoiseSampling:
    """Base class: a density p(lambda) on the schedule's range, sampled by inverse CDF."""

    name: str = ""
    uniform_dtype: torch.dtype | None = None  # the uniforms' dtype; None: the data's

    def draw(
        self,
        schedule: Schedule,
        n: int,
        T: int = 0,
        generator: torch.Generator | None = None,
        like: Tensor | None = None,
    ) -> DrawnLevels:
        """n noise levels from n stratified uniforms, on ``like``'s device and in its dtype."""
        like = like if like is not None else torch.zeros(())
        dtype = self.uniform_dtype or like.dtype
        u = stratified_times(n, 1, generator, device=like.device, dtype=dtype)[:, 0]
        levels = self.from_uniform(schedule, u, T)
        return DrawnLevels(levels.log_snr.to(like.dtype), levels.inv_density.to(like.dtype))

    def from_uniform(self, schedule: Schedule, u: Tensor, T: int = 0) -> DrawnLevels:
        """lambda = F^-1(u) and 1/p(lambda) for uniforms u [n]."""
        raise NotImplementedError

    def log_density(self, schedule: Schedule, log_snr: Tensor) -> Tensor:
        """log p(lambda) on the schedule's range."""
        raise NotImplementedError

    def check(self, schedule: Schedule, T: int = 0) -> None:
        """Raise a ValueError, before training, when this density cannot serve ``schedule``
        (and a model of T steps, T = 0: continuous time)."""

    def _refuse_steps(self, T: int) -> None:
        """Continuous noise levels only: a T-step model (T > 0) trains on its own steps."""
        if T > 0:
            raise ValueError(
                f"noise_sampling={self.name} draws continuous noise levels, but model.T={T} "
                "is a T-step model that trains on its own steps; use noise_sampling=schedule "
                "with model.T>0, or model.T=0 (continuous time) with any noise_sampling"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ScheduleTimes(NoiseSampling):
    """t ~ U(0, 1), lambda = schedule(t): p(lambda) = 1 / |d lambda / dt| (VDM's sampling)."""

    name = "schedule"

    def from_uniform(self, schedule: Schedule, u: Tensor, T: int = 0) -> DrawnLevels:
        """lambda = schedule(t), 1/p = -lambda'(t); for T > 0, t -> ceil(t T) / T and
        1/p = T expm1(lambda_{i-1} - lambda_i)."""
        if T > 0:
            i = torch.clamp(torch.ceil(u * T), 1, T)
            lam_t = schedule.log_snr(i / T)
            lam_s = schedule.log_snr((i - 1) / T)
            return DrawnLevels(lam_t, T * torch.expm1(lam_s - lam_t))
        lam, dlam = schedule.log_snr_and_derivative(u)
        return DrawnLevels(lam, -dlam)

    def log_density(self, schedule: Schedule, log_snr: Tensor) -> Tensor:
        """log p(lambda) = -log|lambda'(t(lambda))|."""
        return schedule.log_density(log_snr)


@dataclass(frozen=True)
class _Range:
    """A truncated normal's standardized range: Phi at its ends, log Z, orientation, endpoints."""

    cdf_lo: float
    cdf_hi: float
    log_z: float
    flipped: bool
    lam_min: float
    lam_max: float


class TruncatedNormalLogSNR(NoiseSampling):
    """lambda ~ N(mean, std^2) truncated to the schedule's range [lambda(1), lambda(0)].

    Drawn in float64 (float32 uniforms would leave tails of mass < 6e-8 unreachable) by the
    inverse CDF of the side of the normal where the range's CDF values are small and exact.
    """

    mean: float = 0.0
    std: float = 1.0
    uniform_dtype = torch.float64
    _cache: tuple[weakref.ref, _Range] | None = None

    def _bounds(self, schedule: Schedule) -> _Range:
        """The standardized range [a, b] with Phi(a), Phi(b) and log Z, Z = Phi(b) - Phi(a);
        flipped ([a, b] = [-b0, -a0]) when the range lies mostly above the mean. Cached for a
        fixed schedule, so a training step costs no device-to-host copy."""
        fixed = not any(p.requires_grad for p in schedule.parameters())
        if fixed and self._cache is not None and self._cache[0]() is schedule:
            return self._cache[1]
        lam_0, lam_1 = schedule.endpoints
        a, b = (lam_1 - self.mean) / self.std, (lam_0 - self.mean) / self.std
        flipped = a + b > 0
        if flipped:
            a, b = -b, -a
        log_lo, log_hi = (
            float(torch.special.log_ndtr(torch.tensor(v, dtype=torch.float64))) for v in (a, b)
        )
        gap = log_lo - log_hi  # log Z = log Phi(b) + log(1 - Phi(a) / Phi(b))
        log_z = log_hi + (
            math.log(-math.expm1(gap)) if gap > -math.log(2) else math.log1p(-math.exp(gap))
        )
        bounds = _Range(math.exp(log_lo), math.exp(log_hi), log_z, flipped, lam_1, lam_0)
        if fixed:
            self._cache = (weakref.ref(schedule), bounds)
        return bounds

    def check(self, schedule: Schedule, T: int = 0) -> None:
        """A clear error for a T-step model (T > 0) or when the density puts no representable
        mass on the schedule's range."""
        self._refuse_steps(T)
        r = self._bounds(schedule)
        if not (r.cdf_hi > r.cdf_lo and math.isfinite(r.log_z)):
            raise ValueError(
                f"noise_sampling={self.name} ({self!r}) puts no mass on the schedule's log-SNR "
                f"range [{r.lam_min:g}, {r.lam_max:g}]; move its mean into the range"
            )

    def from_uniform(self, schedule: Schedule, u: Tensor, T: int = 0) -> DrawnLevels:
        """lambda = mean + std Phi^-1(Phi(a) + u Z) (mirrored when flipped), clamped to the
        range, and 1/p = Z / N(lambda; mean, std^2)."""
        self._refuse_steps(T)
        r = self._bounds(schedule)
        z = torch.special.ndtri(r.cdf_lo + u.to(torch.float64) * (r.cdf_hi - r.cdf_lo))
        lam = (self.mean + self.std * (-z if r.flipped else z)).clamp(r.lam_min, r.lam_max)
        inv_p = torch.exp(r.log_z - self._log_normal(lam))
        return DrawnLevels(lam.to(u.dtype), inv_p.to(u.dtype))

    def _log_normal(self, log_snr: Tensor) -> Tensor:
        """log N(lambda; mean, std^2)."""
        z = (log_snr - self.mean) / self.std
        return -0.5 * z**2 - math.log(self.std) - 0.5 * math.log(2 * math.pi)

    def log_density(self, schedule: Schedule, log_snr: Tensor) -> Tensor:
        """log N(lambda; mean, std^2) - log Z."""
        return self._log_normal(log_snr) - self._bounds(schedule).log_z

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lambda ~ N({self.mean:g}, {self.std:g}^2))"


class LogNormal(TruncatedNormalLogSNR):
    """EDM: ln sigma ~ N(P_mean, P_std^2) with sigma = exp(-lambda / 2).

    So lambda ~ N(-2 P_mean, (2 P_std)^2), truncated to the schedule's range.
    """

    name = "lognormal"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2) -> None:  # noqa: N803
        if not P_std > 0:
            raise ValueError(f"noise_sampling.P_std must be > 0, got {P_std}")
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.mean, self.std = -2.0 * self.P_mean, 2.0 * self.P_std

    def __repr__(self) -> str:
        return f"LogNormal(P_mean={self.P_mean:g}, P_std={self.P_std:g})"


class LogitNormal(TruncatedNormalLogSNR):
    """SD3: rectified-flow time t_rf = sigmoid(n), n ~ N(m, s^2): lambda = -2 n ~ N(-2 m, 4 s^2)."""

    name = "logit_normal"

    def __init__(self, m: float = 0.0, s: float = 1.0) -> None:
        if not s > 0:
            raise ValueError(f"noise_sampling.s must be > 0, got {s}")
        self.m, self.s = float(m), float(s)
        self.mean, self.std = -2.0 * self.m, 2.0 * self.s

    def __repr__(self) -> str:
        return f"LogitNormal(m={self.m:g}, s={self.s:g})"


class Adaptive(NoiseSampling, nn.Module):
    """Kingma & Gao's adaptive p(lambda): proportional to a running average of the weighted loss
    f(lambda) = 1/2 w(lambda) E||eps_hat - eps||^2 in ``bins`` equal bins of the schedule's log-SNR
    range (``target="mean"``), or to its root mean square (``target="rms"``: the variance-optimal
    density of the one-sample estimate), mixed with ``uniform`` of the uniform density so that
    no bin's weight w / p can blow up.

    State (buffers, so checkpoints hold it): exponential moving averages, decay ``decay``, of the
    per-bin count, sum of f and sum of f^2 of the training examples (``observe`` computes a
    batch's, summed over DDP ranks by the caller; ``update`` folds them in). A bin never seen
    takes the mean over the seen ones; before any observation p is uniform in lambda.
    Drawn by inverse CDF from the stratified uniforms, piecewise uniform within a bin.
    """

    name = "adaptive"
    TARGETS = ("mean", "rms")

    def __init__(
        self, bins: int = 100, decay: float = 0.99, target: str = "mean", uniform: float = 0.1
    ) -> None:
        nn.Module.__init__(self)
        if int(bins) < 1:
            raise ValueError(f"noise_sampling.bins must be >= 1, got {bins}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"noise_sampling.decay must be in [0, 1), got {decay}")
        if target not in self.TARGETS:
            raise ValueError(
                f"noise_sampling.target={target!r} is not one of {', '.join(self.TARGETS)} "
                "(mean: p proportional to the weighted loss; rms: to its root mean square)"
            )
        if not 0.0 < float(uniform) <= 1.0:
            raise ValueError(f"noise_sampling.uniform must be in (0, 1], got {uniform}")
        self.bins, self.decay, self.target = int(bins), float(decay), target
        self.uniform = float(uniform)
        # [count, sum f, sum f^2] per bin, exponential moving averages
        self.register_buffer("moments", torch.zeros(3, self.bins, dtype=torch.float64))

    def edges(self, schedule: Schedule) -> Tensor:
        """The bins' edges in log-SNR, from lambda(1) up to lambda(0) [bins + 1] (float64; cached
        per schedule: a fixed schedule's endpoints, read once, no device-to-host copy a step)."""
        cache = self.__dict__.get("_edges")
        if cache is None or cache[0]() is not schedule or cache[1].device != self.moments.device:
            lam_0, lam_1 = schedule.endpoints
            edges = torch.linspace(
                lam_1, lam_0, self.bins + 1, dtype=torch.float64, device=self.moments.device
            )
            self.__dict__["_edges"] = cache = (weakref.ref(schedule), edges)
        return cache[1]

    def bin_profile(self) -> Tensor:
        """The running estimate of f (mean) or sqrt(E f^2) (rms) per bin [bins] (float64); bins
        never observed take the mean over the observed ones; all ones before any observation
        (no host-device sync)."""
        count, total, squares = self.moments
        seen = count > 0
        moment = total if self.target == "mean" else squares
        value = torch.where(seen, moment / count.clamp_min(1e-300), 0.0).clamp_min(0.0)
        n_seen = seen.sum()
        fallback = torch.where(n_seen > 0, value.sum() / n_seen.clamp_min(1), 1.0)
        value = torch.where(seen, value, fallback)
        return value.sqrt() if self.target == "rms" else value

    def bin_mass(self) -> Tensor:
        """Each bin's probability [bins]: (1 - uniform) profile / sum + uniform / bins."""
        profile = self.bin_profile()
        total = profile.sum()
        shape = torch.where(total > 0, profile / total.clamp_min(1e-300), 1.0 / self.bins)
        return (1.0 - self.uniform) * shape + self.uniform / self.bins

    def from_uniform(self, schedule: Schedule, u: Tensor, T: int = 0) -> DrawnLevels:
        """lambda by the inverse CDF of the piecewise-uniform p (bins from lambda(1) up), and
        1/p = bin width / bin mass."""
        self._refuse_steps(T)
        edges, mass = self.edges(schedule).to(u.device), self.bin_mass().to(u.device)
        cdf = torch.cat([mass.new_zeros(1), torch.cumsum(mass, 0)])
        cdf = cdf / cdf[-1]
        uu = u.to(torch.float64)
        i = torch.searchsorted(cdf, uu, right=True).clamp(1, self.bins) - 1
        frac = ((uu - cdf[i]) / mass[i]).clamp(0.0, 1.0)
        width = edges[1:] - edges[:-1]
        lam = edges[i] + frac * width[i]
        inv_p = width[i] / mass[i]
        return DrawnLevels(lam.to(u.dtype), inv_p.to(u.dtype))

    def _bin(self, edges: Tensor, log_snr: Tensor) -> Tensor:
        """The bin of each lambda, 0 .. bins - 1 (the range's ends in the end bins)."""
        return torch.bucketize(log_snr.to(torch.float64), edges, right=True).clamp(1, self.bins) - 1

    def log_density(self, schedule: Schedule, log_snr: Tensor) -> Tensor:
        """log p(lambda) = log(bin mass / bin width) of lambda's bin."""
        edges = self.edges(schedule).to(log_snr.device)
        mass = self.bin_mass().to(log_snr.device)
        i = self._bin(edges, log_snr)
        return torch.log(mass[i] / (edges[i + 1] - edges[i])).to(log_snr.dtype)

    def observe(self, schedule: Schedule, log_snr: Tensor, weighted_loss: Tensor) -> Tensor:
        """One batch's [count, sum f, sum f^2] per bin [3, bins] (float64), f the examples'
        weighted loss 1/2 w ||eps_hat - eps||^2 (the loss times p(lambda), detached)."""
        edges = self.edges(schedule).to(log_snr.device)
        f = weighted_loss.detach().to(torch.float64)
        i = self._bin(edges, log_snr.detach())
        stats = torch.zeros(3, self.bins, dtype=torch.float64, device=f.device)
        stats[0].index_add_(0, i, torch.ones_like(f))
        stats[1].index_add_(0, i, f)
        stats[2].index_add_(0, i, f * f)
        return stats

    @torch.no_grad()
    def update(self, stats: Tensor) -> None:
        """moments <- decay moments + (1 - decay) stats."""
        self.moments.mul_(self.decay).add_(stats.to(self.moments), alpha=1.0 - self.decay)

    def check(self, schedule: Schedule, T: int = 0) -> None:
        """Continuous time only."""
        self._refuse_steps(T)

    def __repr__(self) -> str:
        return (
            f"Adaptive(bins={self.bins}, decay={self.decay:g}, target={self.target}, "
            f"uniform={self.uniform:g})"
        )
