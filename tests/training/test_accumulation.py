"""Gradient accumulation and per-group gradient clipping.

Accumulation: k micro-batches of B (``trainer.accumulate_grad_batches=k``) must give the update of
one batch of kB when every example gets the same noise: the loss is a mean over examples (nats
per example for the ELBO), Lightning divides each micro-batch's loss by k, so the accumulated
gradient is (1/k) sum_i grad mean_B = grad mean_kB. Checked with SGD (its update is -lr grad, so a
wrong scale shows, which Adam's normalization would hide) and noise that is a function of the
example, so both runs draw the same noise per example.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from diffexp.build.checks import GRAD_CLIP_GROUPS, check_train
from diffexp.build.factory import ConfigError, build_datamodule, build_module
from diffexp.diffusion import elbo, loss
from diffexp.diffusion.noise_sampling import DrawnLevels, ScheduleTimes

B, K = 64, 4


class LevelsFromData(ScheduleTimes):
    """The schedule's density, with t a fixed function of the example (not of the batch)."""

    def draw(self, schedule, n, T=0, generator=None, like=None) -> DrawnLevels:
        u = torch.frac(like.flatten(1).sum(1).abs() * 1000.0).clamp(1e-3, 1 - 1e-3)
        return self.from_uniform(schedule, u, T)


def noise_from_data(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Noise that depends on the example only: the same in a batch of B and one of kB."""
    return torch.sin(x * 7919.0 + 0.5) * 1.4


def _trained_delta(compose, overrides: list[str], batch: int, k: int) -> list[torch.Tensor]:
    """The parameters' change (network and schedule) after one optimizer step."""
    cfg = compose(
        [
            "logger=none",
            "callbacks=none",
            "model.optimizer._target_=torch.optim.SGD",
            "model.optimizer.lr=0.1",
            "model.lr_scheduler=null",
            "model.ema_decay=null",
            f"data.batch_size={batch}",
            "data.n_train=1024",
            *overrides,
        ]
    )
    pl.seed_everything(0)
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    module.objective.noise_sampling = LevelsFromData()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(
        max_steps=1,
        accumulate_grad_batches=k,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    return [p.detach() - b for p, b in zip(module.parameters(), before, strict=True)]


@pytest.mark.parametrize(
    "overrides",
    [
        ["weighting=elbo"],  # -ELBO in nats per example: reconstruction, prior and diffusion
        ["experiment=sigmoid"],
        ["schedule=learned"],  # the schedule's variance gradient: per-example factors 2 L
    ],
    ids=lambda o: ",".join(o),
)
def test_k_micro_batches_give_the_update_of_one_batch_of_k_times_the_size(
    compose, monkeypatch, overrides
):
    monkeypatch.setattr(loss, "randn_like", noise_from_data)
    monkeypatch.setattr(elbo, "randn_like", noise_from_data)
    whole = _trained_delta(compose, overrides, K * B, 1)
    accumulated = _trained_delta(compose, overrides, B, K)
    assert sum(d.abs().sum() for d in whole) > 0
    for a, b in zip(accumulated, whole, strict=True):
        # float32 sums in another order: relative error ~ 1e-7 per addition, a few hundred terms
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _gradients_after_clipping(compose, grad_clip: str | None) -> tuple[dict, dict]:
    """(group -> gradient norm before, group -> after) of one backward pass on a learned
    schedule, clipped by ``configure_gradient_clipping``."""
    overrides = ["schedule=learned", "data.n_train=512", "data.batch_size=256"]
    if grad_clip is not None:
        overrides.append(f"model.grad_clip={grad_clip}")
    cfg = compose(overrides)
    check_train(cfg)
    pl.seed_everything(0)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    module = build_module(cfg, dm)
    module.trainer = pl.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    module._is_logging_step = lambda: False  # no fit loop to log into
    optimizer = module.configure_optimizers()["optimizer"]
    out = module.objective(module.denoiser, next(iter(dm.train_dataloader()))[0])
    out.loss.backward()
    names = [g["name"] for g in optimizer.param_groups]
    assert names == list(GRAD_CLIP_GROUPS)

    def norms() -> dict[str, float]:
        return {
            g["name"]: torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in g["params"]])
            ).item()
            for g in optimizer.param_groups
        }

    before = norms()
    module.configure_gradient_clipping(optimizer)
    return before, norms()


def test_grad_clip_clips_each_parameter_group_alone(compose):
    before, unclipped = _gradients_after_clipping(compose, None)
    assert unclipped == before
    c = before["network"] / 4  # the network's gradient is clipped to a quarter
    before, after = _gradients_after_clipping(compose, f"{{network:{c}}}")
    assert after["network"] == pytest.approx(c, rel=1e-5)
    assert after["schedule"] == before["schedule"]  # the schedule's gradient is not touched
    s = before["schedule"] / 2
    _, both = _gradients_after_clipping(compose, f"{{network:{c},schedule:{s}}}")
    assert both["network"] == pytest.approx(c, rel=1e-5)
    assert both["schedule"] == pytest.approx(s, rel=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.grad_clip=1.0"], "model.grad_clip=1.0 is not a mapping"),
        (["model.grad_clip={net:1.0}"], "no parameter group is called 'net'"),
        (["model.grad_clip={network:0}"], "model.grad_clip.network=0 is not a maximum norm"),
        (["model.grad_clip={network:abc}"], "model.grad_clip.network='abc' is not a maximum"),
    ],
)
def test_a_bad_grad_clip_is_refused_before_compute(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_train(compose(overrides))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.grad_clip={schedule:1.0}"], "has no trained parameters to clip"),
        (
            ["schedule=learned", "+trainer.gradient_clip_val=1.0"],
            r"model.grad_clip=\{network:1.0\}",
        ),
    ],
)
def test_clipping_that_cannot_work_is_refused_at_build_time(compose, overrides, message):
    cfg = compose(overrides)
    check_train(cfg)
    with pytest.raises(ConfigError, match=message):
        build_module(cfg, build_datamodule(cfg.data))


def test_the_default_config_clips_nothing(compose):
    cfg = compose([])
    assert OmegaConf.select(cfg, "model.grad_clip") is None
    assert not cfg.trainer.get("gradient_clip_val")
