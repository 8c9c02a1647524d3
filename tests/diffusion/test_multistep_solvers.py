"""The multistep samplers (``DPMSolverPP2M``, ``DPMSolverPP3M``, ``UniPC``, ``DEIS``): their steps
are exact when the denoiser's output is a polynomial of the degree they claim (x0_hat in lambda;
DEIS: eps_hat in sigma), and they converge on the ring's exact denoiser at their order (the error
to a dopri5 solution from the same noise, as the steps double).

Observed orders (log2 of the mean error ratio, 20 -> 40 -> 80 steps, 2000 samples): 2M 1.9 and
1.9 (log-SNR grid), 2.2 and 1.9 (Karras); 3M 2.7 and 2.8 (log-SNR), 3.3 and 3.0 (Karras), and 3.0
from 80 to 160 log-SNR steps. With phi_3 D2 in place of 2 phi_3 D2 (D2 = h^2 p''/2) the 3M step
is not exact on quadratics, and its observed order falls to 2.3. The floors are the smaller
observed order less 0.3.

UniPC of order p (predictor UniP-p, corrector UniC-p) has order p + 1: observed (float64, 500
samples, dopri5 at 1e-11, log-SNR grid, 40 -> 80 -> 160 steps) 1.8 and 1.9 (p = 1), 2.5 and 2.9
(p = 2), 3.8 and 4.0 (p = 3); from 160 to 320 steps 1.9, 3.0, 4.0.

DEIS (rhoAB, Adams-Bashforth in sigma) of order k: observed (as 2M and 3M, 20 -> 40 -> 80 steps)
1.1 and 1.0 (k = 1), 1.7 and 1.8 (k = 2), 2.1 and 2.4 (k = 3) on the log-SNR grid; 1.0, 1.8 and
2.3 from 40 to 80 on the Karras grid.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from diffexp.diffusion.samplers import (
    DDIM,
    DEIS,
    DPMSolverPP2M,
    DPMSolverPP3M,
    UniPC,
    adams_bashforth_weights,
    multistep_x0,
    unipc_rhos,
)
from tests.helpers import oracle_denoiser, pf_ode_reference

N = 2000
ORDER_FLOOR = {
    ("DPMSolverPP2M", "log_snr"): 1.6,
    ("DPMSolverPP2M", "karras"): 1.6,
    ("DPMSolverPP3M", "log_snr"): 2.4,
    ("DPMSolverPP3M", "karras"): 2.7,
    ("DEIS-1", "log_snr"): 0.8,
    ("DEIS-2", "log_snr"): 1.4,
    ("DEIS-3", "log_snr"): 1.8,
    ("DEIS-3", "karras"): 1.6,
}
SAMPLERS = {
    "DPMSolverPP2M": DPMSolverPP2M,
    "DPMSolverPP3M": DPMSolverPP3M,
    **{f"DEIS-{k}": functools.partial(DEIS, order=k) for k in (1, 2, 3)},
}


def _exact_step_x0(coefficients: list[float], lam_t: float, lam_s: float, eta: float) -> float:
    """D with (1 - e^{-H}) D = int_0^h (1+eta) e^{-(1+eta)(h-u)} p(u) du, p(u) = sum c_k u^k,
    u = (lambda - lambda_t) / 2, by 30-point Gauss-Legendre (exact to float64 here)."""
    h = 0.5 * (lam_s - lam_t)
    nodes, weights = np.polynomial.legendre.leggauss(30)
    u = 0.5 * h * (nodes + 1.0)
    p = sum(c * u**k for k, c in enumerate(coefficients))
    integrand = (1.0 + eta) * np.exp(-(1.0 + eta) * (h - u)) * p
    integral = 0.5 * h * float(np.sum(weights * integrand))
    return integral / -math.expm1(-(1.0 + eta) * h)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("degree", [0, 1, 2])
def test_multistep_x0_is_exact_for_x0_hat_polynomial_in_log_snr(degree, eta):
    """With the x0_hat of points at unequal spacing in lambda on a polynomial of degree
    len(history) - 1, the step's D is the exact integral's (MATH.md s6, the exponential
    integrator in u = lambda/2)."""
    rng = np.random.default_rng(degree)
    coefficients = list(rng.normal(size=degree + 1))
    lam = [-3.0, -3.7, -4.9]  # lambda_t, then the earlier points, noisier
    lam_s = -1.6

    def p(lam_i: float) -> torch.Tensor:
        u = 0.5 * (lam_i - lam[0])
        return torch.tensor(
            [sum(c * u**k for k, c in enumerate(coefficients))], dtype=torch.float64
        )

    history = [(p(v), torch.tensor(v, dtype=torch.float64)) for v in lam[: degree + 1]]
    d = multistep_x0(history, torch.tensor(lam_s, dtype=torch.float64), eta)
    exact = _exact_step_x0(coefficients, lam[0], lam_s, eta)
    assert d.item() == pytest.approx(exact, rel=1e-12, abs=1e-12)
    if degree == 2:  # one point fewer is not exact on a quadratic: the test can fail
        fewer = multistep_x0(history[:2], torch.tensor(lam_s, dtype=torch.float64), eta)
        assert abs(fewer.item() - exact) > 1e-3


@pytest.fixture(scope="module")
def den():
    return oracle_denoiser("ring8", "eps")


@pytest.fixture(scope="module")
def reference(den):
    return pf_ode_reference(den, N)


@pytest.mark.parametrize("name,grid", sorted(ORDER_FLOOR))
def test_multistep_solvers_converge_at_their_order(den, reference, name, grid):
    errors = []
    for steps in (20, 40, 80):
        sampler = SAMPLERS[name](steps=steps, time_grid=grid, final_denoise=False)
        x = sampler.sample(den, (N, 2), generator=torch.Generator().manual_seed(0)).x
        errors.append((x - reference).norm(dim=1).mean().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(orders) >= ORDER_FLOOR[(name, grid)], (errors, orders)
    # at 80 steps, 2M: 7e-4 (log-SNR), 9e-4 (Karras); 3M: 2e-4, 4e-4; DEIS-1 (DDIM): 1e-2
    assert errors[-1] < (0.011 if name == "DEIS-1" else 2e-3)


@pytest.mark.parametrize("points", [1, 2, 3])
def test_adams_bashforth_weights_integrate_polynomials_of_degree_below_the_points_exactly(points):
    """sum_j w_j P(sigma_j) = int_{sigma_t}^{sigma_s} P for P of degree points - 1: DEIS's step is
    exact when eps_hat is such a polynomial in sigma."""
    coefficients = np.random.default_rng(points).normal(size=points)
    nodes = torch.tensor([1.0, 1.7, 2.9][:points], dtype=torch.float64)
    start, end = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    w = adams_bashforth_weights(nodes, start, end)
    values = sum(c * nodes**k for k, c in enumerate(coefficients))
    exact = sum(c * (0.4 ** (k + 1) - 1.0) / (k + 1) for k, c in enumerate(coefficients))
    assert (w * values).sum().item() == pytest.approx(exact, rel=1e-13, abs=1e-13)
    if points > 1:  # one node fewer is not exact: the test can fail
        fewer = adams_bashforth_weights(nodes[:-1], start, end)
        assert abs((fewer * values[:-1]).sum().item() - exact) > 1e-3


def test_deis_of_order_1_is_ddim():
    den = oracle_denoiser("ring8", "eps").double()
    like = {"generator": None, "dtype": torch.float64}
    a = DEIS(steps=7, order=1, final_denoise=False).sample(
        den, (64, 2), **{**like, "generator": torch.Generator().manual_seed(1)}
    )
    b = DDIM(steps=7, eta=0.0, time_grid="log_snr", final_denoise=False).sample(
        den, (64, 2), **{**like, "generator": torch.Generator().manual_seed(1)}
    )
    torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("points", [2, 3])
def test_unipc_rhos_make_the_step_exact_for_x0_hat_polynomial_in_log_snr(points, variant):
    """With D_k = (p(r_k h) - p(0)) / r_k for p of degree ``points`` (the corrector's last point at
    r = 1), (1 - e^{-h}) p(0) - B(h) sum_k rho_k D_k is the exact integral
    int_0^h e^{-(h-u)} p(u) du (for one point UniPC takes rho = 1/2, exact to first order only)."""
    coefficients = list(np.random.default_rng(points).normal(size=points + 1))
    h = 0.7
    rks = [-1.3, 1.0] if points == 2 else [-0.8, -2.1, 1.0]

    def p(u: float) -> float:
        return sum(c * u**k for k, c in enumerate(coefficients))

    diffs = torch.tensor([(p(r * h) - p(0.0)) / r for r in rks], dtype=torch.float64)
    h_t = torch.tensor(h, dtype=torch.float64)
    rhos, b_h = unipc_rhos(torch.tensor(rks, dtype=torch.float64), h_t, variant)
    d = p(0.0) + (b_h * (rhos * diffs).sum()).item() / math.expm1(-h)
    assert d == pytest.approx(_exact_step_x0(coefficients, 0.0, 2 * h, 0.0), rel=1e-12)
    fewer, b_fewer = unipc_rhos(torch.tensor(rks[:-1], dtype=torch.float64), h_t, variant)
    d_fewer = p(0.0) + (b_fewer * (fewer * diffs[:-1]).sum()).item() / math.expm1(-h)
    assert abs(d_fewer - d) > 1e-3  # a point fewer is not exact: the test can fail


UNIPC_ORDER_FLOOR = {1: 1.5, 2: 2.2, 3: 3.5}


@pytest.fixture(scope="module")
def reference64():
    den = oracle_denoiser("ring8", "eps").double()
    return den, pf_ode_reference(den, 500, tol=1e-11, dtype=torch.float64)


@pytest.mark.parametrize("order", sorted(UNIPC_ORDER_FLOOR))
def test_unipc_converges_at_order_p_plus_1(reference64, order):
    den, reference = reference64
    errors = []
    for steps in (40, 80, 160):
        sampler = UniPC(steps=steps, order=order, time_grid="log_snr", final_denoise=False)
        gen = torch.Generator().manual_seed(0)
        x = sampler.sample(den, (500, 2), generator=gen, dtype=torch.float64).x
        errors.append((x - reference).norm(dim=1).mean().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(orders) >= UNIPC_ORDER_FLOOR[order], (errors, orders)
