"""The discretized Gaussian decoder: a proper distribution over the levels, stable, no offset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffexp.diffusion.discretized import (
    DiscretizedGaussianNLL,
    bin_centers,
    bin_log_probs,
    level_index,
)

F64 = torch.float64
MEANS = [-1e4, -50.0, -3.0, -1.0, -0.99, -0.3, 0.0, 0.123, 0.5, 1.0, 1.07, 4.0, 1e3]
LOG_SNRS = torch.linspace(-5.0, 15.0, 41, dtype=F64).tolist()


def _scipy_log_probs(mean: float, log_snr: float, num_levels: int) -> torch.Tensor:
    """The bin log-probabilities from scipy (cdf differences left of the mean, sf right of it)."""
    w = 2.0 / (num_levels - 1)
    edges = np.array([-np.inf, *(-1.0 + w * (np.arange(num_levels - 1) + 0.5)), np.inf])
    z = (edges - mean) / math.exp(-0.5 * log_snr)
    left = norm.cdf(z[1:]) - norm.cdf(z[:-1])
    right = norm.sf(z[:-1]) - norm.sf(z[1:])
    centre = 0.5 * (z[1:] + z[:-1])
    return torch.log(torch.as_tensor(np.where(centre < 0, left, right), dtype=F64))


@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_probabilities_over_all_bins_sum_to_one(num_levels):
    log_snr = torch.tensor([*LOG_SNRS, -30.0, 30.0], dtype=F64).unsqueeze(1)  # [L, 1]
    mean = torch.tensor(MEANS, dtype=F64).expand(len(log_snr), -1)  # [L, M]
    lp = bin_log_probs(mean, log_snr, num_levels)
    assert lp.shape == (len(log_snr), len(MEANS), num_levels)
    assert not torch.isnan(lp).any() and (lp <= 1e-12).all()
    total = torch.logsumexp(lp, dim=-1).exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


@pytest.mark.parametrize("num_levels", [17, 256])
def test_bin_log_probs_match_scipy(num_levels):
    for mean in (-1.2, -0.5, 0.0, 0.31, 0.9):
        for log_snr in (-5.0, 0.0, 4.0, 8.0):
            lp = bin_log_probs(torch.tensor([mean], dtype=F64), log_snr, num_levels)[0]
            ref = _scipy_log_probs(mean, log_snr, num_levels)
            ok = ref > -200
            assert torch.allclose(lp[ok], ref[ok], rtol=1e-6, atol=1e-9)


def test_per_example_log_snr_and_float32_agree_with_float64():
    mean = torch.linspace(-2.0, 2.0, 24).reshape(3, 8)
    lam = torch.tensor([-12.0, 2.0, 13.3])  # -12: narrow-bin (midpoint) branch in float32
    lp32 = bin_log_probs(mean, lam, 256)
    lp64 = bin_log_probs(mean.double(), lam.double(), 256)
    assert lp32.dtype == torch.float32 and lp32.shape == (3, 8, 256)
    relevant = lp64 > -40
    err = (lp32.double() - lp64).abs() / lp64.abs().clamp(min=1.0)
    assert err[relevant].max() < 1e-3
    # a per-example log-SNR is the same as one call per example
    for i in range(3):
        assert torch.allclose(lp64[i], bin_log_probs(mean[i].double(), lam[i].double(), 256))


def test_nll_is_minus_the_sum_of_the_chosen_bins():
    gen = torch.Generator().manual_seed(0)
    num_levels = 17
    k = torch.randint(0, num_levels, (5, 1, 4, 4), generator=gen)
    x0 = 2 * k.to(F64) / (num_levels - 1) - 1
    x0_hat = 1.5 * torch.randn(5, 1, 4, 4, generator=gen, dtype=F64)
    lam = torch.tensor([-5.0, 0.0, 5.0, 10.0, 15.0], dtype=F64)
    nll = DiscretizedGaussianNLL(num_levels)(x0, x0_hat, lam)
    all_bins = bin_log_probs(x0_hat, lam, num_levels)
    chosen = all_bins.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    assert nll.shape == (5,)
    assert torch.allclose(nll, -chosen.sum(dim=(1, 2, 3)), rtol=1e-12, atol=1e-12)
    # a 0-d log-SNR broadcasts over the batch
    nll0 = DiscretizedGaussianNLL(num_levels)(x0, x0_hat, lam[2])
    assert torch.allclose(nll0[2], nll[2])


def test_high_snr_on_a_bin_centre_gives_zero_nll():
    x0 = bin_centers(256, dtype=F64).reshape(2, 128)
    nll = DiscretizedGaussianNLL(256)(x0, x0.clone(), torch.tensor(15.0, dtype=F64))
    assert (nll >= 0).all() and (nll / 128 < 1e-10).all()
    # 8-bit data at VDM's endpoint: w/2 is h = 3.04 standard deviations; 2 tails cut off the
    # 254 inner bins, 1 tail off the 2 edge bins: about 0.0024 nats per dim
    nll = DiscretizedGaussianNLL(256)(x0, x0, torch.tensor(13.3, dtype=F64)).sum() / 256
    h = (1 / 255) * math.exp(13.3 / 2)
    expected = -(254 * math.log(1 - 2 * norm.sf(h)) + 2 * math.log(1 - norm.sf(h))) / 256
    assert nll.item() == pytest.approx(expected, rel=1e-9)


def test_stable_for_tiny_sigma_and_far_means_with_finite_gradients():
    num_levels = 256
    x0 = torch.tensor([[-1.0, -1.0, 0.0, 1.0, 1.0, 1 - 2 / 255]])
    x0_hat = torch.tensor([[-1.0, 5.0, 0.5, 1.0, -7.0, 1e3]], requires_grad=True)
    lam = torch.tensor(15.0, requires_grad=True)
    nll = DiscretizedGaussianNLL(num_levels)(x0, x0_hat, lam)
    nll.backward()
    assert torch.isfinite(nll).all() and nll.item() > 1e9
    assert torch.isfinite(x0_hat.grad).all() and torch.isfinite(lam.grad)
    # the gradient of the far-tail terms is (mean - v) SNR, accurate in float32
    snr = math.exp(15.0)
    assert x0_hat.grad[0, 5].item() == pytest.approx((1e3 - (1 - 2 / 255)) * snr, rel=1e-3)
    assert 0 < x0_hat.grad[0, 0].item() < 1e-6  # on the edge bin's centre: almost no pull
    for log_snr in (-40.0, -12.0, 0.0, 30.0):
        lam = torch.tensor(log_snr, requires_grad=True)
        mean = 3 * torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        mean.requires_grad_(True)
        data = torch.randint(0, 256, (4, 3, 4, 4), generator=torch.Generator().manual_seed(2))
        out = DiscretizedGaussianNLL(num_levels)(2 * data / 255 - 1, mean, lam)
        out.sum().backward()
        assert torch.isfinite(out).all() and (out >= 0).all()
        assert torch.isfinite(mean.grad).all() and torch.isfinite(lam.grad)


def test_gradient_matches_finite_differences():
    x0 = bin_centers(17, dtype=F64)[[0, 3, 8, 16, 11]].reshape(1, 5)
    x0_hat = torch.tensor([[-0.9, -0.6, 0.05, 0.7, 2.0]], dtype=F64, requires_grad=True)
    lam = torch.tensor(6.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(DiscretizedGaussianNLL(17), (x0, x0_hat, lam))


def test_bits_per_dim_of_samples_match_the_entropy():
    """Data drawn from the decoder's own distribution: bits/dim -> its entropy, with no offset."""
    num_levels, d, n = 17, 16, 4000
    mean, lam = torch.tensor(0.2, dtype=F64), torch.tensor(3.0, dtype=F64)
    p = bin_log_probs(mean.reshape(1), lam, num_levels)[0].exp()
    entropy_bits = -(p * torch.log2(p)).sum().item()
    gen = torch.Generator().manual_seed(0)
    k = torch.multinomial(p, n * d, replacement=True, generator=gen).reshape(n, 1, 4, 4)
    x0 = 2 * k.to(F64) / (num_levels - 1) - 1
    nll = DiscretizedGaussianNLL(num_levels)(x0, torch.full_like(x0, 0.2), lam)
    bits_per_dim = nll / (d * math.log(2))
    stderr = bits_per_dim.std().item() / math.sqrt(n)
    assert abs(bits_per_dim.mean().item() - entropy_bits) < 4 * stderr
    # huge sigma (the narrow-bin branch): the inner bins are equally likely
    flat = bin_log_probs(torch.zeros(1, dtype=F64), -30.0, num_levels)[0]
    inner = flat[1:-1].exp()
    assert torch.allclose(inner, inner.mean(), rtol=1e-6)


def test_level_index_and_bin_centres_round_trip():
    for num_levels in (2, 17, 256):
        v = bin_centers(num_levels, dtype=torch.float32)
        assert v[0] == -1 and v[-1] == 1
        assert torch.equal(level_index(v, num_levels), torch.arange(num_levels))
        assert torch.equal(
            level_index(torch.tensor([-3.0, 3.0]), num_levels)[[0, 1]],
            torch.tensor([0, num_levels - 1]),
        )
    with pytest.raises(ValueError, match="num_levels"):
        DiscretizedGaussianNLL(1)
