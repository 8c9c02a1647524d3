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

ROOT = Path(__file__).resolve().parents[1]
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


CASES = {
    # the default callbacks: validation every 10 epochs (40 steps here); SIGTERM mid-epoch
    "default-sigterm": (["logger=default"], "SIGTERM", 22, 143),
    # validation every epoch, a learned schedule, Ctrl-C on an epoch's last batch
    "learned-sigint": (
        [
            "logger=csv",
            "schedule=learned",
            "trainer.check_val_every_n_epoch=1",
            "+trainer.limit_val_batches=1",
        ],
        "SIGINT",
        19,
        130,
    ),
    # another objective, first trained to max_steps=10 (inside an epoch) and extended, then
    # killed with kill -9 inside an epoch: the resume starts from the last step checkpoint
    "lognormal-kill9": (
        [
            "logger=csv",
            "model.lr_scheduler.total_steps=48",  # the same LR schedule for the 10-step leg
            "weighting=edm",
            "noise_sampling=lognormal",
            "callbacks.last_checkpoint.every_n_train_steps=5",
        ],
        "SIGKILL",
        15,
        -9,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_stopped_and_resumed_run_is_the_uninterrupted_run(tmp_path, case):
    overrides, signal, step, code = CASES[case]
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["trainer.max_steps=48", *overrides]
    _train([*common, f"hydra.run.dir={full}"])
    resume = []
    if signal == "SIGKILL":  # a finished 10-step run, extended to 48 steps by the next command
        _train([*common, "trainer.max_steps=10", f"hydra.run.dir={cut}"])
        resume = ["ckpt_path=auto"]
    stopped = _train(
        [
            *common,
            *resume,
            f"hydra.run.dir={cut}",
            "+callbacks.signal._target_=tests.helpers.SignalAtStep",
            f"+callbacks.signal.step={step}",
            f"+callbacks.signal.signal={signal}",
        ],
        code=code,
    )
    last = cut / "checkpoints" / "last.ckpt"
    # a signal stops at the end of the step it arrived in; kill -9 leaves the last checkpoint,
    # here the one written after step 15 (every 5 steps, inside epoch 3 of steps 12-15)
    assert _global_step(last) == (step + 1 if signal != "SIGKILL" else 15)
    if signal != "SIGKILL":
        assert f"stopped by {signal} after step {step + 1}: last.ckpt written" in stopped.stdout
        assert not (cut / "summary.json").exists()
    _train([*common, f"hydra.run.dir={cut}", "ckpt_path=auto"])
    _assert_same_run(full, cut)
    if "logger=default" in overrides:  # the resumed process continued the same W&B run
        run_id = torch.load(last, map_location="cpu", weights_only=True)["wandb_run_id"]
        runs = [p.name for p in (cut / "wandb").glob("offline-run-*")]
        assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), (run_id, runs)


def test_slurm_preemption_checkpoints_requeues_and_resumes(tmp_path):
    """SLURM's signal before the time limit (USR1 here; submitit sends USR2): last.ckpt, exit
    138, ``scontrol requeue <job>``; the requeued command (ckpt_path=auto) continues the run.
    A fake ``scontrol`` records its call; a real cluster cannot be tested here."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    run = tmp_path / "run"
    args = ["trainer.max_steps=16", "logger=csv", f"hydra.run.dir={run}", "ckpt_path=auto"]
    stopped = _train(
        [
            *args,
            "+callbacks.signal._target_=tests.helpers.SignalAtStep",
            "+callbacks.signal.step=9",
            "+callbacks.signal.signal=SIGUSR1",
        ],
        code=128 + 10,
        env=slurm,
    )
    assert "stopped by SIGUSR1 after step 10" in stopped.stdout
    assert "requeued" in stopped.stdout
    assert calls.read_text().split() == ["requeue", "4242"]
    assert _global_step(run / "checkpoints" / "last.ckpt") == 10
    assert sorted(_log(run)[0]) == list(range(10))  # ckpt_path=auto started fresh at step 0
    # a requeued command without ckpt_path=auto must not train over the run's work
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    refused = _train([a for a in args if a != "ckpt_path=auto"], code=2, env=slurm)
    assert "ckpt_path=auto" in refused.stderr and "Traceback" not in refused.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    _train(args, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert _global_step(run / "checkpoints" / "last.ckpt") == 16
    assert sorted(_log(run)[0]) == list(range(16))
