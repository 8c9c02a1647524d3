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
    "logger=csv",
    "callbacks.elbo.n_t=2",
    "callbacks.samples.every_n_epochs=0",
    "trainer.enable_progress_bar=false",
]


def _train(args: list[str], code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "diffexp.train", *SMALL, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _log(run_dir: Path) -> tuple[dict[int, float], list[int]]:
    """train/loss by step (each step logged once) and the steps validation was logged at."""
    losses: dict[int, float] = {}
    validations = []
    with (run_dir / "csv" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            if row.get("train/loss"):
                assert step not in losses, f"step {step} logged twice"
                losses[step] = float(row["train/loss"])
            if row.get("val/elbo_nats"):
                validations.append(step)
    return losses, validations


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))


def _assert_same_run(full: Path, resumed: Path) -> None:
    expected, expected_val = _log(full)
    losses, validations = _log(resumed)
    assert sorted(losses) == sorted(expected), "the resumed run logged other steps"
    for step, loss in expected.items():  # by step number, not by position
        assert losses[step] == pytest.approx(loss, abs=1e-6), (step, loss, losses[step])
    assert validations == expected_val
    assert _checkpoints(resumed) == _checkpoints(full)
    summary = (resumed / "summary.json").read_text()
    assert summary == (full / "summary.json").read_text()


def _global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


CASES = {
    # the default callbacks: validation every 10 epochs (40 steps here); SIGTERM mid-epoch
    "default-sigterm": ([], "SIGTERM", 22, 143),
    # validation every epoch, a learned schedule, Ctrl-C on an epoch's last batch
    "learned-sigint": (
        ["schedule=learned", "trainer.check_val_every_n_epoch=1", "+trainer.limit_val_batches=1"],
        "SIGINT",
        19,
        130,
    ),
    # another objective; kill -9 mid-epoch: the resume starts from the last step checkpoint
    "lognormal-kill9": (
        [
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
    stopped = _train(
        [
            *common,
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


def test_auto_starts_fresh_without_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    _train(["trainer.max_steps=4", f"hydra.run.dir={run}", "ckpt_path=auto"])
    assert _global_step(run / "checkpoints" / "last.ckpt") == 4
    assert sorted(_log(run)[0]) == [0, 1, 2, 3]
