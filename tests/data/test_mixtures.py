"""Gaussian-mixture oracle (MATH.md s8) and sliced Wasserstein, checked against ground truth."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from diffexp.data.mixtures import (
    PRESETS,
    GaussianMixture,
    grid25,
    make_mixture,
    mixture1d,
    ring8,
)
from diffexp.metrics import sliced_wasserstein

F64 = torch.float64
LOG_SNRS = [-6.0, -2.0, 0.0, 1.5, 4.0, 10.0, math.inf]


def _general() -> GaussianMixture:
    """A 3-D mixture with unequal weights and variances (no symmetry to hide mistakes)."""
    means = torch.tensor([[0.0, 1.0, -1.0], [2.0, -0.5, 0.3], [-1.5, 0.2, 1.1]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.05, 0.3, 1.0], dtype=F64), [2.0, 5.0, 3.0])


MIXTURES = {
    "ring8": lambda: ring8().to(dtype=F64),
    "grid25": lambda: grid25().to(dtype=F64),
    "mixture1d": lambda: mixture1d().to(dtype=F64),
    "general3d": _general,
}


def _alpha_sigma2(log_snr: float) -> tuple[float, float]:
    """Reference ``(a^2, s^2) = (sigmoid(lambda), sigmoid(-lambda))`` in plain python."""
    if log_snr == math.inf:
        return 1.0, 0.0
    return 1.0 / (1.0 + math.exp(-log_snr)), 1.0 / (1.0 + math.exp(log_snr))


def _points(mix: GaussianMixture, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Test points around the data: half near samples, half spread out."""
    g = torch.Generator().manual_seed(seed)
    x0, _ = mix.sample(n // 2, g)
    wide = 2.5 * torch.randn(n - n // 2, mix.dim, generator=g, dtype=F64)
    return torch.cat([x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=F64), wide])


def _torch_mixture(mix: GaussianMixture, log_snr: float) -> MixtureSameFamily:
    """``q(x_t)`` built independently from torch.distributions."""
    a2, s2 = _alpha_sigma2(log_snr)
    std = (a2 * mix.variances + s2).sqrt()[:, None].expand(-1, mix.dim)
    comps = Independent(Normal(math.sqrt(a2) * mix.means, std), 1)
    return MixtureSameFamily(Categorical(probs=mix.weights), comps)


# ---------------------------------------------------------------------------- construction
def test_validation_errors():
    with pytest.raises(ValueError, match=r"\[K, d\]"):
        GaussianMixture(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(torch.zeros(3, 2), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(3, 2), 1.0, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(3, 2), 1.0, torch.ones(4))
    with pytest.raises(ValueError, match="ring8"):
        make_mixture("ring9")
    mix = ring8()
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        mix.log_prob(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="log_snr"):
        mix.score(torch.zeros(5, 2), torch.zeros(4))


def test_presets_and_to():
    assert set(PRESETS) == {"ring8", "grid25", "mixture1d"}
    r = make_mixture("ring8", radius=3.0, std=0.2)
    assert (r.num_components, r.dim) == (8, 2)
    torch.testing.assert_close(r.means.norm(dim=1), torch.full((8,), 3.0))
    torch.testing.assert_close(r.variances, torch.full((8,), 0.04))
    torch.testing.assert_close(r.weights, torch.full((8,), 1 / 8))
    g = grid25()
    assert (g.num_components, g.dim) == (25, 2)
    assert sorted(set(g.means[:, 0].tolist())) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert g.means.mean(0).abs().max() < 1e-7
    m = mixture1d()
    assert (m.num_components, m.dim) == (2, 1)
    torch.testing.assert_close(m.weights, torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(m.means[:, 0], torch.tensor([-1.0, 1.5]))
    torch.testing.assert_close(m.variances, torch.tensor([0.0625, 0.25]))
    m64 = m.to(dtype=F64)
    assert m64.means.dtype == F64 and m.means.dtype == torch.float32
    assert m64.means.data_ptr() != m.means.data_ptr()


# ---------------------------------------------------------------------------- densities
@pytest.mark.parametrize("name", list(MIXTURES))
def test_marginal_at_infinite_snr_is_data_density(name):
    mix = MIXTURES[name]()
    x = _points(mix)
    torch.testing.assert_close(mix.marginal_log_prob(x, math.inf), mix.log_prob(x), rtol=0, atol=0)
    torch.testing.assert_close(
        mix.log_prob(x), _torch_mixture(mix, math.inf).log_prob(x), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("name", list(MIXTURES))
def test_marginal_matches_torch_distributions(name):
    mix = MIXTURES[name]()
    x = _points(mix)
    for lam in LOG_SNRS:
        expected = _torch_mixture(mix, lam).log_prob(x)
        torch.testing.assert_close(mix.marginal_log_prob(x, lam), expected, rtol=1e-12, atol=1e-12)


def test_per_example_log_snr_matches_scalar():
    mix = _general()
    x = _points(mix, n=len(LOG_SNRS) * 3)
    lam = torch.tensor(LOG_SNRS, dtype=F64).repeat_interleave(3)
    got = mix.marginal_log_prob(x, lam)
    got_score = mix.score(x, lam)
    for i in range(len(x)):
        one = mix.marginal_log_prob(x[i : i + 1], float(lam[i]))
        torch.testing.assert_close(got[i : i + 1], one, rtol=0, atol=1e-14)
        torch.testing.assert_close(
            got_score[i : i + 1], mix.score(x[i : i + 1], lam[i]), rtol=0, atol=1e-12
        )


# 1-D quadrature over x0: q(x_t) = int N(x_t; a x0, s^2) p(x0) dx0 (the trapezoid rule is
# spectrally accurate for these smooth, fast-decaying integrands).
_X0 = torch.linspace(-6.0, 7.0, 40_001, dtype=F64)


def _quadrature(mix: GaussianMixture, x_t: torch.Tensor, lam: float, y: int | None = None):
    """``(q(x_t), E[x0 | x_t])`` by quadrature over x0 (component ``y`` only when given)."""
    a2, s2 = _alpha_sigma2(lam)
    if y is None:
        p0 = mix.log_prob(_X0[:, None]).exp()
    else:
        p0 = Normal(mix.means[y, 0], mix.variances[y].sqrt()).log_prob(_X0).exp()
    kernel = Normal(math.sqrt(a2) * _X0, math.sqrt(s2)).log_prob(x_t[:, None]).exp()  # [n, G]
    density = torch.trapezoid(kernel * p0, _X0, dim=1)
    mean = torch.trapezoid(kernel * p0 * _X0, _X0, dim=1) / density
    return density, mean


@pytest.mark.parametrize("lam", [-3.0, 0.0, 2.0, 6.0])
def test_1d_marginal_and_posterior_mean_by_quadrature(lam):
    mix = mixture1d().to(dtype=F64)
    x_t = torch.tensor([-2.0, -0.9, 0.0, 0.4, 1.3, 2.7], dtype=F64)
    density, mean = _quadrature(mix, x_t, lam)
    torch.testing.assert_close(
        mix.marginal_log_prob(x_t[:, None], lam), density.log(), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(mix.posterior_mean(x_t[:, None], lam)[:, 0], mean, rtol=0, atol=1e-6)
    for k in range(2):
        _, mean_k = _quadrature(mix, x_t, lam, y=k)
        y = torch.full((len(x_t),), k, dtype=torch.long)
        torch.testing.assert_close(
            mix.posterior_mean(x_t[:, None], lam, y)[:, 0], mean_k, rtol=0, atol=1e-6
        )


# ---------------------------------------------------------------------------- score
@pytest.mark.parametrize("name", list(MIXTURES))
def test_score_is_gradient_of_marginal(name):
    mix = MIXTURES[name]()
    for lam in LOG_SNRS:
        x = _points(mix).requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.marginal_log_prob(x, lam).sum(), x)
        torch.testing.assert_close(mix.score(x.detach(), lam), grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_conditional_score_is_gradient_of_component_density(name):
    mix = MIXTURES[name]()
    g = torch.Generator().manual_seed(1)
    for lam in LOG_SNRS:
        x = _points(mix).requires_grad_(True)
        y = torch.randint(mix.num_components, (len(x),), generator=g)
        a2, s2 = _alpha_sigma2(lam)
        std = (a2 * mix.variances[y] + s2).sqrt()[:, None]
        log_q_y = Normal(math.sqrt(a2) * mix.means[y], std).log_prob(x).sum(-1)
        (grad,) = torch.autograd.grad(log_q_y.sum(), x)
        torch.testing.assert_close(mix.score(x.detach(), lam, y), grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_tweedie(name):
    """``a_t E[x0 | x_t] = x_t + s_t^2 grad log q(x_t)``, unconditionally and per component."""
    mix = MIXTURES[name]()
    x = _points(mix)
    y = torch.arange(len(x)) % mix.num_components
    for lam in LOG_SNRS:
        a2, s2 = _alpha_sigma2(lam)
        for label in (None, y):
            lhs = math.sqrt(a2) * mix.posterior_mean(x, lam, label)
            rhs = x + s2 * mix.score(x, lam, label)
            torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_posterior_mean_at_infinite_snr_is_identity():
    mix = _general()
    x = _points(mix)
    torch.testing.assert_close(mix.posterior_mean(x, math.inf), x, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- classifier
@pytest.mark.parametrize("name", list(MIXTURES))
def test_responsibilities_are_bayes_rule(name):
    mix = MIXTURES[name]()
    x = _points(mix)
    for lam in LOG_SNRS:
        log_r = mix.responsibilities(x, lam)
        assert log_r.shape == (len(x), mix.num_components)
        torch.testing.assert_close(
            log_r.exp().sum(-1), torch.ones(len(x), dtype=F64), rtol=0, atol=1e-12
        )
        a2, s2 = _alpha_sigma2(lam)
        std = (a2 * mix.variances + s2).sqrt()[:, None]
        comp = Normal(math.sqrt(a2) * mix.means, std).log_prob(x[:, None, :]).sum(-1).exp()
        joint = mix.weights * comp
        expected = joint / joint.sum(-1, keepdim=True)
        # compare probabilities where the naive computation does not underflow
        ok = joint.sum(-1) > 1e-200
        torch.testing.assert_close(log_r.exp()[ok], expected[ok], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- sampling
def test_ring8_true_log_likelihood():
    """Mean log p(x0) of ring8 data: analytic (well-separated components) vs Monte Carlo.

    Components 15 std apart do not overlap, so E[log p] = -(1 + log(2 pi sigma^2)) - log 8 =
    -0.3121 nats; MATH.md quotes -0.322 (a 0.01 difference, at the edge of its +-0.01).
    """
    mix = ring8().to(dtype=F64)
    analytic = -(1.0 + math.log(2 * math.pi * 0.01)) - math.log(8)
    x0, _ = mix.sample(200_000, torch.Generator().manual_seed(0))
    lp = mix.log_prob(x0)
    se = float(lp.std()) / math.sqrt(len(lp))
    assert abs(float(lp.mean()) - analytic) < 4 * se
    assert abs(analytic - (-0.322)) < 0.0101


@pytest.mark.parametrize("name", ["mixture1d", "general3d", "ring8"])
def test_sample_moments_per_component(name):
    mix = MIXTURES[name]()
    n = 100_000
    x0, y = mix.sample(n, torch.Generator().manual_seed(3))
    assert x0.shape == (n, mix.dim) and x0.dtype == F64
    assert y.shape == (n,) and y.dtype == torch.long
    freq = torch.bincount(y, minlength=mix.num_components).to(F64) / n
    se_freq = (mix.weights * (1 - mix.weights) / n).sqrt()
    assert ((freq - mix.weights).abs() < 5 * se_freq).all()
    for k in range(mix.num_components):
        xk = x0[y == k]
        m = len(xk)
        se_mean = (mix.variances[k] / m).sqrt()
        assert ((xk.mean(0) - mix.means[k]).abs() < 5 * se_mean).all()
        var = xk.var(0)
        se_var = mix.variances[k] * math.sqrt(2 / (m - 1))
        assert ((var - mix.variances[k]).abs() < 5 * se_var).all()


def test_sample_is_deterministic_given_generator():
    mix = ring8()
    a = mix.sample(100, torch.Generator().manual_seed(7))
    b = mix.sample(100, torch.Generator().manual_seed(7))
    c = mix.sample(100, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------------------- sliced W2
def test_sliced_wasserstein_identical_is_zero():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(500)]) == 0.0


def test_sliced_wasserstein_1d_is_exact_w2():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20_000, generator=g, dtype=F64)
    for m in (0.5, 1.5, -2.0):
        b = torch.randn(20_000, generator=g, dtype=F64) + m
        w = sliced_wasserstein(a, b)
        assert abs(w - abs(m)) < 0.03
        exact = (a.sort().values - b.sort().values).square().mean().sqrt()
        assert w == pytest.approx(float(exact), rel=1e-12)
        assert sliced_wasserstein(a[:, None], b[:, None]) == w  # [n] and [n, 1] agree


def test_sliced_wasserstein_unequal_sizes():
    # hand computation: quantile steps of {0, 1, 2} and {0, 3} give W2^2 = 1/6 + 4/6 + 2/6
    a = torch.tensor([2.0, 0.0, 1.0])
    b = torch.tensor([3.0, 0.0])
    assert sliced_wasserstein(a, b) == pytest.approx(math.sqrt(7 / 6), rel=1e-12)
    # duplicating a sample set leaves its empirical measure unchanged
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(300, 2, generator=g), torch.randn(200, 2, generator=g) + 0.5
    same = sliced_wasserstein(x, torch.cat([z, z, z]))
    assert sliced_wasserstein(torch.cat([x, x]), z) == pytest.approx(
        sliced_wasserstein(x, z), rel=1e-10
    )
    assert same == pytest.approx(sliced_wasserstein(x, z), rel=1e-10)


def test_sliced_wasserstein_symmetric_deterministic_and_grows_with_shift():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2000, 2, generator=g, dtype=F64)
    b = torch.randn(2000, 2, generator=g, dtype=F64)
    assert sliced_wasserstein(a, b[:1500], seed=5) == pytest.approx(
        sliced_wasserstein(b[:1500], a, seed=5), rel=1e-12
    )
    assert sliced_wasserstein(a, b, seed=5) == sliced_wasserstein(a, b, seed=5)
    assert sliced_wasserstein(a, b + 1, seed=5) != sliced_wasserstein(a, b + 1, seed=6)
    shifts = [0.0, 0.5, 1.0, 2.0, 4.0]
    values = [sliced_wasserstein(a, b + torch.tensor([s, 0.0], dtype=F64)) for s in shifts]
    assert all(v0 < v1 for v0, v1 in zip(values, values[1:], strict=False))
    # a shift delta in d dims: E[(theta . delta)^2] = |delta|^2 / d
    assert values[-1] == pytest.approx(4.0 / math.sqrt(2), rel=0.05)
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein(a, torch.zeros(10, 3))
