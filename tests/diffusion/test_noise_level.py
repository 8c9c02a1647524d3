"""NoiseLevel: the VP coefficients of one log-SNR, their identities, their ends, their old forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffexp.diffusion.noise_level import NoiseLevel
from tests.helpers import ENDS, conf_option, conf_options

DTYPES = [torch.float32, torch.float64]
PROPERTIES = (
    "alpha_bar",
    "s2",
    "a",
    "s",
    "snr",
    "sigma",
    "log_alpha_bar",
    "log_s2",
    "rectified_flow_time",
)


def _lam(dtype: torch.dtype, lo: float = -30.0, hi: float = 30.0) -> torch.Tensor:
    return torch.linspace(lo, hi, 601, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identities_hold_to_float_precision(dtype):
    """a^2 + s^2 = 1, SNR = a^2 / s^2, sigma = s / a, logs are logs, t_rf = s / (a + s)."""
    eps = torch.finfo(dtype).eps
    tol = {"rtol": 8 * eps, "atol": 0.0}
    lam = _lam(dtype, -15.0, 15.0)  # where SNR = a^2 / s^2 has no underflowing s^2
    level = NoiseLevel(lam)
    torch.testing.assert_close(level.alpha_bar + level.s2, torch.ones_like(lam), **tol)
    torch.testing.assert_close(level.a**2, level.alpha_bar, **tol)
    torch.testing.assert_close(level.s**2, level.s2, **tol)
    torch.testing.assert_close(level.snr, level.alpha_bar / level.s2, **tol)
    torch.testing.assert_close(level.sigma, level.s / level.a, **tol)
    torch.testing.assert_close(level.sigma**2, 1.0 / level.snr, **tol)
    torch.testing.assert_close(level.log_alpha_bar.exp(), level.alpha_bar, **tol)
    torch.testing.assert_close(level.log_s2.exp(), level.s2, **tol)
    torch.testing.assert_close(level.log_alpha_bar - level.log_s2, lam, rtol=0, atol=16 * eps)
    t_rf = level.s / (level.a + level.s)
    torch.testing.assert_close(level.rectified_flow_time, t_rf, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_coefficient_is_finite_and_exact_at_lambda_plus_minus_40(dtype):
    """At lambda = +-40 a^2 or s^2 is ~4e-18: sigmoid(+-lambda) keeps it to relative precision,
    and none of them is 0, inf or nan (1 - sigmoid would give s^2 = 0 at lambda = 40)."""
    lam = torch.tensor([-40.0, 40.0], dtype=dtype)
    level = NoiseLevel(lam)
    for name in PROPERTIES:
        value = getattr(level, name)
        assert value.dtype == dtype and torch.isfinite(value).all(), name
    tiny = math.exp(-40.0)  # sigmoid(-40) = e^-40 / (1 + e^-40) = e^-40 to float64 precision
    rtol = 4 * torch.finfo(dtype).eps
    expected = torch.tensor([tiny, 1.0], dtype=dtype)
    torch.testing.assert_close(level.alpha_bar, expected, rtol=rtol, atol=0)
    torch.testing.assert_close(level.s2, expected.flip(0), rtol=rtol, atol=0)
    torch.testing.assert_close(level.a, expected.sqrt(), rtol=rtol, atol=0)
    torch.testing.assert_close(level.s, expected.flip(0).sqrt(), rtol=rtol, atol=0)
    torch.testing.assert_close(level.log_alpha_bar, torch.log(expected), rtol=rtol, atol=rtol)
    torch.testing.assert_close(level.log_s2, torch.log(expected.flip(0)), rtol=rtol, atol=rtol)
    torch.testing.assert_close(level.snr, torch.exp(lam), rtol=rtol, atol=0)
    torch.testing.assert_close(level.sigma, torch.exp(-lam / 2), rtol=rtol, atol=0)
    assert (level.alpha_bar > 0).all() and (level.s2 > 0).all()


def test_the_ends_of_the_process_are_exact():
    """lambda = +inf: the data (a = 1, s = 0); lambda = -inf: pure noise (a = 0, s = 1)."""
    level = NoiseLevel(torch.tensor([math.inf, -math.inf], dtype=torch.float64))
    assert level.a.tolist() == [1.0, 0.0] and level.s.tolist() == [0.0, 1.0]
    assert level.sigma.tolist() == [0.0, math.inf]
    assert level.log_alpha_bar.tolist() == [0.0, -math.inf]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_for_bit_the_formulas_it_replaces(dtype):
    """The old helpers (parameterizations.a_s, samplers.a_and_s2, Schedule.a/.s/.alpha_bar/.snr,
    the inline sigmoid(-lambda)s) computed exactly these expressions."""
    lam = _lam(dtype, -40.0, 40.0)
    level = NoiseLevel(lam)
    old = {
        "alpha_bar": torch.sigmoid(lam),
        "s2": torch.sigmoid(-lam),
        "a": torch.sigmoid(lam).sqrt(),
        "s": torch.sigmoid(-lam).sqrt(),
        "snr": torch.exp(lam),
        "sigma": torch.exp(-0.5 * lam),
        "log_alpha_bar": F.logsigmoid(lam),
        "log_s2": F.logsigmoid(-lam),
        "rectified_flow_time": torch.sigmoid(-0.5 * lam),
    }
    assert set(old) == set(PROPERTIES)
    for name, value in old.items():
        torch.testing.assert_close(getattr(level, name), value, rtol=0, atol=0, msg=name)


def test_broadcasting_is_the_callers_and_values_are_cached():
    lam = torch.tensor([-2.0, 0.0, 3.0])
    level = NoiseLevel(lam[:, None])
    x = torch.ones(3, 4)
    assert (level.a * x).shape == (3, 4)
    assert level.a is level.a  # computed once
    with pytest.raises(AttributeError):
        level.log_snr = lam  # frozen


@pytest.mark.parametrize("name", conf_options("schedule"))
def test_a_schedules_noise_level_is_that_of_its_log_snr(name):
    sched = conf_option("schedule", name, **ENDS).double()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    with torch.no_grad():
        level, lam = sched.noise_level(t), sched.log_snr(t)
        torch.testing.assert_close(level.log_snr, lam, rtol=0, atol=0)
        torch.testing.assert_close(level.a, torch.sigmoid(lam).sqrt(), rtol=0, atol=0)
