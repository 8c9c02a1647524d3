"""Gaussian-mixture data with closed-form noisy marginals, scores and posterior means (MATH.md s8).

Data ``x0 ~ sum_k pi_k N(mu_k, v_k I)`` noised by the variance-preserving process
``x_t = a_t x0 + s_t eps`` with ``a_t^2 = sigmoid(log_snr)`` and ``s_t^2 = sigmoid(-log_snr)``
has the closed form

    q(x_t) = sum_k pi_k N(x_t; a_t mu_k, (a_t^2 v_k + s_t^2) I),

which makes the mixture an exact test oracle for every quantity a diffusion model estimates.
``log_snr`` is a tensor broadcastable against the batch (shape ``[n]``, 0-d or a python float);
``log_snr = +inf`` gives ``a = 1, s = 0``, i.e. the data density itself. a_t^2 and s_t^2 are
taken as exp(logsigmoid(+-lambda)) (``NoiseLevel``'s logs), which differ from sigmoid(+-lambda)
in the last bit: every oracle number in the tests and benchmarks was computed so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffexp.diffusion.noise_level import NoiseLevel

__all__ = [
    "GaussianMixture",
    "PRESETS",
    "grid25",
    "make_mixture",
    "mixture1d",
    "ring8",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _as_float_tensor(value: Tensor | Sequence | float, like: Tensor | None = None) -> Tensor:
    """Convert ``value`` to a floating tensor (``like``'s dtype/device, else the default dtype)."""
    if like is not None:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    tensor = torch.as_tensor(value)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def _log_snr_column(log_snr: Tensor | float, x_t: Tensor) -> Tensor:
    """``log_snr`` as a ``[n, 1]`` (or ``[1, 1]``) column in ``x_t``'s dtype and device."""
    lam = torch.as_tensor(log_snr, dtype=x_t.dtype, device=x_t.device)
    if lam.ndim == 0:
        return lam.reshape(1, 1)
    lam = lam.reshape(-1)
    if lam.numel() not in (1, x_t.shape[0]):
        raise ValueError(
            f"log_snr must be a scalar or have one entry per example ({x_t.shape[0]}); "
            f"got shape {tuple(torch.as_tensor(log_snr).shape)}"
        )
    return lam.reshape(-1, 1)


class GaussianMixture:
    """Isotropic Gaussian mixture ``p(x0) = sum_k pi_k N(x0; mu_k, v_k I)`` in ``R^d``.

    Args:
        means: component means ``mu_k``, shape ``[K, d]``.
        variances: per-component isotropic variances ``v_k``, shape ``[K]`` or a scalar.
        weights: mixing weights ``pi_k``, shape ``[K]``; default uniform; normalized to sum to 1.
    """

    def __init__(
        self,
        means: Tensor | Sequence,
        variances: Tensor | Sequence | float,
        weights: Tensor | Sequence | None = None,
    ) -> None:
        means = _as_float_tensor(means)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(
                f"means must have shape [K, d] with K, d >= 1; got {tuple(means.shape)}"
            )
        num_components, dim = means.shape
        if not torch.isfinite(means).all():
            raise ValueError("means must be finite")

        variances = _as_float_tensor(variances, like=means)
        if variances.ndim == 0:
            variances = variances.expand(num_components).clone()
        if variances.shape != (num_components,):
            raise ValueError(
                f"variances must be a scalar or have shape [K] = [{num_components}]; "
                f"got {tuple(variances.shape)}"
            )
        if not (torch.isfinite(variances).all() and (variances > 0).all()):
            raise ValueError(f"variances must be finite and > 0; got {variances.tolist()}")

        if weights is None:
            weights = torch.full((num_components,), 1.0 / num_components, dtype=means.dtype)
        weights = _as_float_tensor(weights, like=means)
        if weights.shape != (num_components,):
            raise ValueError(
                f"weights must have shape [K] = [{num_components}]; got {tuple(weights.shape)}"
            )
        if not (torch.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError(f"weights must be finite and > 0; got {weights.tolist()}")

        self.means: Tensor = means
        self.variances: Tensor = variances
        self.weights: Tensor = weights / weights.sum()
        self.dim: int = int(dim)
        self.num_components: int = int(num_components)

    # ------------------------------------------------------------------ utilities
    def __repr__(self) -> str:
        return (
            f"GaussianMixture(num_components={self.num_components}, dim={self.dim}, "
            f"dtype={self.means.dtype}, device={self.means.device})"
        )

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> GaussianMixture:
        """A copy with parameters cast to ``dtype`` and moved to ``device``."""
        return GaussianMixture(
            self.means.to(dtype=dtype, device=device, copy=True),
            self.variances.to(dtype=dtype, device=device, copy=True),
            self.weights.to(dtype=dtype, device=device, copy=True),
        )

    @property
    def stds(self) -> Tensor:
        """Per-component standard deviations ``sqrt(v_k)``, shape ``[K]``."""
        return self.variances.sqrt()

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(means, variances, log weights)`` in ``x``'s dtype and device."""
        return (
            self.means.to(dtype=x.dtype, device=x.device),
            self.variances.to(dtype=x.dtype, device=x.device),
            self.weights.to(dtype=x.dtype, device=x.device).log(),
        )

    def _check_x(self, x: Tensor, name: str = "x_t") -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [n, {self.dim}]; got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {x.dtype}")

    def _check_y(self, y: Tensor, n: int) -> Tensor:
        y = torch.as_tensor(y)
        if y.shape != (n,) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"y must be an integer tensor of shape [{n}]; got {y.dtype} {y.shape}")
        if n > 0 and (int(y.min()) < 0 or int(y.max()) >= self.num_components):
            raise ValueError(f"y must lie in [0, {self.num_components}); got out-of-range labels")
        return y.long()

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``y ~ Cat(pi)``, ``x0 = mu_y + sqrt(v_y) eps``; returns ``(x0 [n, d], y [n])``."""
        device = generator.device if generator is not None else self.means.device
        weights = self.weights.to(device=device)
        y = torch.multinomial(weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=device)
        means = self.means.to(device=device)
        stds = self.stds.to(device=device)
        x0 = means[y] + stds[y, None] * eps
        return x0.to(self.means.device), y.to(self.means.device)

    # ------------------------------------------------------------------ densities
    def component_log_prob(self, x_t: Tensor, log_snr: Tensor | float) -> Tensor:
        """``log N(x_t; a_t mu_k, (a_t^2 v_k + s_t^2) I)`` for every component, shape ``[n, K]``."""
        self._check_x(x_t)
        means, variances, _ = self._params(x_t)
        level = NoiseLevel(_log_snr_column(log_snr, x_t))  # [m, 1], m in {1, n}
        a2, s2 = level.log_alpha_bar.exp(), level.log_s2.exp()  # the oracle's form: keep it
        var = a2 * variances + s2  # [m, K]
        diff = x_t[:, None, :] - a2.sqrt()[..., None] * means  # [n, K, d]
        sq = diff.square().sum(-1)  # [n, K]
        return -0.5 * (sq / var + self.dim * (_LOG_2PI + var.log()))

    def _log_joint(self, x_t: Tensor, log_snr: Tensor | float) -> Tensor:
        """``log pi_k + log N(x_t; a_t mu_k, (a_t^2 v_k + s_t^2) I)``, shape ``[n, K]``."""
        _, _, log_weights = self._params(x_t)
        return log_weights + self.component_log_prob(x_t, log_snr)

    def marginal_log_prob(self, x_t: Tensor, log_snr: Tensor | float) -> Tensor:
        """``log q(x_t) = log sum_k pi_k N(x_t; a_t mu_k, (a_t^2 v_k + s_t^2) I)``, shape [n]."""
        return torch.logsumexp(self._log_joint(x_t, log_snr), dim=-1)

    def log_prob(self, x0: Tensor) -> Tensor:
        """``log p(x0) = log sum_k pi_k N(x0; mu_k, v_k I)``, shape ``[n]``."""
        self._check_x(x0, "x0")
        return self.marginal_log_prob(x0, math.inf)

    def responsibilities(self, x_t: Tensor, log_snr: Tensor | float) -> Tensor:
        """``log r_k(x_t) = log pi_k N_k(x_t) - log q(x_t)`` = exact noisy ``log p(y=k | x_t)``."""
        log_joint = self._log_joint(x_t, log_snr)
        return log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)

    # ------------------------------------------------------------------ score / denoiser
    def _moments(
        self, x_t: Tensor, log_snr: Tensor | float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a_t [m,1], means [K,d], variances [K], var_k = a^2 v_k + s^2 [m,K])``."""
        self._check_x(x_t)
        means, variances, _ = self._params(x_t)
        level = NoiseLevel(_log_snr_column(log_snr, x_t))
        a2, s2 = level.log_alpha_bar.exp(), level.log_s2.exp()
        return a2.sqrt(), means, variances, a2 * variances + s2

    def score(self, x_t: Tensor, log_snr: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``grad log q(x_t) = sum_k r_k (a mu_k - x_t) / (a^2 v_k + s^2)``; with y: only k = y."""
        a, means, _, var = self._moments(x_t, log_snr)
        n = x_t.shape[0]
        if y is not None:
            y = self._check_y(y, n).to(x_t.device)
            var_y = var.expand(n, -1).gather(1, y[:, None])  # [n, 1]
            return (a * means[y] - x_t) / var_y
        r = self.responsibilities(x_t, log_snr).exp()  # [n, K]
        per_component = (a[..., None] * means - x_t[:, None, :]) / var[..., None]  # [n, K, d]
        return (r[..., None] * per_component).sum(1)

    def posterior_mean(
        self, x_t: Tensor, log_snr: Tensor | float, y: Tensor | None = None
    ) -> Tensor:
        """``E[x0 | x_t] = sum_k r_k (mu_k + a v_k / (a^2 v_k + s^2) (x_t - a mu_k))``; y: k = y."""
        a, means, variances, var = self._moments(x_t, log_snr)
        n = x_t.shape[0]
        gain = a * variances / var  # [m, K]
        if y is not None:
            y = self._check_y(y, n).to(x_t.device)
            gain_y = gain.expand(n, -1).gather(1, y[:, None])  # [n, 1]
            return means[y] + gain_y * (x_t - a * means[y])
        r = self.responsibilities(x_t, log_snr).exp()  # [n, K]
        per_component = means + gain[..., None] * (
            x_t[:, None, :] - a[..., None] * means
        )  # [n, K, d]
        return (r[..., None] * per_component).sum(1)


# ---------------------------------------------------------------------- presets
def ring8(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """8 equal-weight Gaussians of std ``std`` at angles ``2 pi k / 8`` on a ``radius`` circle."""
    angles = torch.arange(8, dtype=torch.float64) * (2.0 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means.to(torch.get_default_dtype()), std**2)


def grid25(spacing: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """25 equal-weight Gaussians of std ``std`` at ``spacing * (i, j)``, ``i, j in -2..2``."""
    ticks = spacing * torch.arange(-2, 3, dtype=torch.get_default_dtype())
    gx, gy = torch.meshgrid(ticks, ticks, indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    return GaussianMixture(means, std**2)


def mixture1d(
    weights: Sequence[float] = (0.3, 0.7),
    means: Sequence[float] = (-1.0, 1.5),
    stds: Sequence[float] = (0.25, 0.5),
) -> GaussianMixture:
    """1-D ``sum_k w_k N(m_k, std_k^2)``; default ``0.3 N(-1, 0.25^2) + 0.7 N(1.5, 0.5^2)``."""
    if not (len(weights) == len(means) == len(stds)):
        raise ValueError("mixture1d: weights, means and stds must have the same length")
    dtype = torch.get_default_dtype()
    return GaussianMixture(
        torch.tensor(means, dtype=dtype)[:, None],
        torch.tensor(stds, dtype=dtype).square(),
        torch.tensor(weights, dtype=dtype),
    )


PRESETS: dict[str, Callable[..., GaussianMixture]] = {
    "ring8": ring8,
    "grid25": grid25,
    "mixture1d": mixture1d,
}


def make_mixture(name: str, **kwargs) -> GaussianMixture:
    """Build the preset mixture ``PRESETS[name](**kwargs)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown mixture preset {name!r}; valid names: {sorted(PRESETS)}")
    return PRESETS[name](**kwargs)
