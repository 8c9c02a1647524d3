"""Post-hoc EMA (EDM2): the power-function profile and its width, the least-squares
reconstruction against EMAs computed directly from every step's weights, the snapshot callback
(files, checkpointed state, exact resume in a real run) and evaluation of a reconstruction."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from diffexp.build.runs import posthoc_ema_plan
from diffexp.cli import ConfigError
from diffexp.training.callbacks import PostHocEMASnapshots
from diffexp.training.posthoc_ema import (
    SIGMA_REL_MAX,
    PowerEMA,
    gamma_to_sigma_rel,
    plan_reconstruction,
    posthoc_coefficients,
    power_beta,
    power_ema_weights,
    profile_inner,
    read_snapshots,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_files,
    snapshot_path,
)
from tests.helpers import ROOT, compose_config


# ---------------------------------------------------------------------- the profile
def test_sigma_rel_and_gamma_round_trip_and_edm2s_values():
    for gamma in (-0.38, 0.0, 0.5, 1.0, 3.0, 6.94, 16.97, 100.0, 1e4):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)
    for s in (1e-3, 0.01, 0.05, 0.1, 0.2, 0.29, SIGMA_REL_MAX):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    # EDM2 (section 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    # gamma = 0 is the uniform average over [0, t]: sigma_rel = sqrt(1/12)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))
    for bad in (0.0, -0.1, 0.31):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


def test_the_power_ema_is_the_weighted_average_of_every_steps_weights():
    """theta_hat(t) = sum_tau w_tau theta(tau): the tracker against the closed-form weights."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Linear(3, 2).double()
    tracker = PowerEMA(sigma_rels=(0.05, 0.10))
    trajectory = []
    for _ in range(300):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        trajectory.append(net.weight.detach().clone())
        tracker.update(net)
    theta = torch.stack(trajectory).numpy()  # (t, 2, 3)
    for gamma, avg in zip(tracker.gammas, tracker.averages, strict=True):
        w = power_ema_weights(gamma, 300)
        assert w.sum() == pytest.approx(1.0, abs=1e-12) and w[0] > 0
        direct = np.tensordot(w, theta, axes=1)
        np.testing.assert_allclose(avg["weight"].numpy(), direct, rtol=0, atol=1e-10)
    assert power_beta(6.94, 1) == 0.0  # the first update copies


def test_the_closed_form_inner_products_match_quadrature():
    cases = [(1000, 6.94, 1000, 16.97), (400, 16.97, 1000, 6.94), (700, 2, 300, 5)]
    for t_a, g_a, t_b, g_b in cases:
        tau = np.linspace(0, min(t_a, t_b), 1_000_001)  # the product is 0 beyond the shorter

        def p(t, g, tau=tau):
            return (g + 1) * tau**g / t ** (g + 1)

        numeric = np.trapezoid(p(t_a, g_a) * p(t_b, g_b), tau)
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-6)
        assert profile_inner(t_b, g_b, t_a, g_a) == pytest.approx(numeric, rel=1e-6)


# ---------------------------------------------------------------------- reconstruction
N_STEPS, EVERY = 4000, 25


@pytest.fixture(scope="module")
def noisy_sgd(tmp_path_factory):
    """4000 steps of noisy SGD towards a drifting target (float64, 32 weights): every step's
    weights, and the two EDM2 power EMAs snapshotted every 25 steps to files."""
    folder = tmp_path_factory.mktemp("posthoc_ema")
    gen = torch.Generator().manual_seed(0)
    net = nn.Linear(32, 1, bias=False).double()
    tracker = PowerEMA()
    theta = torch.zeros(32, dtype=torch.float64)
    trajectory = np.zeros((N_STEPS, 32))
    for t in range(1, N_STEPS + 1):
        with torch.no_grad():
            target = torch.full((32,), 3.0 * t / N_STEPS, dtype=torch.float64)
            theta += -0.01 * (theta - target) + 0.1 * torch.randn(32, generator=gen).double()
            net.weight.copy_(theta[None])
        trajectory[t - 1] = theta.numpy()
        tracker.update(net)
        if t % EVERY == 0:
            torch.save(tracker.snapshot(t), snapshot_path(folder, t))
    return folder, trajectory, tracker.gammas


def _reconstruction_error(noisy_sgd, sigma_rel: float, every: int) -> tuple[float, float, float]:
    """(|reconstruction - direct EMA|, |nearest stored EMA - direct EMA|, profile residual) at
    the last step, from the snapshots every ``every`` steps."""
    folder, trajectory, gammas = noisy_sgd
    snaps = [s for s in read_snapshots(folder) if s.step % every == 0]
    x, residual, t = plan_reconstruction(snaps, sigma_rel)
    assert t == N_STEPS
    rec = reconstruct(snaps, x)["weight"].numpy()[0]
    direct = power_ema_weights(sigma_rel_to_gamma(sigma_rel), N_STEPS) @ trajectory
    stored = [power_ema_weights(g, N_STEPS) @ trajectory for g in gammas]
    nearest = min(np.linalg.norm(s - direct) for s in stored)
    return float(np.linalg.norm(rec - direct)), float(nearest), residual


@pytest.mark.parametrize("sigma_rel", [0.07, 0.04, 0.12])  # inside, and outside on either side
def test_reconstruction_matches_the_ema_computed_from_every_steps_weights(noisy_sgd, sigma_rel):
    error, nearest, residual = _reconstruction_error(noisy_sgd, sigma_rel, every=50)
    # 80 snapshots: the closed-form profile residual is < 0.1 % (EDM2's continuous profiles vs
    # the discrete ones differ only in the first few steps, where the weights are ~0)
    assert residual < 1e-3
    # the reconstruction must be 100x closer to the target EMA than the nearest stored EMA is
    # (that distance is the scale of what choosing sigma_rel changes); measured: <= 1/2500
    assert error < 0.01 * nearest, (error, nearest)


def test_the_reconstruction_error_shrinks_as_snapshots_get_denser(noisy_sgd):
    for sigma_rel in (0.04, 0.07):
        errors = [_reconstruction_error(noisy_sgd, sigma_rel, every)[0] for every in (400, 100, 25)]
        residuals = [
            _reconstruction_error(noisy_sgd, sigma_rel, every)[2] for every in (400, 100, 25)
        ]
        # the profile's residual is second order in the spacing (4x denser: ~16x smaller);
        # at least 4x smaller per 4x denser is asserted, for the weights and the profile alike
        assert errors[1] < errors[0] / 4 and errors[2] < errors[1] / 4, errors
        assert residuals[1] < residuals[0] / 4 and residuals[2] < residuals[1] / 4, residuals


def test_a_stored_profile_is_reconstructed_as_itself():
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    t_in = [t for t in range(100, 1001, 100) for _ in gammas]
    g_in = gammas * 10
    x, residual = posthoc_coefficients(t_in, g_in, 1000, gammas[1])
    expected = np.zeros(len(x))
    expected[-1] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert residual < 1e-6


# ---------------------------------------------------------------------- the callback
class _Holder(nn.Module):
    """A LightningModule's stand-in: the callback reads ``denoiser``."""

    def __init__(self) -> None:
        super().__init__()
        self.denoiser = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _step(holder: _Holder, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in holder.denoiser.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        holder.denoiser[1].running_mean.add_(1.0)
        holder.denoiser[1].num_batches_tracked.add_(1)


def test_the_callback_writes_snapshots_and_its_state_survives_a_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(1)
    holder = _Holder()
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    callback = PostHocEMASnapshots(str(tmp_path / "posthoc_ema"), every_n_steps=3)
    for step in range(1, 8):
        _step(holder, gen)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, holder, None, None, step - 1)
        callback.on_train_batch_end(trainer, holder, None, None, step - 1)  # accumulating: no-op
    assert [p.name for p in snapshot_files(tmp_path / "posthoc_ema")] == [
        "snapshot_00000003.pt",
        "snapshot_00000006.pt",
    ]
    assert not list((tmp_path / "posthoc_ema").glob("*.tmp"))
    saved = torch.load(tmp_path / "posthoc_ema" / "snapshot_00000006.pt", weights_only=True)
    assert saved["step"] == saved["t"] == 6 and len(saved["averages"]) == 2
    assert set(saved["averages"][0]) == set(holder.denoiser.state_dict())
    assert saved["averages"][0]["1.num_batches_tracked"] == 6  # not averaged: copied

    # the checkpoint round trip (torch.save, weights-only load), then both continue alike
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    resumed = PostHocEMASnapshots(str(tmp_path / "resumed"), every_n_steps=3)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.tracker.t == 7
    for step in (8, 9):
        _step(holder, gen)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, holder, None, None, 0)
        resumed.on_train_batch_end(trainer, holder, None, None, 0)
    for a, b in zip(callback.tracker.averages, resumed.tracker.averages, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    resumed.on_train_end(trainer, holder)  # step 9 was a snapshot step: nothing more
    assert [p.name for p in snapshot_files(tmp_path / "resumed")] == ["snapshot_00000009.pt"]
    with pytest.raises(ValueError, match="sigma_rels the run was started with"):
        PostHocEMASnapshots(str(tmp_path), sigma_rels=(0.2,)).load_state_dict(callback.state_dict())


# ---------------------------------------------------------------------- a real run
TRAIN = [
    "debug=short",
    "callbacks=posthoc_ema",
    "callbacks.posthoc_ema.every_n_steps=4",
    "callbacks.last_checkpoint.every_n_train_steps=null",
    "callbacks.samples.n=16",
    "callbacks.samples.sampler.steps=2",
    "trainer.max_steps=24",
    "data.n_train=2048",  # 4 steps an epoch: last.ckpt at steps 4, 8, ...
    "trainer.check_val_every_n_epoch=100",
    "model.ema_warmup={inv_gamma:1.0,power:0.75}",
    "logger=csv",
]


def _train(run_dir: Path, *extra: str) -> None:
    from diffexp.train import train

    train(compose_config("train", [*TRAIN, f"paths.output_dir={run_dir}", *extra]))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    _train(run_dir)
    return run_dir


def test_a_run_killed_and_resumed_writes_the_snapshots_and_ema_of_the_uninterrupted_one(
    trained_run, tmp_path
):
    crash = "+callbacks.crash={_target_:tests.helpers.CrashAtStep,step:14}"  # after step 12's
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path, crash)
    _train(tmp_path, "ckpt_path=auto")
    names = [p.name for p in snapshot_files(trained_run / "posthoc_ema")]
    assert names == [f"snapshot_{s:08d}.pt" for s in range(4, 25, 4)]
    assert [p.name for p in snapshot_files(tmp_path / "posthoc_ema")] == names
    for name in names:
        full = torch.load(trained_run / "posthoc_ema" / name, weights_only=True)
        resumed = torch.load(tmp_path / "posthoc_ema" / name, weights_only=True)
        assert full["t"] == resumed["t"] == full["step"]
        for a, b in zip(full["averages"], resumed["averages"], strict=True):
            for k in a:
                assert torch.equal(a[k], b[k]), (name, k)
    full = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for k, v in full["state_dict"].items():  # the warmed-up EMA too
        assert torch.equal(v, resumed["state_dict"][k]), k


def _eval_cfg(run_dir: Path, out: Path, *extra: str):
    return compose_config(
        "eval", [f"run={run_dir}", f"paths.output_dir={out}", "n_t=2", "n_samples=0", *extra]
    )


def test_eval_replaces_the_weights_with_the_reconstruction(trained_run, tmp_path):
    from diffexp.build.runs import load_model
    from diffexp.eval import evaluate

    # a tracked sigma_rel at the last snapshot is that snapshot's EMA itself
    model = load_model(_eval_cfg(trained_run, tmp_path, "ema.sigma_rel=0.10"))
    snap = torch.load(trained_run / "posthoc_ema" / "snapshot_00000024.pt", weights_only=True)
    for k, v in model.denoiser.state_dict().items():
        torch.testing.assert_close(v, snap["averages"][1][k], rtol=0, atol=1e-6)
    assert model.posthoc_ema["step"] == 24 and model.posthoc_ema["n_snapshots"] == 6
    metrics = evaluate(_eval_cfg(trained_run, tmp_path, "ema.sigma_rel=0.07"))
    assert metrics["posthoc_ema"]["sigma_rel"] == 0.07
    assert metrics["posthoc_ema"]["profile_error"] < 0.05
    assert math.isfinite(metrics["elbo_nats"])


@pytest.mark.parametrize(
    "extra,words",
    [
        (["ema.sigma_rel=0.5"], "ema.sigma_rel=0.5 is out of range"),
        (["ema.sigma_rel=-0.05"], "ema.sigma_rel=-0.05 is out of range"),
        (["ema.sigma_rel=0.005"], "ema.sigma_rel=0.005: the 6 snapshots"),  # 6 can't make it
        (["ema.sigma_rel=0.05", "use_ema=false"], "use_ema=false"),
        (["ema.sigma_rel=0.05", "ema.max_error=0"], "ema.max_error=0 is not a number > 0"),
    ],
)
def test_bad_ema_requests_are_refused_before_compute(trained_run, tmp_path, extra, words):
    with pytest.raises(ConfigError) as err:
        posthoc_ema_plan(_eval_cfg(trained_run, tmp_path, *extra))
    assert words in str(err.value)
    assert "\n" not in str(err.value)  # one paragraph


def test_a_run_without_snapshots_or_no_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="callbacks=posthoc_ema") as err:
        posthoc_ema_plan(_eval_cfg(tmp_path / "run", tmp_path, "ema.sigma_rel=0.05"))
    assert "ema.sigma_rel=0.05" in str(err.value) and "does not exist" in str(err.value)
    cfg = compose_config("eval", [f"paths.output_dir={tmp_path}", "ema.sigma_rel=0.05"])
    with pytest.raises(ConfigError, match="no run is given"):
        posthoc_ema_plan(cfg)
    assert posthoc_ema_plan(compose_config("eval", [f"paths.output_dir={tmp_path}"])) is None


def test_the_command_line_refuses_a_run_without_snapshots_with_exit_2(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")  # never read
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffexp.eval",
            f"run={tmp_path / 'run'}",
            "ema.sigma_rel=0.05",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: ema.sigma_rel=0.05 needs the run's post-hoc EMA snapshots" in proc.stderr
    assert "Traceback" not in proc.stderr
