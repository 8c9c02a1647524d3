"""Exact resume: a run that crashed after a checkpoint and was resumed from it continues the
same loss curve as an uninterrupted run with the same seed (model, EMA, optimizer, schedule,
data order, noise, step)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
# 4 steps an epoch, validation (and a checkpoint) after every epoch, every step logged
COMMON = [
    "data.n_train=2048",
    "trainer.max_steps=16",
    "trainer.check_val_every_n_epoch=1",
    "+trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "callbacks.elbo.n_t=2",
    "callbacks.samples.every_n_epochs=0",
    "sampler.steps=5",
    "trainer.enable_progress_bar=false",
]


def _train(args, ok=True):
    proc = subprocess.run(
        [sys.executable, "-m", "diffexp.train", *COMMON, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    """train/loss by the step number it was logged at."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]
        }


def _validation_steps(run_dir: Path) -> list[int]:
    """The step numbers validation was logged at."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("val/elbo_nats"))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["log_linear", "learned"])
def test_resumed_run_continues_the_uninterrupted_loss_curve(tmp_path, schedule):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train([f"schedule={schedule}", f"hydra.run.dir={full}"])
    crashed = _train(
        [
            f"schedule={schedule}",
            f"hydra.run.dir={cut}",
            "+callbacks.crash._target_=tests.helpers.CrashAtStep",
            "+callbacks.crash.step=8",
        ],
        ok=False,
    )
    assert "simulated crash at step 8" in crashed.stderr
    _train(
        [
            f"schedule={schedule}",
            f"hydra.run.dir={cut}",
            f"ckpt_path={cut / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    expected, resumed = _losses(full), _losses(cut)  # the resumed run logged steps 8..15
    assert sorted(expected) == list(range(16)) and sorted(resumed) == list(range(8, 16))
    for step, loss in resumed.items():  # compared by step number, not by position
        assert loss == pytest.approx(expected[step], abs=1e-6), (step, expected, resumed)
    assert _validation_steps(cut) == [s for s in _validation_steps(full) if s >= 8]
