"""Samplers that consume a Denoiser (MATH.md section 6).

Every sampler walks a time grid t_0 = 0 < ... < t_steps = 1 from x_1 ~ N(0, I) towards t_0. The
end is set by ``final_denoise``:
- ``True``: step down to t_0, then return x0_hat(x_{t_0}) (one more NFE; DDPM's decoder mean);
- ``"last_step"``: the last interval t_1 -> t_0 is the jump to zero noise, x0_hat(x_{t_1}), which is
  what DDIM's and Euler's step gives at sigma = 0 (Karras et al.'s last step, DDPM's noiseless
  last step); it spends no extra NFE and denoises where the grid's last step starts;
- ``False``: return x_{t_0} as it is.
All of them run in the variance-preserving variable x_t = a_t x0 + s_t eps
(a_t^2 = sigmoid(lambda), s_t^2 = sigmoid(-lambda); ``NoiseLevel``). Each returns the samples and
its number of network evaluations (NFE): every call of the denoiser it was given counts once, so a
guidance wrapper that calls its network twice per call still counts one.

- ``Ancestral``: x_s ~ q(x_s | x_t, x0 = x0_hat).
- ``DDIM``: x_s = a_s x0_hat + sqrt(s_s^2 - c^2) eps_hat + c z (eta = 1: ancestral; 0: an ODE).
- ``FlowEuler``: Euler on the rectified-flow ODE in z = x_t / (a + s) (equals DDIM with eta = 0).
- ``ReverseSDE``: Euler-Maruyama in t on dx = (f x - g^2 score) dt + g dw.
- ``ProbabilityFlowODE``: dx = (f x - 1/2 g^2 score) dt, fixed-step Heun/Euler (Karras) or
  any torchdiffeq solver.
- ``DPMSolverPP2M``: Lu et al.'s DPM-Solver++(2M) on the same ODE, multistep in x0_hat.
- ``DPMSolverPP2MSDE``: the same multistep x0_hat in the exponential integrator of the reverse
  SDE (eta: the fraction of its noise).
- ``DPMSolverPP3M``: DPM-Solver++(3M), x0_hat extrapolated by the quadratic through the last
  three steps' (third order).
- ``UniPC``: Zhao et al.'s multistep predictor and free corrector in the same integrator.
- ``DEIS``: Zhang & Chen's rhoAB-DEIS, Adams-Bashforth in sigma on eps_hat in x / a.
- ``EDMStochastic``: Karras et al.'s Heun steps with noise raised at each point (churn).
- ``AnnealedLangevin``: NCSN's Langevin dynamics at decreasing noise levels.
- ``PredictorCorrector``: any predictor step, then Langevin corrector steps (Song et al.).

Each sampler is a dataclass of its settings, given by keyword (the names of ``conf/sampler``);
``settings()`` and ``repr`` list them. ``sample(..., callback=f)`` calls f(StepInfo) after every
step, for trajectories and progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property

import torch
from torch import Tensor

from diffexp.diffusion.denoiser import DenoiserLike, DenoiserOutput
from diffexp.diffusion.elbo import posterior
from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.diffusion.schedules import Schedule

TIME_GRIDS = ("uniform", "log_snr", "karras")
# a sampler's time_grid: a fixed grid, or "optimized": the times given (``times``), fitted to a
# model by ``grid_search.optimize_log_snr_grid`` (python -m diffexp.optimize_grid)
SAMPLER_TIME_GRIDS = (*TIME_GRIDS, "optimized")
KARRAS_RHO = 7.0


def time_grid(
    schedule: Schedule, steps: int, kind: str = "uniform", rho: float = KARRAS_RHO, **like
) -> Tensor:
    """Times t_0 = 0 < ... < t_steps = 1, uniform in t, in log-SNR, or Karras et al.'s grid.

    karras: sigma = s/a = exp(-lambda/2) at t_i is (sigma_min^(1/rho) + i/N (sigma_max^(1/rho)
    - sigma_min^(1/rho)))^rho, i.e. Karras's sigma_{N-i}; mapped back to t through the schedule.
    """
    if steps < 1:
        raise ValueError(f"a sampler needs at least one step, got steps={steps}")
    if kind == "uniform":
        return torch.linspace(0.0, 1.0, steps + 1, **like)
    if kind not in TIME_GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; valid: {list(TIME_GRIDS)}")
    lam_0, lam_1 = schedule.endpoints
    if kind == "log_snr":
        lam = torch.linspace(lam_0, lam_1, steps + 1, **like)
    else:  # log sigma^(1/rho) = -lambda / (2 rho)
        root_min, root_max = math.exp(-lam_0 / (2 * rho)), math.exp(-lam_1 / (2 * rho))
        root = torch.linspace(root_min, root_max, steps + 1, **like)
        lam = -2.0 * rho * torch.log(root)
    t = schedule.t_of_log_snr(lam)
    t[0], t[-1] = 0.0, 1.0
    return t


@dataclass
class SampleOutput:
    """Samples and the number of network evaluations that produced them."""

    x: Tensor
    nfe: int


@dataclass(frozen=True, eq=False)
class StepInfo:
    """What ``sample``'s callback gets after each step: the step from grid point i (t_i, lambda_i).

    ``x`` is what the step produced: x_{t_{i-1}} for a step of the chain, the returned sample for
    the final denoise (i = 0 with ``final_denoise=True``, i = 1 with ``"last_step"``).
    ``x0_hat`` is the denoiser's x0_hat(x_{t_i}) the step used; None where it used none (the
    Langevin levels, torchdiffeq's solvers).
    """

    i: int
    t: Tensor
    log_snr: Tensor
    x: Tensor
    x0_hat: Tensor | None


StepCallback = Callable[[StepInfo], None]


@dataclass
class Grid:
    """A sampler's time grid: t_i, lambda(t_i), and d lambda/dt at t_i (i = 0..steps)."""

    t: Tensor
    log_snr: Tensor
    dlog_snr: Tensor

    @classmethod
    def build(
        cls, schedule: Schedule, steps: int, kind: str, times: list[float] | None = None, **like
    ) -> Grid:
        """The grid of ``time_grid`` (or the given ``times`` for kind "optimized") with lambda
        and its derivative from the schedule."""
        if kind == "optimized":
            if times is None or len(times) != steps + 1:
                raise ValueError(
                    f"time_grid=optimized needs steps + 1 = {steps + 1} times, got "
                    f"{None if times is None else len(times)}"
                )
            t = torch.tensor(times, **like)
        else:
            t = time_grid(schedule, steps, kind, **like)
        lam, dlam = schedule.log_snr_and_derivative(t)
        return cls(t=t, log_snr=lam.to(t.dtype), dlog_snr=dlam.to(t.dtype))

    def info(self, i: int, x: Tensor, x0_hat: Tensor | None) -> StepInfo:
        """The ``StepInfo`` of the step from t_i that produced x."""
        return StepInfo(i=i, t=self.t[i], log_snr=self.log_snr[i], x=x, x0_hat=x0_hat)


class NFECounter:
    """den(x, y=y, log_snr=lambda), counting every call: the number of function evaluations."""

    def __init__(self, denoiser: DenoiserLike, y: Tensor | None = None) -> None:
        self.denoiser, self.y, self.nfe = denoiser, y, 0

    def __call__(self, x: Tensor, log_snr: Tensor) -> DenoiserOutput:
        """The denoiser's estimates at (x, lambda); one more NFE."""
        self.nfe += 1
        return self.denoiser(x, y=self.y, log_snr=log_snr)


class Noise:
    """Standard normal draws of one shape from one generator, in sampling order."""

    def __init__(self, shape, generator: torch.Generator | None, **like) -> None:
        self.shape, self.generator, self.like = tuple(shape), generator, like

    def __call__(self) -> Tensor:
        """z ~ N(0, I)."""
        return torch.randn(self.shape, generator=self.generator, **self.like)


def pf_ode_drift_log_snr(out: DenoiserOutput, x: Tensor) -> Tensor:
    """dx/dlambda = 1/2 (s^2 x - s eps_hat) = (f x - 1/2 g^2 score) / lambda'(t), the PF-ODE."""
    level = NoiseLevel(out.log_snr)
    return 0.5 * (level.s2 * x - level.s * out.eps_hat)


def langevin_step(x: Tensor, score: Tensor, eta: Tensor, z: Tensor) -> Tensor:
    """x + eta score + sqrt(2 eta) z (eta broadcastable against x)."""
    return x + eta * score + (2.0 * eta).sqrt() * z


FINAL_DENOISE = (True, False, "last_step")
# ``field(metadata=...)``: "show" is False (never in ``settings()``) or a predicate of the sampler
_HIDDEN = {"show": False}
# coercions of the settings, by their annotation: ``DDIM(eta=0)`` holds (and shows) eta = 0.0
_COERCE = {"int": int, "float": float, "str": str}
# the settings every sampler has, listed last by ``settings()``
SHARED_SETTINGS = ("time_grid", "final_denoise", "times")

sampler_dataclass = dataclass(kw_only=True, repr=False, eq=False)


@sampler_dataclass
class Sampler:
    """Base class: walks the grid from t_steps = 1 down with ``step``, then denoises.

    A subclass is a ``@sampler_dataclass`` that declares ``steps`` (with its default) and its own
    settings, checks them in ``check`` and implements ``step(model, x, grid, i, noise)``,
    x_{t_i} -> x_{t_{i-1}}, calling the denoiser only through ``model`` (an ``NFECounter``) and
    drawing noise only from ``noise``; ``run`` chains the steps from t_steps down to t_end
    (end = 1 for ``"last_step"``, else 0). The shared settings are checked here.
    """

    time_grid: str = "uniform"
    final_denoise: bool | str = True
    # time_grid=optimized: the grid's times t_0 < ... < t_steps in [0, 1] (set from a grid file
    # by the build layer, diffexp.build.grids)
    times: list[float] | None = field(
        default=None, metadata={"show": lambda s: s.time_grid == "optimized"}
    )

    def __post_init__(self) -> None:
        """Coerce the settings to their annotated types, check the shared ones, then ``check``."""
        for f in fields(self):
            if f.type in _COERCE:
                setattr(self, f.name, _COERCE[f.type](getattr(self, f.name)))
        if self.time_grid not in SAMPLER_TIME_GRIDS:
            raise ValueError(
                f"unknown time grid {self.time_grid!r}; valid: {list(SAMPLER_TIME_GRIDS)}"
            )
        if self.times is not None:
            self.times = [float(v) for v in self.times]
            self._check_times()
        if not (isinstance(self.final_denoise, bool) or self.final_denoise == "last_step"):
            raise ValueError(
                f"final_denoise must be one of {list(FINAL_DENOISE)}, got {self.final_denoise!r}"
            )
        if self.steps is not None and int(self.steps) < 1:
            raise ValueError(f"steps must be a positive number of steps, got {self.steps}")
        self.check()

    def _check_times(self) -> None:
        """The given times: time_grid=optimized, steps + 1 of them, strictly increasing in
        [0, 1]."""
        times = self.times
        if self.time_grid != "optimized":
            raise ValueError(
                f"times are used with time_grid=optimized only, not time_grid={self.time_grid!r}"
            )
        if self.steps is not None and len(times) != int(self.steps) + 1:
            raise ValueError(
                f"an optimized grid of {len(times) - 1} steps cannot run steps={self.steps}: "
                f"fit a grid for {self.steps} steps (python -m diffexp.optimize_grid "
                f"steps={self.steps} ...)"
            )
        if not all(0.0 <= a < b <= 1.0 for a, b in zip(times[:-1], times[1:], strict=True)):
            raise ValueError(f"the grid's times must increase strictly within [0, 1]: {times}")

    def check(self) -> None:
        """Refuse invalid settings of the subclass's own (ValueError); the shared ones are
        checked already."""

    @torch.no_grad()
    def sample(
        self,
        denoiser: DenoiserLike,
        shape: tuple[int, ...],
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        callback: StepCallback | None = None,
    ) -> SampleOutput:
        """Draw x_1 ~ N(0, I), run the chain to t_end, return x0_hat(x_{t_end}) and the NFE.

        ``callback`` (default None: none) is called with a ``StepInfo`` after every step, the
        final denoise included, steps - end + (1 if final_denoise else 0) times: its last ``x``
        is the returned sample.
        """
        like = {"device": device, "dtype": dtype}
        model, noise = NFECounter(denoiser, y), Noise(shape, generator, **like)
        if self.time_grid == "optimized" and self.times is None:
            raise ValueError(
                "time_grid=optimized needs the grid's times: fit them with python -m "
                "diffexp.optimize_grid (eval and sample read them from the grid file)"
            )
        grid = Grid.build(denoiser.schedule, int(self.steps), self.time_grid, self.times, **like)
        end = 1 if self.final_denoise == "last_step" else 0
        x = self.run(model, noise(), grid, noise, end, callback)
        if self.final_denoise:
            x = model(x, grid.log_snr[end]).x0_hat
            if callback is not None:
                callback(grid.info(end, x, x))
        return SampleOutput(x=x, nfe=model.nfe)

    def run(
        self,
        model: NFECounter,
        x: Tensor,
        grid: Grid,
        noise: Noise,
        end: int = 0,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """x_{t_end} from x_{t_steps}: ``step`` for i = steps..end+1."""
        for i in range(len(grid.t) - 1, end, -1):
            x, x0_hat = self.step(model, x, grid, i, noise)
            if callback is not None:
                callback(grid.info(i, x, x0_hat))
        return x

    def step(
        self, model: NFECounter, x: Tensor, grid: Grid, i: int, noise: Noise
    ) -> tuple[Tensor, Tensor | None]:
        """x_{t_{i-1}} from x_{t_i}, and the x0_hat(x_{t_i}) it used (None if none)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """The settings ``__repr__`` lists: the subclass's own, in order, then the shared ones."""
        shown = [f for f in fields(self) if f.name not in SHARED_SETTINGS]
        shown += [f for f in fields(self) if f.name in SHARED_SETTINGS]
        out = {}
        for f in shown:
            show = f.metadata.get("show", True)
            if show is True or (show is not False and show(self)):
                out[f.name] = getattr(self, f.name)
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


@sampler_dataclass
class Ancestral(Sampler):
    """DDPM's ancestral sampler: x_s ~ q(x_s | x_t, x0 = x0_hat(x_t)) down a time grid.

    The chain starts at x_1 ~ N(0, I); with ``final_denoise`` the last step returns
    x0_hat(x_{t0}), the decoder's mean, instead of the noisy x_{t0} (one more NFE).
    NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    steps: int = 1000

    def step(self, model, x, grid, i, noise):
        """x_s = mu_q(x_t, x0_hat) + sigma_q z (MATH.md section 2)."""
        x0_hat = model(x, grid.log_snr[i]).x0_hat
        mean, var = posterior(x, x0_hat, grid.log_snr[i - 1], grid.log_snr[i])
        return mean + var.sqrt() * noise(), x0_hat


@sampler_dataclass
class DDIM(Sampler):
    """DDIM: x_s = a_s x0_hat + sqrt(s_s^2 - c^2) eps_hat + c z, c^2 = eta^2 sigma_q^2.

    c = eta (s_s / s_t) sqrt(1 - a_t^2 / a_s^2): eta = 1 is the ancestral sampler (same draws,
    same samples); eta = 0 draws no noise after x_1 (deterministic: Euler on the PF-ODE in
    sigma = s/a). NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    steps: int = 100
    eta: float = 0.0

    def check(self):
        """eta in [0, 1]."""
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM's eta must lie in [0, 1], got {self.eta}")

    def step(self, model, x, grid, i, noise):
        """x_s = a_s x0_hat + sqrt(s_s^2 - c^2) eps_hat + c z."""
        out = model(x, grid.log_snr[i])
        lam_s, lam_t = grid.log_snr[i - 1], grid.log_snr[i]
        level_s = NoiseLevel(lam_s)
        if self.eta == 0.0:
            return level_s.a * out.x0_hat + level_s.s * out.eps_hat, out.x0_hat
        _, c2 = posterior(x, out.x0_hat, lam_s, lam_t)  # sigma_q^2 = s_s^2/s_t^2 (1 - a_t^2/a_s^2)
        c2 = self.eta**2 * c2
        eps_coef = (level_s.s2 - c2).clamp_min(0.0).sqrt()
        return level_s.a * out.x0_hat + eps_coef * out.eps_hat + c2.sqrt() * noise(), out.x0_hat


@sampler_dataclass
class FlowEuler(Sampler):
    """Euler on the rectified-flow ODE dz/dt_rf = u, z = x_t / (a + s), t_rf = s / (a + s):
    z' = z + (t_rf' - t_rf) u_hat, u_hat = eps_hat - x0_hat (any Denoiser, not only flow ones).

    In x it is x_s = a_s x0_hat + s_s eps_hat: DDIM with eta = 0 on the same grid (MATH.md
    section 9). NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    steps: int = 100

    def step(self, model, x, grid, i, noise):
        """z_s = z_t + (t_s - t_t) u_hat in the rectified-flow variable, back to x_s."""
        out = model(x, grid.log_snr[i])
        level_t, level_s = NoiseLevel(grid.log_snr[i]), NoiseLevel(grid.log_snr[i - 1])
        a_t, s_t, a_s, s_s = level_t.a, level_t.s, level_s.a, level_s.s
        t_rf, s_rf = s_t / (a_t + s_t), s_s / (a_s + s_s)
        z = x / (a_t + s_t) + (s_rf - t_rf) * (out.eps_hat - out.x0_hat)
        return (a_s + s_s) * z, out.x0_hat


@sampler_dataclass
class ReverseSDE(Sampler):
    """Euler-Maruyama on the reverse SDE dx = (f x - g^2 score) dt + g dw, t from 1 to 0.

    Variance preserving: f = 1/2 d log a_t^2/dt = 1/2 s_t^2 lambda'(t) and
    g^2 = -d log a_t^2/dt = -s_t^2 lambda'(t), both evaluated at the start t of each step; the
    schedule's shape matters here (it sets how the grid's steps fall in lambda).
    NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    steps: int = 1000
    time_grid: str = "log_snr"

    def step(self, model, x, grid, i, noise):
        """x_s = x_t - h (f x_t - g^2 score) + g sqrt(h) z, h = t - s > 0."""
        lam, dlam = grid.log_snr[i], grid.dlog_snr[i]
        h = grid.t[i] - grid.t[i - 1]
        s2 = NoiseLevel(lam).s2
        f, g2 = 0.5 * s2 * dlam, -s2 * dlam
        out = model(x, lam)
        return x - h * (f * x - g2 * out.score) + (g2 * h).sqrt() * noise(), out.x0_hat


FIXED_STEP_SOLVERS = ("heun", "euler")
TORCHDIFFEQ_FIXED_GRID = ("midpoint", "rk4", "heun2", "heun3", "explicit_adams")
TORCHDIFFEQ_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
# solvers refused, with why (measured on the ring with the exact denoiser, 20 000 samples)
REFUSED_ODE_SOLVERS = {
    "fehlberg2": "its embedded first-order error estimate accepts steps far too long: 9 NFE and a "
    "KL of 74 nats at rtol=atol=1e-2 (3.2 at 1e-3), where dopri5 takes 93 NFE for 0.015",
    "implicit_adams": "its functional iteration does not converge on this ODE (a warning at "
    "every step, at 10 to 40 steps and up to 32 iterations), at about 5 NFE a step; "
    "explicit_adams (1 NFE a step) or rk4 converge",
}
_SHOWN_IF_ADAPTIVE = {"show": lambda sampler: sampler.adaptive}
# torchdiffeq's fixed-grid Adams method defaults to order 12, whose multistep formula is unstable
# on this ODE (the ring's KL grows to 1e9 as the steps increase); 4 is its lowest and converges
ADAMS_MAX_ORDER = 4


def worst_example_rms(scaled_error: Tensor) -> Tensor:
    """max over examples of sqrt(mean over dims of (err / tol)^2): an adaptive solver's step is
    accepted only when every example's error is within tolerance (torchdiffeq's default RMS over
    the whole batch lets a few examples' large errors hide among many small ones)."""
    per_example = scaled_error.reshape(scaled_error.shape[0], -1) if scaled_error.dim() else None
    if per_example is None:  # the step-size controller's scalar norms
        return scaled_error.abs()
    return per_example.pow(2).mean(dim=1).sqrt().max()


@sampler_dataclass
class ProbabilityFlowODE(Sampler):
    """The probability-flow ODE dx = (f x - 1/2 g^2 score) dt from t = 1 to t = 0.

    Fixed steps on the grid (``"heun"``, ``"euler"``) integrate Karras et al.'s form of the same
    ODE: with x~ = x / a and sigma = s / a = exp(-lambda/2) it reads dx~/dsigma = eps_hat, whose
    Euler step is DDIM (eta = 0), exact where eps_hat is constant.
    - heun: 2 NFE per step (Karras's Algorithm 1); with ``final_denoise="last_step"`` the last
      interval is Karras's Euler step to sigma = 0, so NFE = 2 steps - 1, as in Karras.
    - euler: 1 NFE per step (= DDIM, eta = 0).
    With ``final_denoise=True`` one more NFE denoises at t_0. (DPM-Solver++(2M) is
    ``DPMSolverPP2M``.)

    Any torchdiffeq method integrates the VP variable over lambda instead,
    dx/dlambda = 1/2 (s^2 x - s eps_hat) (= dx/dt / lambda'(t)): O(1) in scale and non-stiff at
    both ends, and the schedule enters only through its endpoints. Adaptive methods (dopri5,
    bosh3, adaptive_heun, ...) go from lambda(1) to lambda(t_end) with ``rtol``/``atol`` and use
    no other grid point (a callback gets x at the grid points from the solver's interpolant);
    fixed-grid ones (rk4, midpoint, ...) step on the grid (explicit_adams: order 4, started by
    two RK4 steps, so NFE = 4 min(n, 2) + max(n - 2, 0) for n steps). Adaptive solvers accept a
    step only when every example's error is within tolerance. The NFE is counted in the drift
    function.
    """

    steps: int = 50
    solver: str = "heun"
    rtol: float = field(default=1e-4, metadata=_SHOWN_IF_ADAPTIVE)
    atol: float = field(default=1e-4, metadata=_SHOWN_IF_ADAPTIVE)
    time_grid: str = "karras"

    def check(self):
        """DPM-Solver++(2M) is its own sampler (DPMSolverPP2M), not a solver of this ODE."""
        if self.solver == "dpmpp_2m":
            raise ValueError(
                "ProbabilityFlowODE has no solver 'dpmpp_2m': DPM-Solver++(2M) is the sampler "
                "DPMSolverPP2M (sampler=dpmpp_2m)"
            )
        valid = (*FIXED_STEP_SOLVERS, *TORCHDIFFEQ_FIXED_GRID, *TORCHDIFFEQ_ADAPTIVE)
        if self.solver in REFUSED_ODE_SOLVERS:
            raise ValueError(
                f"ODE solver {self.solver!r} is refused: {REFUSED_ODE_SOLVERS[self.solver]}. "
                "Use solver=dopri5 (adaptive) or solver=heun (fixed steps)"
            )
        if self.solver not in valid:
            raise ValueError(f"unknown ODE solver {self.solver!r}; valid: {list(valid)}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"rtol and atol must be positive, got {self.rtol}, {self.atol}")

    @property
    def adaptive(self) -> bool:
        """Whether the solver chooses its own steps (torchdiffeq's adaptive methods)."""
        return self.solver not in (*FIXED_STEP_SOLVERS, *TORCHDIFFEQ_FIXED_GRID)

    def run(self, model, x, grid, noise, end=0, callback=None):
        """Fixed steps in (x~, sigma) down the grid, or torchdiffeq over lambda."""
        if self.solver in FIXED_STEP_SOLVERS:
            return super().run(model, x, grid, noise, end, callback)
        from torchdiffeq import odeint

        def drift(lam: Tensor, x: Tensor) -> Tensor:
            return pf_ode_drift_log_snr(model(x, lam), x)

        lam = grid.log_snr[end:].flip(0)  # lam[k] = lambda(t_{steps-k})
        if self.adaptive:
            # the steps depend on the end points only: asking for the grid's points too (for
            # the callback) reads them off the interpolant and leaves x(lambda(t_end)) as it is
            times = lam if callback is not None else lam[[0, -1]]
            options = {"norm": worst_example_rms}
            xs = odeint(
                drift, x, times, rtol=self.rtol, atol=self.atol, method=self.solver, options=options
            )
        else:
            options = {"max_order": ADAMS_MAX_ORDER} if self.solver == "explicit_adams" else None
            xs = odeint(drift, x, lam, method=self.solver, options=options)
        if callback is not None:
            steps = len(grid.t) - 1
            for i in range(steps, end, -1):
                callback(grid.info(i, xs[steps - i + 1], None))
        return xs[-1]

    def step(self, model, x, grid, i, noise):
        """x_s = a_s (x_t / a_t + (sigma_s - sigma_t) d), d = eps_hat or Heun's average."""
        lam_t, lam_s = grid.log_snr[i], grid.log_snr[i - 1]
        level_t, level_s = NoiseLevel(lam_t), NoiseLevel(lam_s)
        a_ratio = torch.exp(0.5 * (level_s.log_alpha_bar - level_t.log_alpha_bar))  # a_s / a_t
        a_sigma = level_s.a * (level_s.sigma - level_t.sigma)
        out = model(x, lam_t)
        d = out.eps_hat
        x_s = a_ratio * x + a_sigma * d
        if self.solver == "euler":
            return x_s, out.x0_hat
        return a_ratio * x + a_sigma * 0.5 * (d + model(x_s, lam_s).eps_hat), out.x0_hat


@sampler_dataclass
class DPMSolverPP2M(Sampler):
    """Lu et al.'s DPM-Solver++(2M): the exponential integrator of the probability-flow ODE in
    x0_hat, with a second-order multistep correction from the previous step's x0_hat.

    With h = (lambda_s - lambda_t) / 2 (the step in log(a/s)):
    x_s = (s_s / s_t) x_t - a_s expm1(-h) D, D = x0_hat + (x0_hat - x0_prev) h / (2 h_prev)
    (D = x0_hat on the first step, which is DDIM's). 1 NFE per step:
    NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    steps: int = 50
    time_grid: str = "log_snr"

    @property
    def noise_fraction(self) -> float:
        """eta of ``DPMSolverPP2MSDE``: 0, the probability-flow ODE."""
        return 0.0

    def x0_estimate(self, history: list[tuple[Tensor, Tensor]], lam_s: Tensor) -> Tensor:
        """D = x0_hat + (x0_hat - x0_prev) h / (2 h_prev) from ``history``'s (x0_hat, lambda),
        newest first (D = x0_hat with no earlier point)."""
        (x0_hat, lam_t), *earlier = history
        if not earlier:
            return x0_hat
        x0_prev, lam_prev = earlier[0]
        h, h_prev = 0.5 * (lam_s - lam_t), 0.5 * (lam_t - lam_prev)
        return x0_hat + (x0_hat - x0_prev) * (h / (2 * h_prev))

    def run(self, model, x, grid, noise, end=0, callback=None):
        """The multistep chain: ``x0_estimate`` from this step's x0_hat and the two before."""
        lam, history, eta = grid.log_snr, [], self.noise_fraction
        for i in range(len(lam) - 1, end, -1):
            x0_hat = model(x, lam[i]).x0_hat
            history = [(x0_hat, lam[i]), *history[:2]]
            d = self.x0_estimate(history, lam[i - 1])
            x = exponential_integrator_step(x, d, lam[i], lam[i - 1], eta, noise)
            if callback is not None:
                callback(grid.info(i, x, x0_hat))
        return x


def exponential_integrator_step(
    x: Tensor, d: Tensor, lam_t: Tensor, lam_s: Tensor, eta: float, noise: Noise
) -> Tensor:
    """x_s = (a_s / a_t) e^{-(1+eta) h} x_t + a_s (1 - e^{-(1+eta) h}) D
    + s_s sqrt(1 - e^{-2 eta h}) z, h = (lambda_s - lambda_t) / 2.

    The data-prediction exponential integrator of the reverse SDE whose noise is the fraction
    eta of the reverse SDE's (eta = 0: the PF-ODE, (a_s/a_t) e^{-h} = s_s/s_t; eta = 1: the reverse
    SDE, and with D = x0_hat the step is q(x_s | x_t, x0 = x0_hat), the ancestral step); the
    linear part and the noise are integrated exactly, D stands for x0_hat over the step.
    """
    level_t, level_s = NoiseLevel(lam_t), NoiseLevel(lam_s)
    h = 0.5 * (lam_s - lam_t)
    decay = torch.exp(0.5 * (level_s.log_alpha_bar - level_t.log_alpha_bar) - (1.0 + eta) * h)
    x = decay * x - level_s.a * torch.expm1(-(1.0 + eta) * h) * d
    if eta > 0.0:
        x = x + level_s.s * (-torch.expm1(-2.0 * eta * h)).sqrt() * noise()
    return x


@sampler_dataclass
class DPMSolverPP2MSDE(DPMSolverPP2M):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022): DPM-Solver++(2M)'s multistep x0_hat extrapolation
    D = x0_hat + (x0_hat - x0_prev) h / (2 h_prev) in the exponential integrator of the reverse
    SDE (``exponential_integrator_step``) with the fraction ``eta`` of its noise.

    eta = 0 is ``DPMSolverPP2M`` (the same samples); eta = 1 is the reverse SDE, whose first step
    is the ancestral one. The default eta = 0.5 had the lowest sample KL on the ring's oracle at
    10 to 100 NFE (docs/benchmarks.md). 1 NFE per step: NFE = steps + 1 (True), steps
    ("last_step"), steps (False).
    """

    steps: int = 50
    eta: float = 0.5
    time_grid: str = "log_snr"

    def check(self):
        """eta in [0, 1]."""
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DPM-Solver++(2M) SDE's eta must lie in [0, 1], got {self.eta}")

    @property
    def noise_fraction(self) -> float:
        """eta: the fraction of the reverse SDE's noise injected at each step."""
        return self.eta


def multistep_x0(history: list[tuple[Tensor, Tensor]], lam_s: Tensor, eta: float = 0.0) -> Tensor:
    """D with a_s (1 - e^{-H}) D = a_s int_0^h (1+eta) e^{-(1+eta)(h-u)} p(u) du, H = (1+eta) h:
    the x0_hat of the exponential integrator's step t -> s for p the polynomial through the
    history's x0_hat in u = lambda/2 (degree len(history) - 1 <= 2, Taylor form at t):
    D = m0 + (phi_2(H) D1 - 2 phi_3(H) D2) / (1 - e^{-H}), phi_2(H) = 1 - (1 - e^{-H}) / H,
    phi_3(H) = phi_2(H) / H - 1/2, D1 = h p'(0), D2 = h^2 p''(0) / 2.

    ``history``: (x0_hat, lambda) at t (the step's start) and at up to two earlier grid points,
    newest first. Exact when x0_hat is such a polynomial in lambda (eta = 0: the PF-ODE).
    """
    (m0, lam_t), *earlier = history
    h = 0.5 * (lam_s - lam_t)
    big_h = (1.0 + eta) * h
    if not earlier:
        return m0
    one_minus = -torch.expm1(-big_h)
    phi_2 = 1.0 - one_minus / big_h
    m1, lam_1 = earlier[0]
    r0 = 0.5 * (lam_t - lam_1) / h
    d1_0 = (m0 - m1) / r0
    if len(earlier) == 1:
        return m0 + phi_2 * d1_0 / one_minus
    m2, lam_2 = earlier[1]
    r1 = 0.5 * (lam_1 - lam_2) / h
    d1_1 = (m1 - m2) / r1
    d2 = (d1_0 - d1_1) / (r0 + r1)
    d1 = d1_0 + r0 * d2
    phi_3 = phi_2 / big_h - 0.5
    return m0 + (phi_2 * d1 - 2.0 * phi_3 * d2) / one_minus


@sampler_dataclass
class DPMSolverPP3M(DPMSolverPP2M):
    """DPM-Solver++(3M) (Lu et al. 2022): the exponential integrator of the probability-flow ODE
    with x0_hat extrapolated by the quadratic through the last three steps' x0_hat in lambda
    (``multistep_x0``; the first step is DDIM's, the second uses the line through two).

    Third order (observed 2.7-3.3 on the ring's oracle), yet at 5-10 NFE its extrapolation over
    long steps loses to DPM-Solver++(2M) (docs/benchmarks.md). 1 NFE per step:
    NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    steps: int = 50
    time_grid: str = "log_snr"

    def x0_estimate(self, history, lam_s):
        """The quadratic's D through up to three x0_hat (``multistep_x0``)."""
        return multistep_x0(history, lam_s, self.noise_fraction)


UNIPC_VARIANTS = ("bh1", "bh2")


def unipc_rhos(rks: Tensor, h: Tensor, variant: str) -> tuple[Tensor, Tensor]:
    """UniPC's (rho_1..rho_p, B(h)): R rho = b with R_ik = r_k^(i-1),
    b_i = i! phi_{i+1}(-h) / B(h), phi_1 = expm1(-h)/(-h) - 1 (Zhao et al. 2023, data
    prediction); B(h) = -h (bh1) or expm1(-h) (bh2); rho = 1/2 for p = 1, as in UniPC.

    ``rks``: the points' offsets (u_k - u_t) / h in u = lambda / 2, the last one 1 for the
    corrector's new point.
    """
    hh = -h
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    if len(rks) == 1:
        return torch.full_like(rks, 0.5), b_h
    phi, factorial, rows, b = torch.expm1(hh) / hh - 1.0, 1.0, [], []
    for i in range(1, len(rks) + 1):
        rows.append(rks ** (i - 1))
        b.append(phi * factorial / b_h)
        factorial *= i + 1
        phi = phi / hh - 1.0 / factorial
    return torch.linalg.solve(torch.stack(rows), torch.stack(b)), b_h


def _unipc_sum(rks: list[Tensor], diffs: list[Tensor], h: Tensor, variant: str) -> Tensor | float:
    """B(h) sum_k rho_k D_k with UniPC's rho for the offsets ``rks`` (0 with no D_k)."""
    if not diffs:
        return 0.0
    rhos, b_h = unipc_rhos(torch.stack(rks), h, variant)
    return b_h * sum(r * d for r, d in zip(rhos, diffs, strict=True))


@sampler_dataclass
class UniPC(Sampler):
    """UniPC (Zhao et al. 2023): a multistep predictor (UniP) in the exponential integrator of
    the PF-ODE in x0_hat, and a corrector (UniC) that reuses the next step's evaluation.

    Step t -> s with history m0 = x0_hat at t and the ``order`` - 1 previous x0_hat m_k (at
    offsets r_k = (u_k - u_t) / h, u = lambda / 2, h = u_s - u_t), D_k = (m_k - m0) / r_k:
    UniP: x~_s = (s_s/s_t) x_t - a_s expm1(-h) m0 - a_s B(h) sum_k rho^p_k D_k;
    UniC: with m_s = x0_hat(x~_s), x_s = (s_s/s_t) x_t - a_s expm1(-h) m0
    - a_s B(h) (sum_k rho^c_k D_k + rho^c_s (m_s - m0)) (``unipc_rhos``); m_s is the next step's
    m0, so the corrector costs no NFE and is skipped on the last step (nothing reuses it). The
    callback's x0_hat is m0, evaluated at the predicted x~_t. Order p + 1 with the corrector.
    NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    steps: int = 50
    order: int = 2
    variant: str = "bh2"
    time_grid: str = "log_snr"

    def check(self):
        """order in 1..3, variant bh1 or bh2."""
        if self.order not in (1, 2, 3):
            raise ValueError(f"UniPC's order must be 1, 2 or 3, got {self.order}")
        if self.variant not in UNIPC_VARIANTS:
            raise ValueError(
                f"UniPC's variant must be one of {list(UNIPC_VARIANTS)}, got {self.variant!r}"
            )

    def run(self, model, x, grid, noise, end=0, callback=None):
        """Predict, evaluate at the prediction, correct; the evaluation is the next step's m0."""
        lam, history, m0 = grid.log_snr, [], None
        for i in range(len(lam) - 1, end, -1):
            lam_t, lam_s = lam[i], lam[i - 1]
            if m0 is None:
                m0 = model(x, lam_t).x0_hat
            history = [(m0, lam_t), *history[: self.order - 1]]
            h = 0.5 * (lam_s - lam_t)
            rks = [0.5 * (lam_k - lam_t) / h for _, lam_k in history[1:]]
            diffs = [(m_k - m0) / r for (m_k, _), r in zip(history[1:], rks, strict=True)]
            level_s = NoiseLevel(lam_s)
            base = exponential_integrator_step(x, m0, lam_t, lam_s, 0.0, noise)  # DDIM's step
            x = base - level_s.a * _unipc_sum(rks, diffs, h, self.variant)  # UniP
            used, m0 = m0, None
            if i - 1 > end:  # UniC, with the evaluation the next step uses
                m0 = model(x, lam_s).x0_hat
                terms = [*diffs, m0 - used]
                x = base - level_s.a * _unipc_sum(
                    [*rks, torch.ones_like(h)], terms, h, self.variant
                )
            if callback is not None:
                callback(grid.info(i, x, used))
        return x


# Gauss-Legendre nodes and weights on [-1, 1], exact for degree 2k - 1 with k points
GAUSS_LEGENDRE = {
    1: ((0.0,), (2.0,)),
    2: ((-1 / math.sqrt(3), 1 / math.sqrt(3)), (1.0, 1.0)),
    3: ((-math.sqrt(0.6), 0.0, math.sqrt(0.6)), (5 / 9, 8 / 9, 5 / 9)),
}


def adams_bashforth_weights(nodes: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """w_j = int_start^end l_j(v) dv for the Lagrange basis l_j through ``nodes`` (exact, by
    Gauss-Legendre with as many points as nodes): int P = sum_j w_j P(nodes_j) for any P of
    degree < len(nodes)."""
    k = len(nodes)
    like = {"dtype": nodes.dtype, "device": nodes.device}
    gl, gw = (torch.tensor(values, **like) for values in GAUSS_LEGENDRE[k])
    v = 0.5 * (end - start) * gl + 0.5 * (end + start)
    weights = []
    for j in range(k):
        others = [m for m in range(k) if m != j]
        basis = torch.ones_like(v)
        for m in others:
            basis = basis * (v - nodes[m]) / (nodes[j] - nodes[m])
        weights.append(0.5 * (end - start) * (gw * basis).sum())
    return torch.stack(weights)


@sampler_dataclass
class DEIS(Sampler):
    """DEIS (Zhang & Chen 2022), rhoAB-DEIS: the PF-ODE in x~ = x / a and rho = sigma = s / a,
    dx~/dsigma = eps_hat, solved by Adams-Bashforth in sigma on the last ``order`` steps'
    eps_hat: x~_s = x~_t + sum_j w_j eps_j, w_j = int_{sigma_t}^{sigma_s} l_j(sigma) dsigma
    (``adams_bashforth_weights``; the first steps use the history they have; order 1 is DDIM).

    Exact when eps_hat is a polynomial in sigma of degree < order. 1 NFE per step:
    NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    steps: int = 50
    order: int = 3
    time_grid: str = "log_snr"

    def check(self):
        """order in 1..3."""
        if self.order not in (1, 2, 3):
            raise ValueError(f"DEIS's order must be 1, 2 or 3, got {self.order}")

    def run(self, model, x, grid, noise, end=0, callback=None):
        """Adams-Bashforth in sigma on x~ = x / a, with eps_hat of up to ``order`` steps."""
        lam, history = grid.log_snr, []
        for i in range(len(lam) - 1, end, -1):
            level_t, level_s = NoiseLevel(lam[i]), NoiseLevel(lam[i - 1])
            out = model(x, lam[i])
            history = [(out.eps_hat, level_t.sigma), *history[: self.order - 1]]
            nodes = torch.stack([sigma for _, sigma in history])
            w = adams_bashforth_weights(nodes, level_t.sigma, level_s.sigma)
            x_tilde = x / level_t.a + sum(
                w_j * eps for w_j, (eps, _) in zip(w, history, strict=True)
            )
            x = level_s.a * x_tilde
            if callback is not None:
                callback(grid.info(i, x, out.x0_hat))
        return x


@sampler_dataclass
class EDMStochastic(Sampler):
    """Karras et al.'s stochastic sampler (EDM, Algorithm 2): at each grid point in
    [sigma_tmin, sigma_tmax], raise the noise to sigma_hat = (1 + gamma) sigma with
    x~ += sqrt(sigma_hat^2 - sigma^2) noise_scale z, gamma = min(churn / steps, sqrt(2) - 1), then
    take Heun's step of dx~/dsigma = eps_hat from sigma_hat to the next point.

    In the VE variable x~ = x / a, sigma = s / a = exp(-lambda / 2) (the ``ProbabilityFlowODE``
    Heun step; ``churn`` = 0 is that sampler, the same samples); sigma_tmin, sigma_tmax are in
    sigma, as in EDM (S_tmin, S_tmax), and ``churn``, ``noise_scale`` are S_churn, S_noise.
    NFE as Heun's: 2 per step; with ``final_denoise="last_step"`` the last interval is the jump
    to x0_hat, so NFE = 2 steps - 1; True adds one NFE at t_0.
    """

    steps: int = 50
    churn: float = 0.0
    sigma_tmin: float = 0.05
    sigma_tmax: float = 50.0
    noise_scale: float = 1.0
    time_grid: str = "karras"

    def check(self):
        """churn >= 0, noise_scale > 0, 0 <= sigma_tmin <= sigma_tmax."""
        if not (self.churn >= 0 and self.noise_scale > 0):
            raise ValueError(
                f"EDM's churn must be >= 0 and noise_scale > 0, got {self.churn} and "
                f"{self.noise_scale}"
            )
        if not 0 <= self.sigma_tmin <= self.sigma_tmax:
            raise ValueError(
                f"EDM's sigma_tmin and sigma_tmax must satisfy 0 <= sigma_tmin <= sigma_tmax, "
                f"got {self.sigma_tmin} and {self.sigma_tmax}"
            )

    def gamma(self, sigma: Tensor) -> float:
        """min(churn / steps, sqrt(2) - 1) where sigma_tmin <= sigma <= sigma_tmax, else 0."""
        if not self.sigma_tmin <= float(sigma) <= self.sigma_tmax:
            return 0.0
        return min(self.churn / int(self.steps), math.sqrt(2.0) - 1.0)

    def step(self, model, x, grid, i, noise):
        """Churn at sigma_t, then x~_s = x~_hat + (sigma_s - sigma_hat) (d + d') / 2."""
        level_t, level_s = NoiseLevel(grid.log_snr[i]), NoiseLevel(grid.log_snr[i - 1])
        x_tilde, lam_hat, sigma_hat = x / level_t.a, grid.log_snr[i], level_t.sigma
        gamma = self.gamma(level_t.sigma)
        if gamma > 0.0:
            sigma_hat = level_t.sigma * (1.0 + gamma)
            lam_hat = -2.0 * torch.log(sigma_hat)
            churn = (sigma_hat**2 - level_t.sigma**2).sqrt() * self.noise_scale
            x_tilde = x_tilde + churn * noise()
        out = model(NoiseLevel(lam_hat).a * x_tilde, lam_hat)
        x_next = x_tilde + (level_s.sigma - sigma_hat) * out.eps_hat
        d_next = model(level_s.a * x_next, grid.log_snr[i - 1]).eps_hat
        x_next = x_tilde + (level_s.sigma - sigma_hat) * 0.5 * (out.eps_hat + d_next)
        return level_s.a * x_next, out.x0_hat


@sampler_dataclass
class AnnealedLangevin(Sampler):
    """NCSN's annealed Langevin dynamics, x <- x + eta score + sqrt(2 eta) z, at each level.

    Run in the VP variable x_t with the score of q(x_t), eta = step_scale s_t^2. This is NCSN's
    rule exactly: in the unscaled x~ = x / a with noise sigma = s / a, eta~ = step_scale sigma^2
    and grad_x~ = a grad_x give x <- x + a^2 eta~ score + a sqrt(2 eta~) z, a^2 eta~ = eta.
    The levels are the grid's t_{steps-1}, ..., t_end, high noise to low (x_1 ~ N(0, I) already
    has the t_steps marginal), ``steps_per_level`` updates each.
    NFE = steps_per_level (steps - end) + (1 if final_denoise else 0).

    ``levels`` and ``steps`` are one number, the grid's steps: ``steps`` (when given) overrides
    ``levels``, and setting either later sets both.
    """

    steps_per_level: int = 10
    levels: int = 100
    step_scale: float = 0.1
    time_grid: str = "log_snr"
    steps: int | None = field(default=None, metadata=_HIDDEN)  # None: ``levels``

    def check(self):
        """A positive step scale and at least one update per level."""
        if not self.step_scale > 0 or int(self.steps_per_level) < 1:
            raise ValueError(
                f"Langevin needs step_scale > 0 and steps_per_level >= 1, got "
                f"{self.step_scale} and {self.steps_per_level}"
            )

    def __setattr__(self, name: str, value) -> None:
        """``steps`` and ``levels`` are set together; ``steps=None`` changes neither."""
        if name in ("steps", "levels"):
            if value is None:
                return
            object.__setattr__(self, "steps", value)
            name = "levels"
        object.__setattr__(self, name, value)

    def step(self, model, x, grid, i, noise):
        """``steps_per_level`` Langevin updates at lambda(t_{i-1}), eta = step_scale s^2."""
        lam = grid.log_snr[i - 1]
        eta = self.step_scale * NoiseLevel(lam).s2
        for _ in range(self.steps_per_level):
            x = langevin_step(x, model(x, lam).score, eta, noise())
        return x, None


PREDICTORS = {"ancestral": Ancestral, "ddim": DDIM, "sde": ReverseSDE}
STEP_SIZES = ("batch",)


@sampler_dataclass
class PredictorCorrector(Sampler):
    """Song et al.'s predictor-corrector: a predictor step t_i -> t_{i-1}, then Langevin steps.

    The corrector runs ``corrector_steps`` updates x <- x + eps score + sqrt(2 eps) z at
    lambda(t_{i-1}) with the signal-to-noise step size eps = 2 (snr ||z|| / ||score||)^2, the
    norms averaged over the batch first (``step_size="batch"``, as in Song et al.'s code).
    ``step_size="per_example"`` is refused: each example's ||z||^2 / ||score||^2 is a ratio of
    two chi^2_d draws, unbounded where the score vanishes (a mode's centre), which scatters
    samples off the modes in low dimension (KL 1.5-2 nats on the ring even at 99 NFE).
    The predictor's DDIM is eta = 0. NFE = (steps - end) (1 + corrector_steps) + final denoise.
    """

    predictor: str = "ancestral"
    steps: int = 500
    corrector_steps: int = 1
    snr: float = 0.1
    step_size: str = "batch"

    def check(self):
        """A known predictor and step size."""
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.predictor!r}; valid: {list(PREDICTORS)}")
        if self.step_size == "per_example":
            raise ValueError(
                "step_size='per_example' is refused: each example's ratio ||z||^2 / ||score||^2 "
                "is unbounded where the score vanishes, which scatters samples off the modes "
                "(KL 1.5-2 nats on the ring at 99 NFE); use step_size=batch"
            )
        if self.step_size not in STEP_SIZES:
            raise ValueError(f"unknown step_size {self.step_size!r}; valid: {list(STEP_SIZES)}")
        if int(self.corrector_steps) < 0 or not self.snr > 0:
            raise ValueError(
                f"the corrector needs corrector_steps >= 0 and snr > 0, got "
                f"{self.corrector_steps} and {self.snr}"
            )

    @cached_property
    def predictor_sampler(self) -> Sampler:
        """The sampler whose ``step`` predicts (its own steps unused)."""
        return PREDICTORS[self.predictor](steps=1)

    def step(self, model, x, grid, i, noise):
        """The predictor's step to t_{i-1}, then ``corrector_steps`` Langevin updates there."""
        x, x0_hat = self.predictor_sampler.step(model, x, grid, i, noise)
        lam = grid.log_snr[i - 1]
        for _ in range(self.corrector_steps):
            score, z = model(x, lam).score, noise()
            x = langevin_step(x, score, self.corrector_step_size(score, z), z)
        return x, x0_hat

    def corrector_step_size(self, score: Tensor, z: Tensor) -> Tensor:
        """eps = 2 (snr mean||z|| / mean||score||)^2 over the batch, as [n, 1, ...]."""
        z_norm = z.reshape(z.shape[0], -1).norm(dim=1)
        score_norm = score.reshape(score.shape[0], -1).norm(dim=1)
        z_norm, score_norm = z_norm.mean().expand_as(z_norm), score_norm.mean()
        eps = 2.0 * (self.snr * z_norm / score_norm.clamp_min(torch.finfo(z.dtype).tiny)) ** 2
        return eps.reshape(-1, *([1] * (z.dim() - 1)))
