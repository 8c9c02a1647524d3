"""Samplers against the Gaussian-mixture oracle: enough steps reproduce the mixture."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion import schedules as S
from diffexp.diffusion.samplers import (
    DDIM,
    DEIS,
    FIXED_STEP_SOLVERS,
    Ancestral,
    AnnealedLangevin,
    DPMSolverPP2M,
    DPMSolverPP2MSDE,
    DPMSolverPP3M,
    EDMStochastic,
    FlowEuler,
    Grid,
    PredictorCorrector,
    ProbabilityFlowODE,
    ReverseSDE,
    Sampler,
    StepInfo,
    UniPC,
    time_grid,
)
from diffexp.metrics.sliced_wasserstein import sliced_wasserstein
from tests.helpers import CONF, ENDS, conf_option, conf_options, oracle_denoiser

N = 4000
LAST = "last_step"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ring():
    """Held-out ring data: two sets of N for the noise floor, the data's mean log-density."""
    mixture = make_mixture("ring8")
    ref, ref2 = (mixture.sample(N, generator=_gen(s))[0] for s in (1, 2))
    big = mixture.sample(200_000, generator=_gen(3))[0]
    return {
        "mixture": mixture,
        "ref": ref,
        "floor": sliced_wasserstein(ref2, ref, n_projections=512),
        "data_log_density": mixture.log_prob(big).mean().item(),
    }


@pytest.fixture(scope="module")
def den():
    return oracle_denoiser("ring8", "eps", S.LogLinear(**ENDS)).float()


class CountingDenoiser(nn.Module):
    """Delegates to a denoiser and counts its forward calls."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.calls = denoiser, 0

    @property
    def schedule(self):
        return self.denoiser.schedule

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.denoiser(*args, **kwargs)


@pytest.mark.parametrize("param", ["eps", "x0"])
def test_ancestral_sampler_with_the_oracle_reproduces_the_mixture(param):
    den = oracle_denoiser("ring8", param, S.Cosine(**ENDS)).float()
    mixture = make_mixture("ring8")
    n = 4000
    result = Ancestral(steps=500).sample(den, (n, 2), generator=torch.Generator().manual_seed(0))
    assert result.nfe == 501
    ref, ref2 = (mixture.sample(n, generator=torch.Generator().manual_seed(s))[0] for s in (1, 2))
    distance = sliced_wasserstein(result.x, ref, n_projections=512)
    floor = sliced_wasserstein(ref2, ref, n_projections=512)
    assert distance < 1.5 * floor, (distance, floor)
    # and the samples sit on the modes as sharply as the data does
    gap = mixture.log_prob(result.x).mean() - mixture.log_prob(ref).mean()
    assert abs(gap.item()) < 0.1, gap


def test_ancestral_sampler_with_too_few_steps_is_measurably_worse():
    den = oracle_denoiser("ring8", "eps", S.Cosine(**ENDS)).float()
    mixture = make_mixture("ring8")
    n = 4000
    ref = mixture.sample(n, generator=torch.Generator().manual_seed(1))[0]
    gen = torch.Generator().manual_seed(0)
    coarse = Ancestral(steps=2, final_denoise=False).sample(den, (n, 2), generator=gen).x
    fine = Ancestral(steps=500).sample(den, (n, 2), generator=gen).x
    assert sliced_wasserstein(coarse, ref) > 2 * sliced_wasserstein(fine, ref)


# every sampler at enough steps (NFE in the comment)
PC = {"corrector_steps": 1, "snr": 0.16, "time_grid": "log_snr", "final_denoise": LAST}
CONVERGED = {
    "ddim-eta0": DDIM(steps=500, eta=0.0, time_grid="log_snr", final_denoise=LAST),  # 500
    "sde": ReverseSDE(steps=500, time_grid="log_snr", final_denoise=LAST),  # 500
    "ode-heun": ProbabilityFlowODE(
        steps=50, solver="heun", time_grid="karras", final_denoise=LAST
    ),  # 99
    "dpmpp_2m": DPMSolverPP2M(steps=100, time_grid="log_snr", final_denoise=LAST),  # 100
    "dpmpp_2m_sde": DPMSolverPP2MSDE(steps=100, time_grid="log_snr", final_denoise=LAST),  # 100
    "dpmpp_3m": DPMSolverPP3M(steps=100, time_grid="log_snr", final_denoise=LAST),  # 100
    "unipc": UniPC(steps=100, final_denoise=LAST),  # 100
    "deis": DEIS(steps=100, final_denoise=LAST),  # 100
    "edm-churn": EDMStochastic(steps=50, churn=10.0, final_denoise=LAST),  # 99
    "ode-dopri5": ProbabilityFlowODE(solver="dopri5", rtol=1e-4, atol=1e-4),  # ~75
    "ode-rk4": ProbabilityFlowODE(
        steps=20, solver="rk4", time_grid="log_snr", final_denoise=LAST
    ),  # 77
    "langevin": AnnealedLangevin(
        steps_per_level=10, levels=100, step_scale=0.5, time_grid="log_snr", final_denoise=LAST
    ),  # 991
    "pc-ancestral": PredictorCorrector(predictor="ancestral", steps=500, **PC),  # 999
    "pc-ddim": PredictorCorrector(predictor="ddim", steps=200, **PC),  # 399
    "pc-sde": PredictorCorrector(predictor="sde", steps=200, **PC),  # 399
}


@pytest.mark.parametrize("name", list(CONVERGED))
def test_every_sampler_with_enough_steps_reproduces_the_ring(name, den, ring):
    result = CONVERGED[name].sample(den, (N, 2), generator=_gen(0))
    distance = sliced_wasserstein(result.x, ring["ref"], n_projections=512)
    assert distance < 1.5 * ring["floor"], (distance, ring["floor"])
    gap = ring["mixture"].log_prob(result.x).mean().item() - ring["data_log_density"]
    assert abs(gap) < 0.05, gap


@pytest.mark.parametrize("param,schedule", [("flow", "rectified_flow"), ("eps", "cosine")])
@pytest.mark.parametrize("grid", ["uniform", "log_snr", "karras"])
def test_euler_on_the_flow_ode_is_ddim_with_eta_0(param, schedule, grid):
    """z' = z + (t' - t) u_hat in z = x_t / (a + s) is x_s = a_s x0_hat + s_s eps_hat (MATH 9)."""
    den = oracle_denoiser("ring8", param, conf_option("schedule", schedule, **ENDS).double())
    f64 = torch.float64
    for final in (True, LAST):
        a = FlowEuler(steps=12, time_grid=grid, final_denoise=final)
        a = a.sample(den, (500, 2), generator=_gen(3), dtype=f64)
        b = DDIM(steps=12, eta=0.0, time_grid=grid, final_denoise=final)
        b = b.sample(den, (500, 2), generator=_gen(3), dtype=f64)
        assert a.nfe == b.nfe
        torch.testing.assert_close(a.x, b.x, rtol=1e-10, atol=1e-10)


def test_reverse_sde_on_a_cosine_schedule_uses_its_derivative(ring):
    den = oracle_denoiser("ring8", "eps", S.Cosine(**ENDS)).float()
    sampler = ReverseSDE(steps=500, time_grid="uniform", final_denoise=True)
    result = sampler.sample(den, (N, 2), generator=_gen(0))
    assert result.nfe == 501
    assert sliced_wasserstein(result.x, ring["ref"], n_projections=512) < 1.5 * ring["floor"]
    gap = ring["mixture"].log_prob(result.x).mean().item() - ring["data_log_density"]
    assert abs(gap) < 0.05, gap


def test_ddim_with_eta_1_is_the_ancestral_sampler(den, ring):
    den64, f64 = oracle_denoiser("ring8", "eps", S.LogLinear(**ENDS)), torch.float64
    for grid, final in [("uniform", True), ("karras", LAST)]:
        a = Ancestral(steps=30, time_grid=grid, final_denoise=final)
        a = a.sample(den64, (1000, 2), generator=_gen(4), dtype=f64)
        b = DDIM(steps=30, eta=1.0, time_grid=grid, final_denoise=final)
        b = b.sample(den64, (1000, 2), generator=_gen(4), dtype=f64)
        assert a.nfe == b.nfe
        # the same draws give the same samples, up to rounding
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-9)
    # and in distribution, from independent draws
    a = Ancestral(steps=200).sample(den, (N, 2), generator=_gen(5)).x
    b = DDIM(steps=200, eta=1.0).sample(den, (N, 2), generator=_gen(6)).x
    assert sliced_wasserstein(a, b, n_projections=512) < 1.5 * ring["floor"]


def test_ddim_with_eta_0_is_deterministic_given_the_initial_noise(den, monkeypatch):
    sampler = DDIM(steps=20, eta=0.0, time_grid="log_snr", final_denoise=LAST)
    a = sampler.sample(den, (500, 2), generator=_gen(7)).x
    b = sampler.sample(den, (500, 2), generator=_gen(7)).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    # later draws, whatever they are, change nothing: only x_1 (the first draw) matters
    real_randn, calls = torch.randn, []

    def randn_with_garbage_after_the_first(*args, **kwargs):
        calls.append(args)
        z = real_randn(*args, **kwargs)
        return z if len(calls) == 1 else 100.0 * z + 7.0

    monkeypatch.setattr(torch, "randn", randn_with_garbage_after_the_first)
    c = sampler.sample(den, (500, 2), generator=_gen(7)).x
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    calls.clear()
    noisy = DDIM(steps=20, eta=0.5, time_grid="log_snr", final_denoise=LAST)  # eta > 0 does
    d = noisy.sample(den, (500, 2), generator=_gen(7)).x
    assert len(calls) > 1
    monkeypatch.setattr(torch, "randn", real_randn)
    assert not torch.allclose(d, noisy.sample(den, (500, 2), generator=_gen(7)).x)


def _nfe_formula(sampler: Sampler, steps: int) -> int | None:
    """NFE each sampler documents, for ``steps`` grid steps; None for adaptive solvers."""
    final = sampler.final_denoise
    end = 1 if final == LAST else 0
    extra = 1 if final else 0
    if isinstance(sampler, EDMStochastic):  # Heun's two evaluations per step
        return 2 * (steps - end) + extra
    if isinstance(sampler, ProbabilityFlowODE):
        if sampler.adaptive:
            return None
        n = steps - end
        if sampler.solver == "explicit_adams":  # two RK4 steps start the 4-step history
            return 4 * min(n, 2) + max(n - 2, 0) + extra
        per_step = {"heun": 2, "euler": 1, "rk4": 4, "midpoint": 2}[sampler.solver]
        return per_step * n + extra
    if isinstance(sampler, AnnealedLangevin):
        return sampler.steps_per_level * (steps - end) + extra
    if isinstance(sampler, PredictorCorrector):
        return (1 + sampler.corrector_steps) * (steps - end) + extra
    return steps - end + extra


NFE_CASES = [
    Ancestral(),
    Ancestral(final_denoise=LAST),
    Ancestral(final_denoise=False),
    DDIM(eta=0.0),
    DDIM(eta=0.3, time_grid="karras", final_denoise=LAST),
    FlowEuler(),
    FlowEuler(time_grid="log_snr", final_denoise=LAST),
    ReverseSDE(final_denoise=False),
    ReverseSDE(final_denoise=LAST),
    ProbabilityFlowODE(solver="heun"),
    ProbabilityFlowODE(solver="heun", final_denoise=LAST),
    ProbabilityFlowODE(solver="euler", final_denoise=False),
    DPMSolverPP2M(time_grid="log_snr", final_denoise=LAST),
    DPMSolverPP2M(time_grid="karras"),
    DPMSolverPP2MSDE(final_denoise=LAST),
    DPMSolverPP2MSDE(eta=0.5, time_grid="uniform"),
    DPMSolverPP3M(final_denoise=LAST),
    DPMSolverPP3M(time_grid="karras", final_denoise=False),
    UniPC(),
    UniPC(order=3, variant="bh1", final_denoise=LAST),
    UniPC(order=1, time_grid="karras", final_denoise=False),
    DEIS(),
    DEIS(order=2, time_grid="karras", final_denoise=LAST),
    EDMStochastic(churn=10.0, final_denoise=LAST),
    EDMStochastic(churn=40.0, sigma_tmin=0.0, sigma_tmax=1e9, time_grid="log_snr"),
    ProbabilityFlowODE(solver="rk4", time_grid="log_snr"),
    ProbabilityFlowODE(solver="midpoint", final_denoise=LAST),
    ProbabilityFlowODE(solver="explicit_adams", time_grid="log_snr"),
    ProbabilityFlowODE(solver="dopri5", rtol=1e-3, atol=1e-3),
    AnnealedLangevin(steps_per_level=3),
    AnnealedLangevin(steps_per_level=2, final_denoise=LAST),
    PredictorCorrector(predictor="ancestral", corrector_steps=2),
    PredictorCorrector(predictor="ddim", final_denoise=LAST),
    PredictorCorrector(predictor="sde", final_denoise=False),
]


@pytest.mark.parametrize("sampler", NFE_CASES, ids=repr)
def test_nfe_is_exact(sampler, den):
    for steps in (1, 2, 5, 8):
        sampler.steps = steps  # callers may override the number of steps
        counting = CountingDenoiser(den)
        result = sampler.sample(counting, (16, 2), generator=_gen(0))
        assert result.nfe == counting.calls, (steps, result.nfe, counting.calls)
        expected = _nfe_formula(sampler, steps)
        assert expected is None or result.nfe == expected, (steps, result.nfe, expected)
        assert result.x.shape == (16, 2) and torch.isfinite(result.x).all()


def test_reprs_name_the_sampler_and_its_settings():
    assert repr(DDIM(steps=7, eta=0.5, time_grid="karras", final_denoise=LAST)) == (
        "DDIM(steps=7, eta=0.5, time_grid='karras', final_denoise='last_step')"
    )
    assert repr(ProbabilityFlowODE(solver="dopri5", rtol=1e-3, atol=1e-4)).startswith(
        "ProbabilityFlowODE(steps=50, solver='dopri5', rtol=0.001, atol=0.0001"
    )
    assert "levels=100" in repr(AnnealedLangevin()) and "step_scale" in repr(AnnealedLangevin())
    assert "predictor='sde'" in repr(PredictorCorrector(predictor="sde"))
    for sampler in NFE_CASES:
        assert repr(sampler).startswith(type(sampler).__name__ + "(steps=") or (
            isinstance(sampler, (AnnealedLangevin, PredictorCorrector))
        )
    assert AnnealedLangevin(levels=4, steps=9).levels == 9  # ``steps`` overrides ``levels``
    with pytest.raises(ValueError, match="final_denoise"):
        DDIM(final_denoise="yes")
    with pytest.raises(ValueError, match="valid"):
        PredictorCorrector(predictor="heun")


INVALID_SETTINGS = [
    (Ancestral, {"steps": 0}, "steps"),
    (DDIM, {"steps": -5}, "steps"),
    (AnnealedLangevin, {"levels": 0}, "steps"),
    (ProbabilityFlowODE, {"solver": "bogus"}, "unknown ODE solver"),
    (ProbabilityFlowODE, {"solver": "dopri5", "rtol": 0.0}, "rtol"),
    (PredictorCorrector, {"corrector_steps": -1}, "corrector_steps"),
    (PredictorCorrector, {"snr": -1.0}, "snr"),
    (PredictorCorrector, {"step_size": "per_example"}, "step_size='per_example' is refused"),
    (ProbabilityFlowODE, {"solver": "fehlberg2"}, "'fehlberg2' is refused"),
    (ProbabilityFlowODE, {"solver": "implicit_adams"}, "'implicit_adams' is refused"),
    (AnnealedLangevin, {"step_scale": -1.0}, "step_scale"),
    (AnnealedLangevin, {"steps_per_level": 0}, "steps_per_level"),
    (DPMSolverPP2MSDE, {"eta": 1.5}, "eta"),
    (EDMStochastic, {"churn": -1.0}, "churn"),
    (UniPC, {"order": 4}, "order"),
    (DEIS, {"order": 0}, "order"),
    (UniPC, {"variant": "bh3"}, "variant"),
    (EDMStochastic, {"noise_scale": 0.0}, "noise_scale"),
    (EDMStochastic, {"sigma_tmin": 2.0, "sigma_tmax": 1.0}, "sigma_tmin"),
]


@pytest.mark.parametrize("cls,settings,key", INVALID_SETTINGS, ids=lambda v: str(v))
def test_invalid_settings_are_refused_at_construction(cls, settings, key):
    with pytest.raises(ValueError, match=key):
        cls(**settings)


def test_samplers_take_their_settings_by_keyword_and_check_them_in_one_place():
    with pytest.raises(TypeError):
        DDIM(7)  # keyword only
    with pytest.raises(ValueError, match="time grid"):
        FlowEuler(time_grid="karras-typo")
    with pytest.raises(ValueError, match="eta"):
        DDIM(eta=1.5)
    with pytest.raises(ValueError, match="step_size"):
        PredictorCorrector(step_size="each")
    assert DDIM(eta=0).eta == 0.0 and isinstance(DDIM(eta=0).eta, float)
    assert isinstance(Ancestral(steps=7.0).steps, int)
    # settings() lists the fields (own ones, then the shared ones); rtol/atol only if adaptive
    assert list(PredictorCorrector().settings()) == [
        "predictor",
        "steps",
        "corrector_steps",
        "snr",
        "step_size",
        "time_grid",
        "final_denoise",
    ]
    assert list(ProbabilityFlowODE().settings()) == [
        "steps",
        "solver",
        "time_grid",
        "final_denoise",
    ]
    assert repr(DPMSolverPP2M()) == (
        "DPMSolverPP2M(steps=50, time_grid='log_snr', final_denoise=True)"
    )
    # AnnealedLangevin's levels and steps are one number, whichever is set
    langevin = AnnealedLangevin(levels=5)
    assert langevin.steps == 5
    langevin.steps = 3
    assert langevin.levels == 3 and "levels=3" in repr(langevin) and "steps=" not in repr(langevin)


def test_dpmpp_2m_is_its_own_sampler_not_an_ode_solver():
    with pytest.raises(ValueError, match="DPMSolverPP2M"):
        ProbabilityFlowODE(solver="dpmpp_2m")


def test_dpmpp_2m_first_step_is_ddim():
    """With no previous x0_hat, D = x0_hat: x_s = (s_s/s_t) x_t - a_s expm1(-h) x0_hat is DDIM."""
    den = oracle_denoiser("ring8", "eps", S.Cosine(**ENDS))
    f64 = torch.float64
    a = DPMSolverPP2M(steps=1, final_denoise=False).sample(
        den, (200, 2), generator=_gen(8), dtype=f64
    )
    b = DDIM(steps=1, time_grid="log_snr", final_denoise=False)
    b = b.sample(den, (200, 2), generator=_gen(8), dtype=f64)
    torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_sde_is_dpmpp_2m_at_eta_0_and_its_first_step_is_ancestral_at_eta_1():
    """eta = 0 injects no noise: the ODE sampler's samples; eta = 1 with D = x0_hat (the first
    step) is q(x_s | x_t, x0 = x0_hat) with the same draw, the ancestral step (float64)."""
    den = oracle_denoiser("ring8", "eps", S.Cosine(**ENDS))
    f64 = torch.float64
    for steps in (1, 7):
        ode = DPMSolverPP2M(steps=steps, final_denoise=LAST)
        sde = DPMSolverPP2MSDE(steps=steps, eta=0.0, final_denoise=LAST)
        a, b = (s.sample(den, (200, 2), generator=_gen(8), dtype=f64) for s in (ode, sde))
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    a = DPMSolverPP2MSDE(steps=1, eta=1.0, time_grid="log_snr", final_denoise=False)
    b = Ancestral(steps=1, time_grid="log_snr", final_denoise=False)
    a, b = (s.sample(den, (200, 2), generator=_gen(8), dtype=f64) for s in (a, b))
    torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-12)


def test_edm_stochastic_without_churn_is_heun_and_its_churn_raises_sigma_as_karras():
    """churn = 0: the PF-ODE's Heun steps (float64, to rounding); gamma = min(churn / steps,
    sqrt(2) - 1) inside [sigma_tmin, sigma_tmax] only."""
    den = oracle_denoiser("ring8", "eps", S.Cosine(**ENDS))
    f64 = torch.float64
    for steps, last in ((1, False), (6, LAST), (6, True)):
        heun = ProbabilityFlowODE(steps=steps, solver="heun", final_denoise=last)
        edm = EDMStochastic(steps=steps, churn=0.0, final_denoise=last)
        a, b = (s.sample(den, (200, 2), generator=_gen(8), dtype=f64) for s in (heun, edm))
        torch.testing.assert_close(a.x, b.x, rtol=1e-10, atol=1e-10)
        assert a.nfe == b.nfe
    edm = EDMStochastic(steps=10, churn=2.0, sigma_tmin=0.1, sigma_tmax=10.0)
    assert edm.gamma(torch.tensor(1.0)) == pytest.approx(0.2)
    assert edm.gamma(torch.tensor(0.05)) == 0.0 and edm.gamma(torch.tensor(20.0)) == 0.0
    assert EDMStochastic(steps=10, churn=100.0).gamma(torch.tensor(1.0)) == math.sqrt(2) - 1


# torchdiffeq's solvers and the Langevin levels report no x0_hat
_NO_X0_HAT = (AnnealedLangevin,)


@pytest.mark.parametrize("sampler", NFE_CASES, ids=repr)
def test_the_callback_sees_every_step_and_changes_nothing(sampler, den):
    """Called after each step and after the final denoise: steps - end + (1 if final_denoise)
    times, from grid point i = steps down, with that point's t and log-SNR; the last x is the
    sample; and sampling with a callback is bit for bit sampling without one."""
    steps = 5
    sampler = copy.copy(sampler)
    sampler.steps = steps
    end = 1 if sampler.final_denoise == LAST else 0
    seen: list[StepInfo] = []
    result = sampler.sample(den, (16, 2), generator=_gen(0), callback=seen.append)
    plain = sampler.sample(den, (16, 2), generator=_gen(0))
    torch.testing.assert_close(result.x, plain.x, rtol=0, atol=0)
    assert result.nfe == plain.nfe

    assert len(seen) == steps - end + (1 if sampler.final_denoise else 0)
    assert [info.i for info in seen] == list(range(steps, end, -1)) + (
        [end] if sampler.final_denoise else []
    )
    grid = Grid.build(den.schedule, steps, sampler.time_grid, dtype=torch.float32)
    for info in seen:
        assert info.t == grid.t[info.i] and info.log_snr == grid.log_snr[info.i]
        assert info.x.shape == (16, 2)
    assert seen[-1].x is result.x
    solver = getattr(sampler, "solver", None)
    no_x0_hat = isinstance(sampler, _NO_X0_HAT) or solver not in (None, *FIXED_STEP_SOLVERS)
    chain = seen[:-1] if sampler.final_denoise else seen
    assert all((info.x0_hat is None) == no_x0_hat for info in chain)
    if sampler.final_denoise:
        assert seen[-1].x0_hat is result.x


def test_the_callbacks_x0_hat_is_the_denoisers_at_the_steps_start(den):
    seen: list[StepInfo] = []
    Ancestral(steps=4).sample(den, (16, 2), generator=_gen(0), callback=seen.append)
    for before, info in zip(seen, seen[1:], strict=False):
        expected = den(before.x, log_snr=info.log_snr).x0_hat
        torch.testing.assert_close(info.x0_hat, expected, rtol=0, atol=0)


def test_every_sampler_config_instantiates_with_a_steps_override():
    conf = CONF / "sampler"
    names = conf_options("sampler")
    expected = {"ancestral", "ddim", "sde", "ode", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "edm"}
    expected |= {"langevin", "unipc", "deis"}
    assert expected | {"pc"} <= set(names)
    for path in sorted(conf.glob("*.yaml")):
        assert path.read_text().startswith("#"), path
        cfg = OmegaConf.load(path)
        assert isinstance(instantiate(cfg), Sampler)
        assert instantiate(cfg, steps=7).steps == 7


@pytest.mark.parametrize("name", conf_options("schedule"))
@pytest.mark.parametrize("kind", ["uniform", "log_snr", "karras"])
def test_time_grids_run_from_0_to_1_strictly_increasing(name, kind):
    sched = conf_option("schedule", name, **ENDS)
    for steps in (1, 2, 10, 100):
        t = time_grid(sched, steps, kind, dtype=torch.float64)
        assert t.shape == (steps + 1,)
        assert t[0] == 0.0 and t[-1] == 1.0
        assert (t[1:] > t[:-1]).all()


def test_time_grids():
    sched = S.Cosine(**ENDS)
    t = time_grid(sched, 10, "uniform", dtype=torch.float64)
    torch.testing.assert_close(t, torch.linspace(0, 1, 11, dtype=torch.float64))
    t = time_grid(sched, 10, "log_snr", dtype=torch.float64)
    lam = sched.log_snr(t)
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((10,), -1.8, dtype=torch.float64))
    with pytest.raises(ValueError, match="valid"):
        time_grid(sched, 10, "karras-typo")


def test_karras_grid_spaces_sigma_to_the_one_over_rho_evenly():
    sched, rho = S.Cosine(**ENDS), 7.0
    t = time_grid(sched, 12, "karras", dtype=torch.float64)
    sigma = torch.exp(-0.5 * sched.log_snr(t))  # s / a
    lam_0, lam_1 = ENDS["log_snr_max"], ENDS["log_snr_min"]
    torch.testing.assert_close(sigma[0].item(), math.exp(-lam_0 / 2))
    torch.testing.assert_close(sigma[-1].item(), math.exp(-lam_1 / 2))
    root = sigma ** (1 / rho)
    steps = root[1:] - root[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(12))
    # Karras's sigma_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho, i = N - j
    i = torch.arange(12, -1, -1, dtype=torch.float64)
    s_max, s_min = math.exp(-lam_1 / 2), math.exp(-lam_0 / 2)
    karras = (s_max ** (1 / rho) + i / 12 * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    torch.testing.assert_close(sigma, karras)


def test_deterministic_given_the_generator():
    den = oracle_denoiser("mixture1d", "v").float()
    a = Ancestral(steps=20).sample(den, (100, 1), generator=torch.Generator().manual_seed(3)).x
    b = Ancestral(steps=20).sample(den, (100, 1), generator=torch.Generator().manual_seed(3)).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", NFE_CASES, ids=repr)
def test_every_sampler_samples_every_parameterization_of_one_denoiser_alike(sampler):
    """x0, eps, score, v, edm and flow are one denoiser in other coordinates: with the same noise,
    every sampler draws the same samples from the oracle in each (float64)."""
    sampler.steps = 6
    f64, results = torch.float64, {}
    for name in conf_options("parameterization"):
        den = oracle_denoiser("ring8", name, S.Cosine(**ENDS).double())
        results[name] = sampler.sample(den, (64, 2), generator=_gen(2), dtype=f64).x
    for name, x in results.items():
        torch.testing.assert_close(x, results["eps"], rtol=1e-7, atol=1e-7, msg=name)
