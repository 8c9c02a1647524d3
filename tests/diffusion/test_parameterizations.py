"""Round trips between every parameterization (x0 / eps / score / v / edm / flow), their ELBO
weights, EDM and flow against their closed forms, and one ELBO from all of them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffexp.diffusion import schedules as S
from diffexp.diffusion.denoiser import Denoiser, broadcast_like
from diffexp.diffusion.elbo import diffuse, elbo_terms, snr_difference
from diffexp.diffusion.noise_level import NoiseLevel
from diffexp.networks import MLP
from tests.helpers import ENDS, F64, conf_option, conf_options, oracle_denoiser

NAMES = conf_options("parameterization")


def _batch(n=256, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=F64) * 2
    eps = torch.randn(n, d, generator=g, dtype=F64)
    lam = (torch.rand(n, generator=g, dtype=F64) * 18 - 8)[:, None]
    return x0, eps, lam, diffuse(x0, lam[:, 0], eps)


@pytest.mark.parametrize("name", NAMES)
def test_target_converts_back_to_the_true_x0_and_eps(name):
    p = conf_option("parameterization", name)
    x0, eps, lam, x_t = _batch()
    x0_hat, eps_hat = p.convert(p.target(x0, eps, lam), x_t, lam)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_output_round_trip_and_consistency_with_x_t(name):
    p = conf_option("parameterization", name)
    _, _, lam, x_t = _batch()
    out = torch.randn_like(x_t)
    x0_hat, eps_hat = p.convert(out, x_t, lam)
    level = NoiseLevel(lam)
    torch.testing.assert_close(level.a * x0_hat + level.s * eps_hat, x_t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.output_from(x0_hat, eps_hat, lam), out, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("src", NAMES)
@pytest.mark.parametrize("dst", NAMES)
def test_every_pair_of_parameterizations_round_trips(src, dst):
    p, q = conf_option("parameterization", src), conf_option("parameterization", dst)
    _, _, lam, x_t = _batch(seed=1)
    out = torch.randn_like(x_t)
    out_q = q.output_from(*p.convert(out, x_t, lam), lam)
    back = p.output_from(*q.convert(out_q, x_t, lam), lam)
    torch.testing.assert_close(back, out, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_x0_error_scale(name):
    p = conf_option("parameterization", name)
    x0, eps, lam, x_t = _batch(seed=2)
    out = p.target(x0, eps, lam) + 0.1 * torch.randn_like(x0)
    x0_hat, _ = p.convert(out, x_t, lam)
    lhs = ((x0 - x0_hat) ** 2).sum(1)
    rhs = torch.exp(p.log_x0_error_scale2(lam[:, 0])) * ((p.target(x0, eps, lam) - out) ** 2).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12)


def test_discrete_weights_match_the_table_of_math_section_4():
    lam_t = torch.linspace(-7, 9, 50, dtype=F64)
    lam_s = lam_t + 0.3
    snr_s, snr_t = lam_s.exp(), lam_t.exp()
    a2, s2 = torch.sigmoid(lam_t), torch.sigmoid(-lam_t)
    table = {
        "x0": 0.5 * (snr_s - snr_t),
        "eps": 0.5 * (snr_s / snr_t - 1),
        "score": 0.5 * (snr_s - snr_t) * s2**2 / a2,
        "v": 0.5 * (snr_s - snr_t) * s2,
    }
    for name, expected in table.items():
        p = conf_option("parameterization", name)
        weight = 0.5 * snr_difference(lam_s, lam_t) * torch.exp(p.log_x0_error_scale2(lam_t))
        torch.testing.assert_close(weight, expected, rtol=1e-10, atol=0)


class _Reparameterized(nn.Module):
    """Wraps a denoiser so that its prediction is emitted in another parameterization (which
    may have scaled the network's input: undone first)."""

    def __init__(self, base: Denoiser, param):
        super().__init__()
        self.base, self.param = base, param

    def forward(self, net_in, log_snr, y=None):
        x_t = self.param.x_t_of_network_input(net_in, broadcast_like(log_snr, net_in))
        pred = self.base(x_t, y=y, log_snr=log_snr)
        return self.param.output_from(pred.x0_hat, pred.eps_hat, pred.log_snr)


@pytest.mark.parametrize("T", [0, 20])
@pytest.mark.parametrize("base_kind", ["mlp", "oracle"])
def test_one_denoiser_gives_the_same_elbo_through_every_parameterization(T, base_kind):
    torch.manual_seed(0)
    schedule = S.Cosine(**ENDS)
    if base_kind == "mlp":
        base = Denoiser(
            MLP(dim=2, width=32, depth=2), conf_option("parameterization", "v"), schedule
        ).double()
        nn.init.normal_(base.network.out[1].weight, std=0.3)  # not the zero-initialized output
    else:
        base = oracle_denoiser("ring8", "x0", schedule)
    x0 = torch.randn(512, 2, dtype=F64) * 2
    results = {}
    for name in NAMES:
        p = conf_option("parameterization", name)
        den = Denoiser(_Reparameterized(base, p), p, schedule)
        g = torch.Generator().manual_seed(123)
        terms = elbo_terms(den, x0, T=T, n_t=4, generator=g)
        results[name] = terms.elbo
    for name in NAMES[1:]:
        torch.testing.assert_close(results[name], results[NAMES[0]], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(results["x0"]).all() and math.isfinite(results["x0"].mean().item())


def test_broadcast_like():
    x = torch.zeros(4, 3, 8, 8)
    assert broadcast_like(torch.arange(4.0), x).shape == (4, 1, 1, 1)
    assert broadcast_like(torch.tensor(1.0), x).shape == (4, 1, 1, 1)


def test_edm_with_unit_sigma_data_is_v_up_to_sign():
    """MATH.md section 9: with sigma_d = 1, c_skip = a^2, c_out = s, c_in = 1, so F = -v."""
    edm, v = (
        conf_option("parameterization", "edm", sigma_data=1.0),
        conf_option("parameterization", "v"),
    )
    x0, eps, lam, x_t = _batch(seed=3)
    torch.testing.assert_close(
        edm.target(x0, eps, lam), -v.target(x0, eps, lam), rtol=0, atol=1e-14
    )
    out = torch.randn_like(x_t)
    for a, b in zip(edm.convert(-out, x_t, lam), v.convert(out, x_t, lam), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    torch.testing.assert_close(edm.input_scale(lam), torch.ones_like(lam), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        edm.log_x0_error_scale2(lam), v.log_x0_error_scale2(lam), rtol=0, atol=1e-13
    )


@pytest.mark.parametrize("sigma_data", [0.5, 1.418])
def test_edm_coefficients_are_karras_in_the_variance_exploding_variable(sigma_data):
    """D(x_ve) = c_skip x_ve + c_out F(c_in x_ve), x_ve = x_t / a, sigma = exp(-lambda / 2)."""
    p = conf_option("parameterization", "edm", sigma_data=sigma_data)
    _, _, lam, x_t = _batch(seed=4)
    sigma, sd = torch.exp(-lam / 2), sigma_data
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
    c_in = 1 / torch.sqrt(sigma**2 + sd**2)
    a = torch.sigmoid(lam).sqrt()
    x_ve = x_t / a
    out = torch.randn_like(x_t)
    x0_hat, _ = p.convert(out, x_t, lam)
    torch.testing.assert_close(x0_hat, c_skip * x_ve + c_out * out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.network_input(x_t, lam), c_in * x_ve, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.log_x0_error_scale2(lam), torch.log(c_out**2), rtol=1e-10, atol=0)


def test_flow_is_the_rectified_flow_path():
    """z = (1 - t) x0 + t eps = x_t / (a + s) with t = s / (a + s); u = eps - x0."""
    p = conf_option("parameterization", "flow")
    x0, eps, lam, x_t = _batch(seed=5)
    level = NoiseLevel(lam)
    t = level.s / (level.a + level.s)
    torch.testing.assert_close(
        p.network_input(x_t, lam), (1 - t) * x0 + t * eps, rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(torch.exp(-lam / 2), t / (1 - t), rtol=1e-12, atol=0)
    out = torch.randn_like(x_t)
    x0_hat, eps_hat = p.convert(out, x_t, lam)
    torch.testing.assert_close(
        eps_hat - eps, (1 - t) * (out - p.target(x0, eps, lam)), rtol=1e-9, atol=1e-9
    )
