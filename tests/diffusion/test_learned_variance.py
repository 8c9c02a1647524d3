"""VDM's procedure for a learned schedule: the interior minimizes the diffusion term's variance."""

from __future__ import annotations

import pytest
import torch

from diffexp.build.factory import build_datamodule, build_module
from diffexp.cli import ConfigError
from diffexp.data.mixtures import make_mixture
from diffexp.diffusion import schedules as S
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import elbo_terms
from diffexp.diffusion.parameterizations import Eps
from diffexp.diffusion.weighting import ELBO
from diffexp.networks import MLP
from diffexp.training.diffusion_module import DiffusionModule
from tests.helpers import F64, oracle_denoiser


def _module(network=None, hidden: int = 16, seed: int = 0) -> DiffusionModule:
    """A module training a variance-objective learned schedule (float64), with the oracle as
    its network unless one is given."""
    torch.manual_seed(seed)
    schedule = S.Learned(10.0, -8.0, hidden=hidden, interior_objective="variance").double()
    if network is None:
        den = oracle_denoiser("ring8", schedule=schedule)
    else:
        den = Denoiser(network, Eps(), schedule).double()
    module = DiffusionModule(den, ELBO(), optimizer=torch.optim.Adam, ema_decay=None)
    module._is_logging_step = lambda: False
    return module


def _data(n: int, seed: int) -> torch.Tensor:
    mixture = make_mixture("ring8").to(dtype=F64)
    return mixture.sample(n, generator=torch.Generator().manual_seed(seed))[0]


def _step(module: DiffusionModule, x: torch.Tensor, seed: int) -> torch.Tensor:
    """One training step's loss, its noise drawn from ``seed``."""
    module._noise_generator = torch.Generator().manual_seed(seed)
    return module.training_step((x,), 0)


def test_training_step_gives_the_interior_the_gradient_of_the_mean_squared_loss():
    """Interior: d mean(L^2); endpoints and network: d loss, from the loss's backward pass."""
    torch.manual_seed(0)
    network = MLP(dim=2, width=32, depth=2)
    torch.nn.init.normal_(network.out[1].weight, std=0.1)  # zero-initialized: give it a slope
    module = _module(network)
    schedule, x = module.schedule, _data(256, 0)
    interior = schedule.interior_parameters()
    others = [schedule.log_snr_max, schedule.log_snr_min, *network.parameters()]
    # the reference: the same noise, plain autograd on the two objectives
    out = module.objective(module.denoiser, x, generator=torch.Generator().manual_seed(0))
    want_interior = torch.autograd.grad(
        (out.diffusion**2).mean(), interior, retain_graph=True, allow_unused=True
    )
    want_others = torch.autograd.grad(out.loss, others)
    loss = _step(module, x, seed=0)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-12)  # the value is the ELBO's
    loss.backward()
    for p, g in zip(interior, want_interior, strict=True):
        expected = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12)
    assert any(p.grad.abs().max() > 0 for p in network.parameters())
    for p, g in zip(others, want_others, strict=True):  # endpoints and network follow the ELBO
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


def test_a_missing_scale_is_a_clear_error():
    module = _module()
    with module.schedule.scaled_interior_gradient():
        out = module.objective(module.denoiser, _data(8, 0))
    with pytest.raises(RuntimeError, match="set holder.scale to one factor per example"):
        out.loss.backward()


def _stats(module: DiffusionModule, x: torch.Tensor) -> tuple[float, float, float]:
    with torch.no_grad():
        terms = elbo_terms(module.denoiser, x, n_t=1, generator=torch.Generator().manual_seed(9))
    n = x.shape[0]
    return terms.nll.mean().item(), terms.nll.std().item() / n**0.5, terms.diffusion.std().item()


def test_training_the_interior_lowers_the_variance_and_keeps_the_elbo():
    """On the exact denoiser only the schedule moves: VDM's bound stays, its noise drops."""
    module = _module(hidden=64)
    x_eval = _data(20_000, 1)
    nll0, se0, std0 = _stats(module, x_eval)
    opt = torch.optim.Adam(module.schedule.interior_parameters(), lr=3e-2)
    for step in range(600):  # the gradient of mean(L^2) is noisy: enough steps to see a trend
        loss = _step(module, _data(512, 100 + step), seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    nll1, se1, std1 = _stats(module, x_eval)
    assert std1 < 0.9 * std0, (std0, std1)
    assert abs(nll1 - nll0) < 4 * (se0**2 + se1**2) ** 0.5


def test_learned_schedule_rejects_unknown_interior_objectives():
    with pytest.raises(ValueError, match="valid: elbo, variance"):
        S.Learned(interior_objective="entropy")


@pytest.mark.parametrize(
    "override, message",
    [("weighting=unit", "use weighting=elbo"), ("model.T=1000", "needs continuous time")],
)
def test_variance_objective_needs_the_continuous_elbo(compose, override, message):
    cfg = compose(["schedule=learned_min_variance", override])
    with pytest.raises(ConfigError, match=message):
        build_module(cfg, build_datamodule(cfg.data))
