"""A sweep as a user runs it: 4 jobs, 4 folders, 4 separate offline W&B runs, then compare."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repository root, offline, one thread."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_four_job_sweep_and_compare(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(
        "diffexp.train",
        "-m",
        "parameterization=x0,eps",
        "weighting=elbo,unit",
        "debug=short",
        "trainer.max_steps=30",
        "data.n_train=2048",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    run_ids = set()
    for job in jobs:
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, f"{job} has {len(offline)} W&B runs"
        run_ids.add(offline[0].name.rsplit("-", 1)[-1])
        assert (job / "csv" / "metrics.csv").is_file() and (job / "summary.json").is_file()
    assert len(run_ids) == 4, "jobs of a sweep must not share a W&B run"

    proc = _run("diffexp.compare", str(sweep), "--group-by", "parameterization")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (sweep / "comparison.md").read_text().splitlines()
    table = lines[: lines.index("")]  # the per-run table, then the groups' section
    assert len(table) == 2 + 4 and "parameterization" in table[0] and "weighting" in table[0]
    assert "val/elbo_nats" in table[0]
    groups = lines[lines.index("## Groups by parameterization") :]
    rows = [row for row in groups if row.startswith(("| x0 |", "| eps |"))]
    assert len(rows) == 2 and all(row.split("|")[2].strip() == "2" for row in rows), rows
    assert (sweep / "val_elbo_nats.png").is_file()
    assert (sweep / "groups_val_elbo_nats.png").is_file()


@pytest.mark.slow
def test_optuna_search_returns_the_best_trials_validation_elbo(tmp_path):
    """hparams_search=optuna_lr_ema: each trial a job folder; the reported best is the best job."""
    import json

    import yaml

    sweep = tmp_path / "optuna"
    proc = _run(
        "diffexp.train",
        "-m",
        "hparams_search=optuna_lr_ema",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "debug=short",
        "trainer.max_steps=30",
        "data.n_train=2048",
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    elbos, lrs = [], set()
    for job in jobs:
        elbos.append(json.loads((job / "summary.json").read_text())["val/elbo_nats"])
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o for o in overrides if o.startswith("model.optimizer.lr=")).split("=")[1])
        assert 1e-4 <= lr <= 1e-2
        lrs.add(lr)
    assert len(lrs) == 3, "each trial must draw its own learning rate"
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(elbos), abs=1e-6)
