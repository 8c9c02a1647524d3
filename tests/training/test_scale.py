"""Scale: 2-process DDP on CPU (gloo), the multirun + DDP refusal, the SLURM launcher config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _train(args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "diffexp.train", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_slurm_launcher_config_maps_devices_to_gpus_per_node(compose):
    cfg = compose(
        [
            "hydra/launcher=submitit_slurm",
            "trainer=gpu",
            "trainer.devices=4",
            "trainer.num_nodes=2",
        ],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4 and launcher.nodes == 2


def test_each_ddp_rank_draws_its_own_noise(compose):
    from diffexp.build.factory import build_datamodule, build_module

    cfg = compose()
    module = build_module(cfg, build_datamodule(cfg.data))
    draws = []
    for rank in (0, 1):
        torch.manual_seed(0)  # what seed_everything does in every process
        module._trainer = SimpleNamespace(world_size=2, global_rank=rank)
        module.setup("fit")
        module._noise_generator = None
        draws.append(torch.rand(4, generator=module.noise_generator))
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.slow
def test_multirun_with_subprocess_ddp_is_refused(tmp_path):
    proc = _train(
        [
            "-m",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "parameterization=x0,eps",
            "debug=fdr",
            f"hydra.sweep.dir={tmp_path}",
        ],
        timeout=300,
    )
    assert proc.returncode != 0
    assert "ddp_spawn" in proc.stderr and "submitit_slurm" in proc.stderr


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    common = ["network=oracle", "data.eval_batch_size=250", "callbacks.elbo.n_t=64"]
    single = _train([*common, "logger=csv", f"hydra.run.dir={tmp_path / 'single'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _train(
        [
            *common,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "logger=csv",
            f"hydra.run.dir={tmp_path / 'ddp'}",
        ]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = json.loads((tmp_path / "single" / "summary.json").read_text())
    two = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    # the same validation set, reduced across 2 ranks: equal within Monte Carlo error
    tolerance = 4 * math.hypot(one["val/elbo_nats_se"], two["val/elbo_nats_se"])
    assert abs(one["val/elbo_nats"] - two["val/elbo_nats"]) < tolerance, (one, two)
    assert ddp.stdout.count("validation ELBO") == 1  # rank 0 reports

    run_dir = tmp_path / "train"
    proc = _train(
        [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            # VDM's variance objective takes an extra autograd.grad inside the DDP step
            "schedule=learned_min_variance",
            "debug=short",
            "trainer.max_steps=20",
            "logger=default",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # one W&B run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()).count("last.ckpt") == 1


@pytest.mark.slow
def test_the_adaptive_density_is_reduced_over_ddp_ranks(tmp_path):
    """2-process DDP with noise_sampling=adaptive: the histogram's moving count after k steps is
    (1 - d^k) times the examples of both ranks a step (each rank alone would hold half)."""
    run_dir = tmp_path / "ddp"
    proc = _train(
        [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "noise_sampling=adaptive",
            "debug=short",
            "trainer.max_steps=12",
            "logger=csv",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cfg = ckpt["diffexp_config"]
    d, k = cfg["noise_sampling"]["decay"], ckpt["global_step"]
    per_step = 2 * cfg["data"]["batch_size"]
    count = ckpt["state_dict"]["adaptive.moments"][0].sum().item()
    assert count == pytest.approx(per_step * (1 - d**k), rel=1e-9), (count, per_step, d, k)
