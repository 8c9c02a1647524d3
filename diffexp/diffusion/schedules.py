"""Noise schedules as functions of log-SNR (MATH.md section 1).

A schedule is fully described by ``log_snr(t)`` = lambda(t) = log(a_t^2 / s_t^2), strictly
decreasing on t in [0, 1]. Every derived quantity (a_t, s_t, alpha_bar, SNR: ``noise_level(t)``,
a ``NoiseLevel``; VDM's ``gamma``) follows from it.

Each fixed schedule has a natural shape (DDPM's linear betas, the cosine of Nichol & Dhariwal,
VDM's log-linear SNR). Given ``log_snr_max`` (the value at t=0) and ``log_snr_min`` (the value at
t=1), the shape's time axis is truncated to the interval where lambda lies between those
endpoints and stretched onto [0, 1]; so schedules with equal endpoints differ only in how they
spend time between them (which, in continuous time, leaves the ELBO unchanged: VDM's invariance).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.diffusion.tensors import device_of, full_precision


def _log_expm1(x: Tensor) -> Tensor:
    """log(exp(x) - 1), stable for small and large x > 0."""
    return torch.where(x > 1.0, x + torch.log(-torch.expm1(-x)), torch.log(torch.expm1(x)))


class Schedule(nn.Module):
    """Base class: a strictly decreasing log-SNR lambda(t) on t in [0, 1]."""

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log SNR(t)."""
        raise NotImplementedError

    def forward(self, t: Tensor) -> Tensor:
        """lambda(t)."""
        return self.log_snr(t)

    def gamma(self, t: Tensor) -> Tensor:
        """gamma(t) = -lambda(t) (VDM's notation)."""
        return -self.log_snr(t)

    def noise_level(self, t: Tensor) -> NoiseLevel:
        """a_t, s_t, alpha_bar(t), SNR(t), ... of lambda(t) (``NoiseLevel``)."""
        return NoiseLevel(self.log_snr(t))

    def log_snr_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(lambda(t), d lambda / dt), the derivative by autograd (differentiable itself)."""
        keep_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.enable_grad(), full_precision(t):  # the backward pass of f too
            t_ = t.detach().requires_grad_(True)
            lam = self.log_snr(t_)
            (dlam,) = torch.autograd.grad(lam.sum(), t_, create_graph=keep_graph)
        if not keep_graph:
            lam, dlam = lam.detach(), dlam.detach()
        return lam, dlam

    def dlog_snr_dt(self, t: Tensor) -> Tensor:
        """d lambda / dt."""
        return self.log_snr_and_derivative(t)[1]

    def log_density(self, log_snr: Tensor) -> Tensor:
        """log p(lambda) = -log|d lambda/dt| at t(lambda): the density of lambda(t), t ~ U(0, 1)."""
        with torch.no_grad():
            t = self.t_of_log_snr(log_snr)
        return -torch.log(-self.dlog_snr_dt(t))

    def discretize(self, T: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """lambda(t_i) on the grid t_i = i / T, i = 0..T (shape [T + 1])."""
        t = torch.linspace(0.0, 1.0, T + 1, dtype=dtype, device=device_of(self))
        return self.log_snr(t)

    def t_of_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """t such that lambda(t) = log_snr, by bisection (lambda is strictly decreasing)."""
        lo = torch.zeros_like(log_snr)
        hi = torch.ones_like(log_snr)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > log_snr
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    @property
    def endpoints(self) -> tuple[float, float]:
        """(lambda(0), lambda(1)) as floats."""
        t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device_of(self))
        with torch.no_grad():
            lam = self.log_snr(t.to(self._dtype()))
        return float(lam[0]), float(lam[1])

    def _dtype(self) -> torch.dtype:
        for b in list(self.parameters()) + list(self.buffers()):
            return b.dtype if b.is_floating_point() else torch.float32
        return torch.float32


class _TruncatedSchedule(Schedule):
    """A closed-form shape lambda_raw(u) truncated to [log_snr_min, log_snr_max], mapped to t."""

    def __init__(self, log_snr_max: float | None, log_snr_min: float | None) -> None:
        super().__init__()
        u0 = 0.0 if log_snr_max is None else float(self._raw_t_of_log_snr(_f64(log_snr_max)))
        u1 = 1.0 if log_snr_min is None else float(self._raw_t_of_log_snr(_f64(log_snr_min)))
        if log_snr_max is not None and log_snr_min is not None and log_snr_max <= log_snr_min:
            raise ValueError(
                f"log_snr_max ({log_snr_max}) must be greater than log_snr_min ({log_snr_min}): "
                "lambda(0) is the least noisy end of the schedule"
            )
        if not (0.0 <= u0 < u1 <= 1.0 + 1e-12):
            raise ValueError(
                f"{type(self).__name__}: endpoints log_snr_max={log_snr_max}, "
                f"log_snr_min={log_snr_min} lie outside the schedule's natural range "
                f"{self._raw_range()}; choose endpoints inside it"
            )
        self.log_snr_max = log_snr_max
        self.log_snr_min = log_snr_min
        self.register_buffer("u_range", torch.tensor([u0, min(u1, 1.0)], dtype=torch.float64))

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = lambda_raw(u0 + (u1 - u0) t)."""
        u0, u1 = self.u_range.to(t.dtype)
        return self._raw_log_snr(u0 + (u1 - u0) * t)

    def log_density(self, log_snr: Tensor) -> Tensor:
        """log p(lambda) = -log|d lambda/dt| at t(lambda), t by the shape's closed-form inverse."""
        u0, u1 = self.u_range.to(log_snr.dtype)
        t = (self._raw_t_of_log_snr(log_snr) - u0) / (u1 - u0)
        return -torch.log(-self.dlog_snr_dt(t))

    def _raw_log_snr(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _raw_t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        raise NotImplementedError

    def _raw_range(self) -> tuple[float, float]:
        with torch.no_grad():
            lam = self._raw_log_snr(torch.tensor([0.0, 1.0], dtype=torch.float64))
        return float(lam[0]), float(lam[1])

    def extra_repr(self) -> str:
        return f"log_snr_max={self.log_snr_max}, log_snr_min={self.log_snr_min}"


def _f64(x: float) -> Tensor:
    return torch.tensor(x, dtype=torch.float64)


class Linear(_TruncatedSchedule):
    """DDPM's linear betas in continuous time: alpha_bar(t) = exp(-(b0 t + (b1 - b0) t^2 / 2))."""

    def __init__(
        self,
        log_snr_max: float | None = None,
        log_snr_min: float | None = None,
        beta_0: float = 0.1,
        beta_1: float = 20.0,
    ) -> None:
        self.beta_0, self.beta_1 = float(beta_0), float(beta_1)
        super().__init__(log_snr_max, log_snr_min)

    def _integral_beta(self, u: Tensor) -> Tensor:
        return self.beta_0 * u + 0.5 * (self.beta_1 - self.beta_0) * u**2

    def _raw_log_snr(self, u: Tensor) -> Tensor:
        # alpha_bar = exp(-B) => lambda = log(alpha_bar / (1 - alpha_bar)) = -log(expm1(B))
        return -_log_expm1(self._integral_beta(u))

    def _raw_t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        big_b = F.softplus(-log_snr)  # B = log(1 + exp(-lambda))
        b0, db = self.beta_0, self.beta_1 - self.beta_0
        return 2.0 * big_b / (b0 + torch.sqrt(b0**2 + 2.0 * db * big_b))

    def discrete_alpha_bar(self, T: int) -> Tensor:
        """DDPM's table alpha_bar_i = prod_{j<=i} (1 - beta_j), beta = linspace(b0/T, b1/T, T)."""
        return ddpm_alpha_bar(T, self.beta_0 / T, self.beta_1 / T)


def ddpm_alpha_bar(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """alpha_bar_i = prod_{j<=i} (1 - beta_j), beta = linspace(beta_start, beta_end, T)."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class Cosine(_TruncatedSchedule):
    """Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t + s) / (1 + s)) pi / 2)."""

    def __init__(
        self,
        log_snr_max: float | None = None,
        log_snr_min: float | None = None,
        offset: float = 0.008,
    ) -> None:
        self.offset = float(offset)
        super().__init__(log_snr_max, log_snr_min)

    def _theta(self, u: Tensor) -> Tensor:
        return (u + self.offset) / (1.0 + self.offset) * (math.pi / 2)

    def _raw_log_snr(self, u: Tensor) -> Tensor:
        # lambda = log f(t) - log(f(0) - f(t)), f(0) - f(t) = sin(th + th0) sin(th - th0)
        th, th0 = self._theta(u), self._theta(torch.zeros_like(u))
        log_f = 2.0 * torch.log(torch.cos(th).clamp_min(0.0))
        log_df = torch.log(torch.sin(th + th0)) + torch.log(torch.sin(th - th0))
        return log_f - log_df

    def _raw_t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        th0 = self._theta(torch.zeros_like(log_snr))
        th = torch.arccos(NoiseLevel(log_snr).a * torch.cos(th0))
        return th / (math.pi / 2) * (1.0 + self.offset) - self.offset

    def discrete_alpha_bar(self, T: int, max_beta: float = 0.999) -> Tensor:
        """The improved-DDPM table: beta_i = min(1 - f(t_i)/f(t_{i-1}), 0.999), i = 1..T."""
        t = torch.linspace(0.0, 1.0, T + 1, dtype=torch.float64)
        f = torch.cos(self._theta(t)) ** 2
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
        return torch.cumprod(1.0 - betas, dim=0)


class LogLinear(_TruncatedSchedule):
    """VDM's fixed schedule: lambda(t) = log_snr_max + (log_snr_min - log_snr_max) t."""

    def __init__(self, log_snr_max: float = 13.3, log_snr_min: float = -5.0) -> None:
        self._lmax, self._lmin = float(log_snr_max), float(log_snr_min)
        super().__init__(log_snr_max, log_snr_min)

    def _raw_log_snr(self, u: Tensor) -> Tensor:
        return self._lmax + (self._lmin - self._lmax) * u

    def _raw_t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        return (log_snr - self._lmax) / (self._lmin - self._lmax)

    def log_snr_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(lambda(t), lambda_min - lambda_max) in closed form."""
        return self.log_snr(t), torch.full_like(t, self._lmin - self._lmax)


class RectifiedFlow(_TruncatedSchedule):
    """The rectified-flow path z = (1 - u) x0 + u eps as a VP schedule: lambda = 2 log((1 - u) / u).

    (a = (1 - u) r, s = u r, r = 1 / sqrt((1 - u)^2 + u^2), so z = x_t / (a + s); MATH.md
    section 9.) Truncated to [log_snr_min, log_snr_max] like the other shapes, u in [u0, u1].
    """

    def __init__(self, log_snr_max: float = 10.0, log_snr_min: float = -8.0) -> None:
        super().__init__(log_snr_max, log_snr_min)

    def _raw_log_snr(self, u: Tensor) -> Tensor:
        return 2.0 * (torch.log1p(-u) - torch.log(u))

    def _raw_t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        return NoiseLevel(log_snr).rectified_flow_time

    def log_snr_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(lambda(t), -2 (u1 - u0) / (u (1 - u))), u = u0 + (u1 - u0) t, in closed form."""
        u0, u1 = self.u_range.to(t.dtype)
        u = u0 + (u1 - u0) * t
        return self._raw_log_snr(u), -2.0 * (u1 - u0) / (u * (1.0 - u))


class _MonotoneLinear(nn.Module):
    """y = x W^T + b with W = softplus(W_raw) > 0, so y is increasing in every input."""

    def __init__(self, n_in: int, n_out: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.weight_raw = nn.Parameter(
            torch.randn(n_out, n_in) * 0.1 + math.log(math.expm1(init_scale))
        )
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        """x W^T + b with W = softplus(raw) > 0, in x's dtype even under autocast (a schedule is
        part of the ELBO's math, never run in bf16)."""
        with full_precision(x):
            return x @ F.softplus(self.weight_raw).to(x.dtype).T + self.bias.to(x.dtype)


class InteriorGradScale:
    """Per-example factors [n] for the gradient reaching a learned schedule's interior: set
    after the forward pass (``scale``), read in the backward pass."""

    def __init__(self) -> None:
        self.scale: Tensor | None = None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``holder.scale`` (per example)."""

    @staticmethod
    def forward(ctx, x: Tensor, holder: InteriorGradScale) -> Tensor:
        ctx.holder = holder
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        scale = ctx.holder.scale
        if scale is None or scale.numel() != grad.numel():
            raise RuntimeError(
                "scaled_interior_gradient: set holder.scale to one factor per example "
                f"({grad.numel()}) after the forward pass and before backward; got "
                f"{None if scale is None else tuple(scale.shape)}"
            )
        return grad * scale.reshape(grad.shape).to(grad.dtype), None


class Learned(Schedule):
    """VDM's learned schedule: lambda(t) = -gamma(t), gamma monotone with learnable endpoints.

    gamma(t) = gamma_min + (gamma_max - gamma_min) (g(t) - g(0)) / (g(1) - g(0)), with
    g(t) = l1(t) + l3(sigmoid(l2(l1(t)))) built from positive-weight layers, so lambda(0) =
    log_snr_max and lambda(1) = log_snr_min exactly, both of them parameters.

    ``interior_objective`` says how training moves the interior (the layers of g): ``elbo`` (the
    gradient of the loss, zero in expectation for the continuous ELBO, which depends on the
    endpoints only) or ``variance`` (VDM's procedure: minimize E[L^2], i.e. the variance of the
    one-sample diffusion-term estimate L, by the gradient E[2 L dL/d eta]). The endpoints are
    always trained on the ELBO.
    """

    INTERIOR_OBJECTIVES = ("elbo", "variance")

    def __init__(
        self,
        log_snr_max: float = 13.3,
        log_snr_min: float = -5.0,
        hidden: int = 1024,
        interior_objective: str = "elbo",
    ) -> None:
        super().__init__()
        if log_snr_max <= log_snr_min:
            raise ValueError(f"log_snr_max ({log_snr_max}) must exceed log_snr_min ({log_snr_min})")
        if interior_objective not in self.INTERIOR_OBJECTIVES:
            raise ValueError(
                f"unknown interior_objective {interior_objective!r}; valid: "
                f"{', '.join(self.INTERIOR_OBJECTIVES)}"
            )
        self.interior_objective = interior_objective
        self._grad_scale: InteriorGradScale | None = None
        self.log_snr_max = nn.Parameter(torch.tensor(float(log_snr_max)))
        self.log_snr_min = nn.Parameter(torch.tensor(float(log_snr_min)))
        self.l1 = _MonotoneLinear(1, 1)
        self.l2 = _MonotoneLinear(1, hidden)
        self.l3 = _MonotoneLinear(hidden, 1, init_scale=1.0 / hidden)

    def _g(self, t: Tensor) -> Tensor:
        h = self.l1(t[..., None])
        return (h + self.l3(torch.sigmoid(self.l2(h))))[..., 0]

    def _frac(self, t: Tensor) -> Tensor:
        """f(t) = (g(t) - g(0)) / (g(1) - g(0)), in [0, 1]."""
        # g(0), g(1) and g(t) from one call, so that t = 0 and t = 1 give f = 0 and 1 to the
        # last bit (separate calls round differently in float32)
        ends = torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device)
        g = self._g(torch.cat([ends, t.reshape(-1)]))
        return ((g[2:] - g[0]) / (g[1] - g[0])).reshape(t.shape)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = lambda_max (1 - f) + lambda_min f, f = (g(t) - g(0)) / (g(1) - g(0))."""
        lmax, lmin = self.log_snr_max.to(t.dtype), self.log_snr_min.to(t.dtype)
        frac = self._frac(t)
        return lmax * (1.0 - frac) + lmin * frac

    def log_snr_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(lambda(t), (lambda_min - lambda_max) f'(t)), f' by autograd; inside
        ``scaled_interior_gradient`` the gradient reaching the interior through f(t) and f'(t)
        is multiplied per example by the factors set on the context's ``InteriorGradScale``."""
        keep_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.enable_grad(), full_precision(t):  # the backward pass of f too
            t_ = t.detach().requires_grad_(True)
            frac = self._frac(t_)
            (dfrac,) = torch.autograd.grad(frac.sum(), t_, create_graph=keep_graph)
        if not keep_graph:
            frac, dfrac = frac.detach(), dfrac.detach()
        elif self._grad_scale is not None:
            frac = _ScaleGrad.apply(frac, self._grad_scale)
            dfrac = _ScaleGrad.apply(dfrac, self._grad_scale)
        lmax, lmin = self.log_snr_max.to(t.dtype), self.log_snr_min.to(t.dtype)
        return lmax * (1.0 - frac) + lmin * frac, (lmin - lmax) * dfrac

    @contextmanager
    def scaled_interior_gradient(self) -> Iterator[InteriorGradScale]:
        """Within: per-example factors on the interior's gradient, set on the yielded holder
        after the forward pass and applied in the backward pass (VDM's variance objective:
        factor 2 L_i turns d mean(L) into d mean(L^2) in the same backward pass)."""
        holder = InteriorGradScale()
        self._grad_scale = holder
        try:
            yield holder
        finally:
            self._grad_scale = None

    def interior_parameters(self) -> list[nn.Parameter]:
        """The parameters of the shape g (everything but the two endpoints)."""
        return [p for name, p in self.named_parameters() if not name.startswith("log_snr_")]

    def extra_repr(self) -> str:
        return f"interior_objective={self.interior_objective!r}"
