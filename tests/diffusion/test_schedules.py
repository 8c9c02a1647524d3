"""Schedule properties: monotone log-SNR, endpoints, DDPM's table, continuous vs discrete."""

from __future__ import annotations

import math

import pytest
import torch

from diffexp.diffusion import schedules as S
from tests.helpers import conf_option, conf_options

T64 = torch.float64
ENDS = {"log_snr_max": 10.0, "log_snr_min": -8.0}


def all_schedules():
    """One of each option of conf/schedule, with the ring's endpoints (float64)."""
    return [conf_option("schedule", name, **ENDS).double() for name in conf_options("schedule")]


@pytest.mark.parametrize("schedule", all_schedules(), ids=conf_options("schedule"))
def test_log_snr_strictly_decreasing_with_exact_endpoints(schedule):
    t = torch.linspace(0, 1, 2001, dtype=T64)
    lam = schedule.log_snr(t).detach()
    assert torch.all(lam[1:] < lam[:-1])
    assert lam[0].item() == pytest.approx(10.0, abs=1e-9)
    assert lam[-1].item() == pytest.approx(-8.0, abs=1e-9)
    # derived quantities are consistent: a^2 + s^2 = 1, SNR = a^2 / s^2
    level = schedule.noise_level(t)
    a2, s2 = level.a**2, level.s**2
    torch.testing.assert_close(a2 + s2, torch.ones_like(t))
    torch.testing.assert_close(torch.log(a2 / s2), lam.to(T64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", all_schedules(), ids=conf_options("schedule"))
def test_derivative_matches_finite_differences(schedule):
    t = torch.linspace(0.01, 0.99, 50, dtype=T64)
    _, dlam = schedule.log_snr_and_derivative(t)
    h = 1e-6
    fd = (schedule.log_snr(t + h) - schedule.log_snr(t - h)).detach() / (2 * h)
    torch.testing.assert_close(dlam.detach(), fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", all_schedules(), ids=conf_options("schedule"))
def test_time_of_log_snr_inverts_the_schedule(schedule):
    lam = torch.linspace(9.5, -7.5, 20, dtype=T64)
    t = schedule.t_of_log_snr(lam)
    torch.testing.assert_close(schedule.log_snr(t).detach(), lam, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("schedule", all_schedules(), ids=conf_options("schedule"))
def test_log_density_is_the_density_of_lambda_under_uniform_t(schedule):
    """p(lambda) = 1 / |lambda'(t)| integrates to 1 over the range; P(lambda > l) = t(l)."""
    lam = torch.linspace(10.0, -8.0, 4001, dtype=T64)
    p = schedule.log_density(lam).detach().exp()
    mass = torch.trapezoid(p, -lam)
    assert mass.item() == pytest.approx(1.0, abs=1e-4)  # the trapezoid rule's error at this grid
    upper = torch.cumulative_trapezoid(p, -lam)  # P(lambda in [l, 10]) = t(l)
    t = schedule.t_of_log_snr(lam[1:])
    torch.testing.assert_close(upper, t, rtol=0, atol=1e-4)


def test_rectified_flow_is_the_straight_path():
    """lambda = 2 log((1 - u) / u): a = (1 - u) r, s = u r with r = 1 / sqrt((1 - u)^2 + u^2)."""
    sched = S.RectifiedFlow(**ENDS)
    t = torch.linspace(0, 1, 101, dtype=T64)
    u0, u1 = torch.sigmoid(torch.tensor([-5.0, 4.0], dtype=T64))  # t_rf at lambda = 10 and -8
    u = u0 + (u1 - u0) * t
    r = 1 / torch.sqrt((1 - u) ** 2 + u**2)
    level = sched.noise_level(t)
    torch.testing.assert_close(level.a, (1 - u) * r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(level.s, u * r, rtol=1e-12, atol=1e-12)


def test_linear_is_ddpm_closed_form():
    sched = S.Linear()
    t = torch.linspace(0.001, 1, 100, dtype=T64)
    expected = torch.exp(-(0.1 * t + 0.5 * (20.0 - 0.1) * t**2))
    torch.testing.assert_close(sched.noise_level(t).alpha_bar, expected, rtol=1e-10, atol=1e-12)


def test_cosine_is_nichol_dhariwal_closed_form():
    sched = S.Cosine()
    t = torch.linspace(0.0, 0.99, 100, dtype=T64)

    def f(u):
        return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    torch.testing.assert_close(
        sched.noise_level(t).alpha_bar, f(t) / f(torch.zeros(1, dtype=T64)), rtol=1e-9, atol=1e-12
    )


def test_log_linear_is_vdm_gamma():
    sched = S.LogLinear(log_snr_max=13.3, log_snr_min=-5.0)
    t = torch.linspace(0, 1, 11, dtype=T64)
    torch.testing.assert_close(sched.gamma(t), -13.3 + 18.3 * t)


def test_discrete_linear_is_product_of_one_minus_beta():
    betas = [1e-4 + (0.02 - 1e-4) * j / 999 for j in range(1000)]
    expected, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        expected.append(prod)
    table = S.Linear().discrete_alpha_bar(1000)
    torch.testing.assert_close(table, torch.tensor(expected, dtype=T64), rtol=1e-10, atol=0)
    torch.testing.assert_close(S.ddpm_alpha_bar(1000), table)


def test_discrete_linear_table_converges_to_the_continuous_schedule():
    errors = {}
    for T in (50, 200, 1000, 4000):
        i = torch.arange(1, T + 1, dtype=T64)
        cont = torch.log(S.Linear().noise_level(i / T).alpha_bar)
        disc = torch.log(S.Linear().discrete_alpha_bar(T))
        errors[T] = (cont - disc).abs().max().item()
    values = list(errors.values())
    assert all(b < a for a, b in zip(values, values[1:], strict=False)), errors
    # first order in 1/T: T * error settles to a constant
    assert errors[4000] * 4000 == pytest.approx(errors[1000] * 1000, rel=0.05)
    assert errors[4000] < 0.02


def test_discrete_cosine_table_is_the_continuous_one_until_beta_clips():
    T = 1000
    i = torch.arange(1, T + 1, dtype=T64)
    sched = S.Cosine()
    cont, disc = sched.noise_level(i / T).alpha_bar, sched.discrete_alpha_bar(T)
    betas = 1 - disc / torch.cat([torch.ones(1, dtype=T64), disc[:-1]])
    clipped = betas >= 0.999 - 1e-12
    assert clipped.any() and clipped[-1]
    first = int(clipped.nonzero()[0])
    torch.testing.assert_close(disc[:first], cont[:first], rtol=1e-9, atol=1e-15)


def test_discretize_gives_the_grid_values():
    sched = S.Cosine(**ENDS)
    lam = sched.discretize(10, dtype=T64)
    torch.testing.assert_close(lam, sched.log_snr(torch.arange(11, dtype=T64) / 10))


def test_learned_schedule_trains_endpoints_and_interior():
    sched = S.Learned(**ENDS)
    t = torch.rand(64)
    lam, dlam = sched.log_snr_and_derivative(t)
    (lam.sum() + dlam.sum()).backward()
    assert sched.log_snr_max.grad is not None and sched.log_snr_min.grad is not None
    assert sched.l2.weight_raw.grad is not None and sched.l2.weight_raw.grad.abs().sum() > 0
    # the endpoints are exactly the parameters
    ends = sched.log_snr(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.stack([sched.log_snr_max, sched.log_snr_min]).detach())


def test_endpoints_outside_the_natural_range_are_refused():
    with pytest.raises(ValueError, match="greater than"):
        S.Cosine(log_snr_max=-8.0, log_snr_min=10.0)
    with pytest.raises(ValueError, match="natural range"):
        S.Linear(log_snr_max=10.0, log_snr_min=-20.0)  # DDPM's linear ends near -10.05
