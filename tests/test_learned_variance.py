"""VDM's procedure for a learned schedule: the interior minimizes the diffusion term's variance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion import schedules as S
from diffexp.diffusion.elbo import elbo_terms
from diffexp.diffusion.weighting import ELBO
from diffexp.factory import ConfigError, build_datamodule, build_module
from diffexp.module import DiffusionModule
from tests.helpers import F64, oracle_denoiser

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _module(hidden: int = 16, seed: int = 0) -> DiffusionModule:
    torch.manual_seed(seed)
    schedule = S.Learned(10.0, -8.0, hidden=hidden, interior_objective="variance").double()
    den = oracle_denoiser("ring8", schedule=schedule)
    module = DiffusionModule(den, ELBO(), optimizer=torch.optim.Adam, ema_decay=None)
    module._is_logging_step = lambda: False
    return module


def _data(n: int, seed: int) -> torch.Tensor:
    mixture = make_mixture("ring8").to(dtype=F64)
    return mixture.sample(n, generator=torch.Generator().manual_seed(seed))[0]


def test_surrogate_turns_the_interior_gradient_into_that_of_the_mean_squared_loss():
    module = _module()
    schedule = module.schedule
    out = module.weighting(
        module.denoiser, _data(256, 0), generator=torch.Generator().manual_seed(0)
    )
    surrogate = module._interior_variance_surrogate(out)
    assert surrogate.item() == 0.0
    interior = schedule.interior_parameters()
    ends = [schedule.log_snr_max, schedule.log_snr_min]
    want_interior = torch.autograd.grad(
        (out.diffusion**2).mean(), interior, retain_graph=True, allow_unused=True
    )
    want_ends = torch.autograd.grad(out.loss, ends, retain_graph=True)
    (out.loss + surrogate).backward()
    for p, g in zip(interior, want_interior, strict=True):
        expected = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12)
    for p, g in zip(ends, want_ends, strict=True):  # the endpoints still follow the ELBO
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


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
    gen = torch.Generator().manual_seed(2)
    for step in range(300):
        out = module.weighting(module.denoiser, _data(512, 100 + step), generator=gen)
        loss = out.loss + module._interior_variance_surrogate(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    nll1, se1, std1 = _stats(module, x_eval)
    assert std1 < 0.9 * std0, (std0, std1)
    assert abs(nll1 - nll0) < 4 * (se0**2 + se1**2) ** 0.5


def test_learned_schedule_rejects_unknown_interior_objectives():
    with pytest.raises(ValueError, match="valid: elbo, variance"):
        S.Learned(interior_objective="entropy")


def test_variance_objective_needs_the_elbo_weighting(tmp_path):
    overrides = ["schedule=learned_min_variance", "weighting=unit", f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ConfigError, match="use weighting=elbo"):
        build_module(cfg, build_datamodule(cfg.data))
