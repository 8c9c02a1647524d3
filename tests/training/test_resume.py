"""Exact resume, checked as a user relies on it: the default callbacks (validation every 10
epochs), a run stopped by a signal or killed at a known step and resumed with ``ckpt_path``, its
CSV log compared with an uninterrupted run's by step number (losses to 1e-6, validation steps,
checkpoint names). Every run is a ``python -m diffexp.train`` subprocess."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

ENV = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
ENV.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
# 4 steps an epoch (2048 / 512), every step logged; validation and callbacks as configured
SMALL = [
    "data.n_train=2048",
    "trainer.log_every_n_steps=1",
    "callbacks.elbo.n_t=2",
    "callbacks.samples.every_n_epochs=0",
    "trainer.enable_progress_bar=false",
]


def _train(args: list[str], code: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "diffexp.train", *SMALL, *args],
        cwd=ROOT,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _log(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """train/loss and val/elbo_nats by step (each logged once a step)."""
    losses: dict[int, float] = {}
    validations: dict[int, float] = {}
    with (run_dir / "csv" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            if row.get("train/loss"):
                assert step not in losses, f"step {step} logged twice"
                losses[step] = float(row["train/loss"])
            if row.get("val/elbo_nats"):
                assert step not in validations, f"validation at step {step} logged twice"
                validations[step] = float(row["val/elbo_nats"])
    return losses, validations


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))


def _assert_same_run(full: Path, resumed: Path) -> None:
    expected, expected_val = _log(full)
    losses, validations = _log(resumed)
    assert sorted(losses) == sorted(expected), "the resumed run logged other steps"
    for step, loss in expected.items():  # by step number, not by position
        assert losses[step] == pytest.approx(loss, abs=1e-6), (step, loss, losses[step])
    assert sorted(validations) == sorted(expected_val)  # the same steps, the same numbers
    for step, elbo in expected_val.items():
        assert validations[step] == pytest.approx(elbo, abs=1e-6), (step, elbo, validations[step])
    assert _checkpoints(resumed) == _checkpoints(full)
    summary = (resumed / "summary.json").read_text()
    assert summary == (full / "summary.json").read_text()


def _global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


# each case: its overrides, whether it runs under SLURM, and its legs: how each leg ends (a
# signal at a step, or max_steps), the step its last.ckpt then holds and its exit code; every
# leg after the first and the final command carry ckpt_path=auto
CASES = {
    # the default callbacks (validation every 10 epochs: 40 steps here) and loggers; SLURM's
    # preemption signal inside an epoch: checkpoint, requeue, resume
    "default-slurm": (["logger=default"], True, [("SIGUSR1", 22, 23, 138)]),
    # validation every epoch, a learned schedule, Ctrl-C on an epoch's last batch
    "learned-sigint": (
        [
            "logger=csv",
            "schedule=learned",
            "trainer.check_val_every_n_epoch=1",
            "+trainer.limit_val_batches=1",
        ],
        False,
        [("SIGINT", 19, 20, 130)],
    ),
    # the adaptive p(lambda): its histogram is state, saved and restored with the checkpoint
    "adaptive-sigterm": (
        ["logger=csv", "noise_sampling=adaptive"],
        False,
        [("SIGTERM", 17, 18, 143)],
    ),
    # another objective: trained to max_steps=10 (inside an epoch) and extended, stopped by
    # SIGTERM, then killed by kill -9 at step 27: it resumes from the step checkpoint of step 25
    "lognormal-sigterm-kill9": (
        [
            "logger=csv",
            "model.lr_scheduler.total_steps=48",  # the same LR schedule for the 10-step leg
            "weighting=edm",
            "noise_sampling=lognormal",
            "callbacks.last_checkpoint.every_n_train_steps=5",
        ],
        False,
        [("max_steps", 10, 10, 0), ("SIGTERM", 13, 14, 143), ("SIGKILL", 27, 25, -9)],
    ),
}


def _slurm_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment SLURM gives a job (job 4242, one task) with a fake ``scontrol`` on the
    PATH that records its arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    return env, calls


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_stopped_and_resumed_run_is_the_uninterrupted_run(tmp_path, case):
    """Each leg stops as planned and leaves last.ckpt at the expected step; the final resume
    reproduces the uninterrupted run by step number. SLURM (a real cluster cannot be tested here):
    the signal requeues the job with ``scontrol requeue 4242``, and a requeued command without
    ckpt_path=auto is refused rather than training over the run."""
    overrides, slurm, legs = CASES[case]
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["trainer.max_steps=48", *overrides]
    env, calls = _slurm_env(tmp_path) if slurm else ({}, None)
    _train([*common, f"hydra.run.dir={full}"])
    last = cut / "checkpoints" / "last.ckpt"
    for i, (stop, step, at, code) in enumerate(legs):
        args = [*common, f"hydra.run.dir={cut}", *(["ckpt_path=auto"] if i else [])]
        if stop == "max_steps":
            args.append(f"trainer.max_steps={step}")
        else:
            args += [
                "+callbacks.signal._target_=tests.helpers.SignalAtStep",
                f"+callbacks.signal.step={step}",
                f"+callbacks.signal.signal={stop}",
            ]
        stopped = _train(args, code=code, env=env)
        assert _global_step(last) == at, (stop, step)
        if stop not in ("max_steps", "SIGKILL"):  # a signal stops at the end of its step
            assert f"stopped by {stop} after step {at}: last.ckpt written" in stopped.stdout
            assert not (cut / "summary.json").exists()
    if slurm:
        assert "requeued" in stopped.stdout
        assert calls.read_text().split() == ["requeue", "4242"]
        before = last.read_bytes()
        refused = _train([*common, f"hydra.run.dir={cut}"], code=2, env=env)
        assert "ckpt_path=auto" in refused.stderr and "Traceback" not in refused.stderr
        assert last.read_bytes() == before
    _train([*common, f"hydra.run.dir={cut}", "ckpt_path=auto"], env=env)
    _assert_same_run(full, cut)
    if "logger=default" in overrides:  # every process continued the same W&B run
        run_id = torch.load(last, map_location="cpu", weights_only=True)["wandb_run_id"]
        runs = [p.name for p in (cut / "wandb").glob("offline-run-*")]
        assert len(runs) == len(legs) + 1 and all(name.endswith(run_id) for name in runs), runs
