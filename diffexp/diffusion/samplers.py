"""Samplers that consume a Denoiser (MATH.md section 6).

Every sampler walks a time grid t_0 = 0 < ... < t_steps = 1 from x_1 ~ N(0, I) towards t_0. The
end is set by ``final_denoise``:
- ``True``: step down to t_0, then return x0_hat(x_{t_0}) (one more NFE; DDPM's decoder mean);
- ``"last_step"``: the last interval t_1 -> t_0 is the jump to zero noise, x0_hat(x_{t_1}), which is
  what DDIM's and Euler's step gives at sigma = 0 (Karras et al.'s last step, DDPM's noiseless
  last step); it spends no extra NFE and denoises where the grid's last step starts;
- ``False``: return x_{t_0} as it is.
All of them run in the variance-preserving variable x_t = a_t x0 + s_t eps
(a_t^2 = sigmoid(lambda), s_t^2 = sigmoid(-lambda)). Each returns the samples and its number of
network evaluations (NFE): every call of the denoiser it was given counts once, so a guidance
wrapper that calls its network twice per call still counts one.

- ``Ancestral``: x_s ~ q(x_s | x_t, x0 = x0_hat).
- ``DDIM``: x_s = a_s x0_hat + sqrt(s_s^2 - c^2) eps_hat + c z (eta = 1: ancestral; 0: an ODE).
- ``FlowEuler``: Euler on the rectified-flow ODE in z = x_t / (a + s) (equals DDIM with eta = 0).
- ``ReverseSDE``: Euler-Maruyama in t on dx = (f x - g^2 score) dt + g dw.
- ``ProbabilityFlowODE``: dx = (f x - 1/2 g^2 score) dt, fixed-step Heun/Euler (Karras) or
  any torchdiffeq solver.
- ``AnnealedLangevin``: NCSN's Langevin dynamics at decreasing noise levels.
- ``PredictorCorrector``: any predictor step, then Langevin corrector steps (Song et al.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffexp.diffusion.denoiser import Denoiser, DenoiserOutput
from diffexp.diffusion.elbo import posterior
from diffexp.diffusion.schedules import Schedule

TIME_GRIDS = ("uniform", "log_snr", "karras")
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


@dataclass
class Grid:
    """A sampler's time grid: t_i, lambda(t_i), and d lambda/dt at t_i (i = 0..steps)."""

    t: Tensor
    log_snr: Tensor
    dlog_snr: Tensor

    @classmethod
    def build(cls, schedule: Schedule, steps: int, kind: str, **like) -> Grid:
        """The grid of ``time_grid`` with lambda and its derivative from the schedule."""
        t = time_grid(schedule, steps, kind, **like)
        lam, dlam = schedule.log_snr_and_derivative(t)
        return cls(t=t, log_snr=lam.to(t.dtype), dlog_snr=dlam.to(t.dtype))


class NFECounter:
    """den(x, y=y, log_snr=lambda), counting every call: the number of function evaluations."""

    def __init__(self, denoiser: Denoiser, y: Tensor | None = None) -> None:
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


def a_and_s2(log_snr: Tensor) -> tuple[Tensor, Tensor]:
    """(a, s^2) = (sqrt(sigmoid(lambda)), sigmoid(-lambda))."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr)


def pf_ode_drift_log_snr(out: DenoiserOutput, x: Tensor) -> Tensor:
    """dx/dlambda = 1/2 (s^2 x - s eps_hat) = (f x - 1/2 g^2 score) / lambda'(t), the PF-ODE."""
    s2 = torch.sigmoid(-out.log_snr)
    return 0.5 * (s2 * x - s2.sqrt() * out.eps_hat)


def langevin_step(x: Tensor, score: Tensor, eta: Tensor, z: Tensor) -> Tensor:
    """x + eta score + sqrt(2 eta) z (eta broadcastable against x)."""
    return x + eta * score + (2.0 * eta).sqrt() * z


FINAL_DENOISE = (True, False, "last_step")


def _check_final(final_denoise: bool | str) -> bool | str:
    if isinstance(final_denoise, bool) or final_denoise == "last_step":
        return final_denoise
    raise ValueError(f"final_denoise must be one of {list(FINAL_DENOISE)}, got {final_denoise!r}")


def _check_grid(kind: str) -> str:
    if kind not in TIME_GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; valid: {list(TIME_GRIDS)}")
    return kind


class Sampler:
    """Base class: walks the grid from t_steps = 1 down with ``step``, then denoises.

    A subclass implements ``step(model, x, grid, i, noise)``, x_{t_i} -> x_{t_{i-1}}, calling the
    denoiser only through ``model`` (an ``NFECounter``) and drawing noise only from ``noise``;
    ``run`` chains the steps from t_steps down to t_end (end = 1 for ``"last_step"``, else 0).
    """

    steps: int = 1000
    grid: str = "uniform"
    final_denoise: bool | str = True

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        shape: tuple[int, ...],
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> SampleOutput:
        """Draw x_1 ~ N(0, I), run the chain to t_end, return x0_hat(x_{t_end}) and the NFE."""
        like = {"device": device, "dtype": dtype}
        model, noise = NFECounter(denoiser, y), Noise(shape, generator, **like)
        grid = Grid.build(denoiser.schedule, int(self.steps), self.grid, **like)
        end = 1 if self.final_denoise == "last_step" else 0
        x = self.run(model, noise(), grid, noise, end)
        if self.final_denoise:
            x = model(x, grid.log_snr[end]).x0_hat
        return SampleOutput(x=x, nfe=model.nfe)

    def run(self, model: NFECounter, x: Tensor, grid: Grid, noise: Noise, end: int = 0) -> Tensor:
        """x_{t_end} from x_{t_steps}: ``step`` for i = steps..end+1."""
        for i in range(len(grid.t) - 1, end, -1):
            x = self.step(model, x, grid, i, noise)
        return x

    def step(self, model: NFECounter, x: Tensor, grid: Grid, i: int, noise: Noise) -> Tensor:
        """x_{t_{i-1}} from x_{t_i}."""
        raise NotImplementedError

    def settings(self) -> dict:
        """The settings ``__repr__`` lists."""
        return {"steps": self.steps, "time_grid": self.grid, "final_denoise": self.final_denoise}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class Ancestral(Sampler):
    """DDPM's ancestral sampler: x_s ~ q(x_s | x_t, x0 = x0_hat(x_t)) down a time grid.

    The chain starts at x_1 ~ N(0, I); with ``final_denoise`` the last step returns
    x0_hat(x_{t0}), the decoder's mean, instead of the noisy x_{t0} (one more NFE).
    NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    def __init__(
        self, steps: int = 1000, time_grid: str = "uniform", final_denoise: bool | str = True
    ):
        self.steps, self.grid = int(steps), _check_grid(time_grid)
        self.final_denoise = _check_final(final_denoise)

    def step(self, model, x, grid, i, noise):
        """x_s = mu_q(x_t, x0_hat) + sigma_q z (MATH.md section 2)."""
        x0_hat = model(x, grid.log_snr[i]).x0_hat
        mean, var = posterior(x, x0_hat, grid.log_snr[i - 1], grid.log_snr[i])
        return mean + var.sqrt() * noise()


class DDIM(Sampler):
    """DDIM: x_s = a_s x0_hat + sqrt(s_s^2 - c^2) eps_hat + c z, c^2 = eta^2 sigma_q^2.

    c = eta (s_s / s_t) sqrt(1 - a_t^2 / a_s^2): eta = 1 is the ancestral sampler (same draws,
    same samples); eta = 0 draws no noise after x_1 (deterministic: Euler on the PF-ODE in
    sigma = s/a). NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    def __init__(
        self,
        steps: int = 100,
        eta: float = 0.0,
        time_grid: str = "uniform",
        final_denoise: bool | str = True,
    ):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM's eta must lie in [0, 1], got {eta}")
        self.steps, self.eta, self.grid = int(steps), float(eta), _check_grid(time_grid)
        self.final_denoise = _check_final(final_denoise)

    def step(self, model, x, grid, i, noise):
        """x_s = a_s x0_hat + sqrt(s_s^2 - c^2) eps_hat + c z."""
        out = model(x, grid.log_snr[i])
        lam_s, lam_t = grid.log_snr[i - 1], grid.log_snr[i]
        a_s, s_s2 = a_and_s2(lam_s)
        if self.eta == 0.0:
            return a_s * out.x0_hat + s_s2.sqrt() * out.eps_hat
        _, c2 = posterior(x, out.x0_hat, lam_s, lam_t)  # sigma_q^2 = s_s^2/s_t^2 (1 - a_t^2/a_s^2)
        c2 = self.eta**2 * c2
        eps_coef = (s_s2 - c2).clamp_min(0.0).sqrt()
        return a_s * out.x0_hat + eps_coef * out.eps_hat + c2.sqrt() * noise()

    def settings(self):
        return {"steps": self.steps, "eta": self.eta, **_tail(super().settings())}


class FlowEuler(Sampler):
    """Euler on the rectified-flow ODE dz/dt_rf = u, z = x_t / (a + s), t_rf = s / (a + s):
    z' = z + (t_rf' - t_rf) u_hat, u_hat = eps_hat - x0_hat (any Denoiser, not only flow ones).

    In x it is x_s = a_s x0_hat + s_s eps_hat: DDIM with eta = 0 on the same grid (MATH.md
    section 9). NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    def __init__(
        self, steps: int = 100, time_grid: str = "uniform", final_denoise: bool | str = True
    ):
        self.steps, self.grid = int(steps), _check_grid(time_grid)
        self.final_denoise = _check_final(final_denoise)

    def step(self, model, x, grid, i, noise):
        """z_s = z_t + (t_s - t_t) u_hat in the rectified-flow variable, back to x_s."""
        out = model(x, grid.log_snr[i])
        (a_t, s_t), (a_s, s_s) = (a_and_s2(grid.log_snr[j]) for j in (i, i - 1))
        s_t, s_s = s_t.sqrt(), s_s.sqrt()
        t_rf, s_rf = s_t / (a_t + s_t), s_s / (a_s + s_s)
        z = x / (a_t + s_t) + (s_rf - t_rf) * (out.eps_hat - out.x0_hat)
        return (a_s + s_s) * z


class ReverseSDE(Sampler):
    """Euler-Maruyama on the reverse SDE dx = (f x - g^2 score) dt + g dw, t from 1 to 0.

    Variance preserving: f = 1/2 d log a_t^2/dt = 1/2 s_t^2 lambda'(t) and
    g^2 = -d log a_t^2/dt = -s_t^2 lambda'(t), both evaluated at the start t of each step; the
    schedule's shape matters here (it sets how the grid's steps fall in lambda).
    NFE = steps + 1 (True), steps ("last_step"), steps (False).
    """

    def __init__(
        self, steps: int = 1000, time_grid: str = "log_snr", final_denoise: bool | str = True
    ):
        self.steps, self.grid = int(steps), _check_grid(time_grid)
        self.final_denoise = _check_final(final_denoise)

    def step(self, model, x, grid, i, noise):
        """x_s = x_t - h (f x_t - g^2 score) + g sqrt(h) z, h = t - s > 0."""
        lam, dlam = grid.log_snr[i], grid.dlog_snr[i]
        h = grid.t[i] - grid.t[i - 1]
        s2 = torch.sigmoid(-lam)
        f, g2 = 0.5 * s2 * dlam, -s2 * dlam
        score = model(x, lam).score
        return x - h * (f * x - g2 * score) + (g2 * h).sqrt() * noise()


FIXED_STEP_SOLVERS = ("heun", "euler", "dpmpp_2m")
TORCHDIFFEQ_FIXED_GRID = ("midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams")


class ProbabilityFlowODE(Sampler):
    """The probability-flow ODE dx = (f x - 1/2 g^2 score) dt from t = 1 to t = 0.

    Fixed steps on the grid (``"heun"``, ``"euler"``, ``"dpmpp_2m"``) integrate Karras et al.'s
    form of the same ODE: with x~ = x / a and sigma = s / a = exp(-lambda/2) it reads
    dx~/dsigma = eps_hat, whose Euler step is DDIM (eta = 0), exact where eps_hat is constant.
    - heun: 2 NFE per step (Karras's Algorithm 1); with ``final_denoise="last_step"`` the last
      interval is Karras's Euler step to sigma = 0, so NFE = 2 steps - 1, as in Karras.
    - euler: 1 NFE per step (= DDIM, eta = 0).
    - dpmpp_2m: Lu et al.'s DPM-Solver++(2M), the exponential integrator in x0_hat with a
      second-order multistep correction from the previous step's x0_hat; 1 NFE per step.
    With ``final_denoise=True`` one more NFE denoises at t_0.

    Any torchdiffeq method integrates the VP variable over lambda instead,
    dx/dlambda = 1/2 (s^2 x - s eps_hat) (= dx/dt / lambda'(t)): O(1) in scale and non-stiff at
    both ends, and the schedule enters only through its endpoints. Adaptive methods (dopri5,
    bosh3, adaptive_heun, ...) go from lambda(1) to lambda(t_end) with ``rtol``/``atol`` and use
    no other grid point; fixed-grid ones (rk4, midpoint, ...) step on the grid. The NFE is
    counted in the drift function.
    """

    def __init__(
        self,
        steps: int = 50,
        solver: str = "heun",
        rtol: float = 1e-4,
        atol: float = 1e-4,
        time_grid: str = "karras",
        final_denoise: bool | str = True,
    ):
        self.steps, self.solver, self.grid = int(steps), str(solver), _check_grid(time_grid)
        self.rtol, self.atol = float(rtol), float(atol)
        self.final_denoise = _check_final(final_denoise)

    @property
    def adaptive(self) -> bool:
        """Whether the solver chooses its own steps (torchdiffeq's adaptive methods)."""
        return self.solver not in (*FIXED_STEP_SOLVERS, *TORCHDIFFEQ_FIXED_GRID)

    def run(self, model, x, grid, noise, end=0):
        """Fixed steps in (x~, sigma) down the grid, or torchdiffeq over lambda."""
        if self.solver == "dpmpp_2m":
            return self._dpmpp_2m(model, x, grid, end)
        if self.solver in FIXED_STEP_SOLVERS:
            return super().run(model, x, grid, noise, end)
        from torchdiffeq import odeint

        def drift(lam: Tensor, x: Tensor) -> Tensor:
            return pf_ode_drift_log_snr(model(x, lam), x)

        lam = grid.log_snr[end:].flip(0)
        if self.adaptive:
            return odeint(
                drift, x, lam[[0, -1]], rtol=self.rtol, atol=self.atol, method=self.solver
            )[-1]
        return odeint(drift, x, lam, method=self.solver)[-1]

    def step(self, model, x, grid, i, noise):
        """x_s = a_s (x_t / a_t + (sigma_s - sigma_t) d), d = eps_hat or Heun's average."""
        lam_t, lam_s = grid.log_snr[i], grid.log_snr[i - 1]
        a_ratio = torch.exp(0.5 * (F.logsigmoid(lam_s) - F.logsigmoid(lam_t)))  # a_s / a_t
        a_sigma = torch.sigmoid(lam_s).sqrt() * (torch.exp(-0.5 * lam_s) - torch.exp(-0.5 * lam_t))
        d = model(x, lam_t).eps_hat
        x_s = a_ratio * x + a_sigma * d
        if self.solver == "euler":
            return x_s
        return a_ratio * x + a_sigma * 0.5 * (d + model(x_s, lam_s).eps_hat)

    def _dpmpp_2m(self, model, x, grid, end):
        """x_s = (s_s/s_t) x_t - a_s expm1(-h) D, D = x0_hat + (x0_hat - x0_prev) h / (2 h_prev)."""
        lam, prev = grid.log_snr, None
        for i in range(len(lam) - 1, end, -1):
            lam_t, lam_s = lam[i], lam[i - 1]
            x0_hat, h = model(x, lam_t).x0_hat, 0.5 * (lam_s - lam_t)
            d = x0_hat if prev is None else x0_hat + (x0_hat - prev[0]) * (h / (2 * prev[1]))
            s_ratio = torch.exp(0.5 * (F.logsigmoid(-lam_s) - F.logsigmoid(-lam_t)))
            x = s_ratio * x - torch.sigmoid(lam_s).sqrt() * torch.expm1(-h) * d
            prev = (x0_hat, h)
        return x

    def settings(self):
        s = {"steps": self.steps, "solver": self.solver}
        if self.adaptive:
            s.update(rtol=self.rtol, atol=self.atol)
        return {**s, **_tail(super().settings())}


class AnnealedLangevin(Sampler):
    """NCSN's annealed Langevin dynamics, x <- x + eta score + sqrt(2 eta) z, at each level.

    Run in the VP variable x_t with the score of q(x_t), eta = step_scale s_t^2. This is NCSN's
    rule exactly: in the unscaled x~ = x / a with noise sigma = s / a, eta~ = step_scale sigma^2
    and grad_x~ = a grad_x give x <- x + a^2 eta~ score + a sqrt(2 eta~) z, a^2 eta~ = eta.
    The levels are the grid's t_{steps-1}, ..., t_end, high noise to low (x_1 ~ N(0, I) already
    has the t_steps marginal), ``steps_per_level`` updates each.
    NFE = steps_per_level (steps - end) + (1 if final_denoise else 0).
    """

    def __init__(
        self,
        steps_per_level: int = 10,
        levels: int = 100,
        step_scale: float = 0.1,
        time_grid: str = "log_snr",
        final_denoise: bool | str = True,
        steps: int | None = None,
    ):
        self.steps = int(levels if steps is None else steps)  # ``steps`` overrides ``levels``
        self.steps_per_level, self.step_scale = int(steps_per_level), float(step_scale)
        self.grid, self.final_denoise = _check_grid(time_grid), _check_final(final_denoise)

    @property
    def levels(self) -> int:
        """The number of grid steps (= ``steps``); one noise level below each."""
        return self.steps

    def step(self, model, x, grid, i, noise):
        """``steps_per_level`` Langevin updates at lambda(t_{i-1}), eta = step_scale s^2."""
        lam = grid.log_snr[i - 1]
        eta = self.step_scale * torch.sigmoid(-lam)
        for _ in range(self.steps_per_level):
            x = langevin_step(x, model(x, lam).score, eta, noise())
        return x

    def settings(self):
        return {
            "steps_per_level": self.steps_per_level,
            "levels": self.steps,
            "step_scale": self.step_scale,
            **_tail(super().settings()),
        }


PREDICTORS = {"ancestral": Ancestral, "ddim": DDIM, "sde": ReverseSDE}
STEP_SIZES = ("batch", "per_example")


class PredictorCorrector(Sampler):
    """Song et al.'s predictor-corrector: a predictor step t_i -> t_{i-1}, then Langevin steps.

    The corrector runs ``corrector_steps`` updates x <- x + eps score + sqrt(2 eps) z at
    lambda(t_{i-1}) with the signal-to-noise step size eps = 2 (snr ||z|| / ||score||)^2. With
    ``step_size="per_example"`` the norms are each example's; with ``"batch"`` (the default, as
    in Song et al.'s code) they are averaged over the batch first. Per example is heavy-tailed
    in low dimension: ||z||^2 / ||score||^2 is a ratio of two chi^2_d draws, unbounded where the
    score vanishes (a mode's centre), which scatters a few samples off the modes in 2-D.
    The predictor's DDIM is eta = 0. NFE = (steps - end) (1 + corrector_steps) + final denoise.
    """

    def __init__(
        self,
        predictor: str = "ancestral",
        steps: int = 500,
        corrector_steps: int = 1,
        snr: float = 0.1,
        time_grid: str = "uniform",
        final_denoise: bool | str = True,
        step_size: str = "batch",
    ):
        if predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {predictor!r}; valid: {list(PREDICTORS)}")
        if step_size not in STEP_SIZES:
            raise ValueError(f"unknown step_size {step_size!r}; valid: {list(STEP_SIZES)}")
        self.predictor, self.predictor_name = PREDICTORS[predictor](steps=1), predictor
        self.steps, self.corrector_steps, self.snr = int(steps), int(corrector_steps), float(snr)
        self.grid, self.final_denoise = _check_grid(time_grid), _check_final(final_denoise)
        self.step_size = step_size

    def step(self, model, x, grid, i, noise):
        """The predictor's step to t_{i-1}, then ``corrector_steps`` Langevin updates there."""
        x = self.predictor.step(model, x, grid, i, noise)
        lam = grid.log_snr[i - 1]
        for _ in range(self.corrector_steps):
            score, z = model(x, lam).score, noise()
            x = langevin_step(x, score, self.corrector_step_size(score, z), z)
        return x

    def corrector_step_size(self, score: Tensor, z: Tensor) -> Tensor:
        """eps = 2 (snr ||z|| / ||score||)^2, per example ([n, 1, ...]) or one for the batch."""
        z_norm = z.reshape(z.shape[0], -1).norm(dim=1)
        score_norm = score.reshape(score.shape[0], -1).norm(dim=1)
        if self.step_size == "batch":
            z_norm, score_norm = z_norm.mean().expand_as(z_norm), score_norm.mean()
        eps = 2.0 * (self.snr * z_norm / score_norm.clamp_min(torch.finfo(z.dtype).tiny)) ** 2
        return eps.reshape(-1, *([1] * (z.dim() - 1)))

    def settings(self):
        s = {"predictor": self.predictor_name, "steps": self.steps}
        s.update(corrector_steps=self.corrector_steps, snr=self.snr, step_size=self.step_size)
        return {**s, **_tail(super().settings())}


def _tail(settings: dict) -> dict:
    """The base settings without ``steps`` (placed first by each subclass)."""
    return {k: v for k, v in settings.items() if k != "steps"}
