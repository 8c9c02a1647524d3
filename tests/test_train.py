"""Training end to end: fast_dev_run combinations in-process, a real run as a subprocess,
eval and sample on its folder, and the errors a user meets first."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from diffexp.build.factory import build_module
from diffexp.data.datamodules import VectorDataModule
from diffexp.train import train
from diffexp.training.diffusion_module import NonFiniteLossError
from tests.helpers import ROOT, conf_options

COMBOS = [
    ["parameterization=x0", "weighting=elbo", "schedule=cosine"],
    ["parameterization=eps", "weighting=unit", "schedule=linear", "data=moons"],
    ["parameterization=score", "weighting=min_snr", "schedule=learned", "data=grid25"],
    ["parameterization=v", "weighting=elbo", "schedule=log_linear", "model.T=100"],
    ["parameterization=eps", "weighting=elbo", "schedule=learned", "data=mixture1d"],
    ["data=swissroll", "weighting=unit", "model.T=50"],
    ["experiment=ring8_discrete"],
    ["experiment=edm"],
    ["experiment=rectified_flow"],
    ["experiment=rectified_flow_logit_normal"],
    ["experiment=sigmoid", "schedule=cosine"],
    ["weighting=min_snr", "noise_sampling=logit_normal", "parameterization=flow"],
    ["experiment=edm", "data=digits", "network=unet_small"],
    ["experiment=rectified_flow_logit_normal", "data=digits", "network=unet_small"],
    ["experiment=sigmoid", "data=digits", "network=unet_small"],
]


@pytest.mark.parametrize("overrides", COMBOS, ids=lambda o: ",".join(o))
def test_fast_dev_run(compose, overrides):
    cfg = compose(["debug=fdr", *overrides])
    train(cfg)


def test_oracle_validates_without_training(compose, tmp_path):
    cfg = compose(["network=oracle", "logger=csv", "+trainer.limit_val_batches=1"])
    metrics = train(cfg)
    assert abs(metrics["val/elbo_gap_nats"]) < 0.5  # one batch, 16 times per example
    assert (tmp_path / "summary.json").is_file()


def test_nan_loss_stops_with_the_step_and_the_term(compose):
    cfg = compose(["debug=fdr"])
    x = torch.randn(64, 2)
    x[3, 0] = float("nan")
    dm = VectorDataModule(x, x[:8], x[:8], batch_size=64)
    module = build_module(cfg, dm)
    trainer = pl.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False)
    with pytest.raises(NonFiniteLossError, match=r"step 0.*offending term"):
        trainer.fit(module, datamodule=dm)


@pytest.mark.parametrize("deferred", [False, True], ids=["at-once", "deferred"])
def test_nan_loss_names_its_step_whether_checked_at_once_or_deferred(compose, tmp_path, deferred):
    """On an accelerator the step does not sync: the first non-finite loss is kept on the device
    and checked on logging steps, before checkpoints and at the end. Either way the error names
    the step of the first NaN, and no checkpoint holds the weights after it."""
    import re

    from diffexp.training.callbacks import LastCheckpoint

    class Defer(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module._defer_finite_check = deferred

    cfg = compose(["debug=fdr"])
    x = torch.randn(64, 2)
    x[37, 0] = float("nan")  # one batch of 8 holds it
    dm = VectorDataModule(x, x[:8], x[:8], batch_size=8)
    module = build_module(cfg, dm)
    last = LastCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2)
    trainer = pl.Trainer(
        max_steps=20,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=True,
        callbacks=[Defer(), last],
        log_every_n_steps=50,
        limit_val_batches=0,
    )
    with pytest.raises(NonFiniteLossError, match=r"offending term") as err:
        trainer.fit(module, datamodule=dm)
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert step < 8  # the first epoch's batches hold the NaN
    if (tmp_path / "last.ckpt").exists():
        saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
        assert saved["global_step"] <= step
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_wandb_run_is_finished_after_an_exception(compose):
    import wandb

    cfg = compose(
        ["logger=wandb", "callbacks=none", "trainer.max_steps=2", "model.optimizer.lr=nan"],
    )
    with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is the cleanup
        train(cfg)
    assert wandb.run is None


def _run(args, cwd, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_train_eval_sample_as_a_user_would(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(["diffexp.train", "debug=short", f"hydra.run.dir={run_dir}"], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation ELBO" in proc.stdout and "true log-likelihood" in proc.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert (run_dir / "samples" / "final.png").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"
    assert (run_dir / ".hydra" / "config.yaml").is_file()

    eval_dir = tmp_path / "eval"
    proc = _run(
        [
            "diffexp.eval",
            f"run={run_dir}",
            f"hydra.run.dir={eval_dir}",
            "n_t=4",
            "n_samples=500",
            "sampler.steps=50",
        ],
        ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for key in (
        "elbo_nats",
        "bpd",
        "reconstruction_nats",
        "prior_nats",
        "diffusion_nats",
        "true_log_likelihood_nats",
        "sample_mean_log_density_nats",
        "sliced_wasserstein",
        "sliced_wasserstein_floor",
    ):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    total = metrics["reconstruction_nats"] + metrics["prior_nats"] + metrics["diffusion_nats"]
    assert metrics["elbo_nats"] == pytest.approx(-total, abs=1e-6)

    sample_dir = tmp_path / "sample"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = _run(
        [
            "diffexp.sample",
            f"ckpt={ckpt}",
            f"hydra.run.dir={sample_dir}",
            "n_samples=300",
            "steps=20",
        ],
        ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import numpy as np

    data = np.load(sample_dir / "samples.npz")
    assert data["x"].shape == (300, 2) and int(data["nfe"]) == 21
    assert (sample_dir / "samples.png").is_file()


# the commands the README shows for the objectives, each as its smoke test from the command line
SMOKE = [
    [],
    ["experiment=edm"],
    ["experiment=rectified_flow"],
    ["weighting=sigmoid", "noise_sampling=lognormal"],
]
# every debug option from the command line: fdr with each objective command, the others alone
# (short is the training of test_train_eval_sample_as_a_user_would, also a subprocess)
DEBUG_OPTIONS = conf_options("debug")
DEBUG_RUNS = [("fdr", o) for o in SMOKE] + [
    (d, []) for d in DEBUG_OPTIONS if d not in ("fdr", "short")
]


@pytest.mark.parametrize(
    ("option", "overrides"),
    DEBUG_RUNS,
    ids=[f"{d}-{','.join(o) or 'default'}" for d, o in DEBUG_RUNS],
)
def test_every_debug_option_exits_0_from_the_command_line(option, overrides, tmp_path):
    args = ["diffexp.train", *overrides, f"debug={option}", f"hydra.run.dir={tmp_path}"]
    proc = _run(args, ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "implied_weighting.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["edm", "rectified_flow"])
def test_objective_presets_train_evaluate_and_sample_from_the_command_line(preset, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"experiment={preset}", "debug=short", f"hydra.run.dir={run_dir}"]
    proc = _run(["diffexp.train", *args], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation ELBO" in proc.stdout
    eval_dir = tmp_path / "eval"
    args = [f"run={run_dir}", f"hydra.run.dir={eval_dir}", "n_t=4", "n_samples=500", "steps=20"]
    proc = _run(["diffexp.eval", *args], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("elbo_nats", "sample_kl_nats", "sample_kl_floor_nats"):
        assert metrics[key] == metrics[key], key  # present and not NaN
    assert math.isfinite(metrics["elbo_nats"]) and math.isfinite(metrics["sample_kl_nats"])
    # 200 steps (all of them learning-rate warm-up) is no trained model: its samples are worse
    # than exact ones, whose KL is the floor (0.040 +- 0.008 at n = 500 ... 2000)
    assert 0 < metrics["sample_kl_floor_nats"] < 0.15 < metrics["sample_kl_nats"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = _run(["diffexp.eval", f"ckpt={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path}/e"], ROOT)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr


def test_unknown_option_from_the_command_line_lists_valid_ones(tmp_path):
    proc = _run(["diffexp.train", "parameterization=noise", f"hydra.run.dir={tmp_path}"], ROOT)
    assert proc.returncode != 0
    assert "Available options" in proc.stderr
    for valid in ("eps", "score", "v", "x0"):
        assert valid in proc.stderr


def test_the_implied_weighting_is_logged_to_the_run_folder_and_wandb(compose, tmp_path):
    cfg = compose(["logger=wandb", "callbacks=none", "trainer.max_steps=1"])
    train(cfg)
    assert (tmp_path / "implied_weighting.png").is_file()
    assert (tmp_path / "implied_weighting.json").is_file()
    logged = list(tmp_path.glob("wandb/offline-run-*/files/media/images/objective/*.png"))
    assert len(logged) == 1, logged


def test_console_scripts_find_the_configs_and_exit_as_python_m_does(tmp_path):
    """``diffexp-train`` etc. (installed by pip) compose the same configs as ``python -m``."""
    scripts = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["WANDB_MODE"] = "offline"

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(scripts / name), *args], env=env, capture_output=True, text=True, timeout=300
        )

    proc = script("diffexp-train", "debug=fdr", f"hydra.run.dir={tmp_path / 'train'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = script("diffexp-eval", "split=foo", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 2 and "error: split='foo'" in proc.stderr, proc.stderr[-3000:]
    for name in ("diffexp-sample", "diffexp-train-classifier", "diffexp-train-features"):
        proc = script(name, "--cfg", "job")  # composes the config and prints it
        assert proc.returncode == 0 and "seed" in proc.stdout, (name, proc.stderr[-3000:])
    for name in ("diffexp-compare", "diffexp-objectives"):  # argparse entry points
        proc = script(name, "--help")
        assert proc.returncode == 0 and f"python -m diffexp.{name[8:]}" in proc.stdout, name
