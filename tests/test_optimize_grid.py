"""``python -m diffexp.optimize_grid`` as users run it (subprocesses): a grid fitted to a trained
run is written next to its checkpoint and used by ``sample ... sampler.time_grid=optimized``; a
grid fitted to the oracle goes to ``grid=<file>``; a grid of other settings or steps is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, TINY_RING_RUN

FAST_SEARCH = [
    "n_samples=300",
    "reference_steps=40",
    "search.fractions=[0.0,0.2]",
    "search.rhos=[0.7,1.0]",
    "search.sweeps=1",
]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained ring8 run."""
    out = tmp_path_factory.mktemp("optimize_grid") / "run"
    proc = _python(
        "diffexp.train",
        *TINY_RING_RUN,
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_grid_fitted_to_a_run_sits_next_to_its_checkpoint_and_is_used(run, tmp_path):
    proc = _python(
        "diffexp.optimize_grid",
        f"run={run}",
        "sampler=sde",
        "steps=4",
        *FAST_SEARCH,
        f"hydra.run.dir={tmp_path / 'fit'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = run / "checkpoints" / "grids" / "ReverseSDE-4.json"
    record = json.loads(path.read_text())
    assert record == json.loads((tmp_path / "fit" / "grid.json").read_text())
    assert record["sampler"] == "ReverseSDE" and record["steps"] == 4
    times = record["times"]
    assert len(times) == 5 and all(a < b for a, b in zip(times, times[1:], strict=False))
    # the search scored the fixed grids and found a grid at least as good as the best of them;
    # on fresh noise it kept that grid or, where it did not hold up, the best fixed one
    assert record["energy_distance"] <= min(record["fixed_grids"].values())
    assert record["chosen"] in ("optimized", *record["fixed_grids"])
    assert set(record["heldout"]) >= {"optimized"} and len(record["heldout_seeds"]) == 2
    assert str(path) in proc.stdout

    proc = _python(
        "diffexp.sample",
        f"run={run}",
        "sampler=sde",
        "steps=4",
        "sampler.time_grid=optimized",
        "n_samples=64",
        f"hydra.run.dir={tmp_path / 'sample'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = np.load(tmp_path / "sample" / "samples.npz")
    assert "time_grid='optimized'" in str(samples["sampler"])
    assert f"times={times!r}" in str(samples["sampler"])
    assert int(samples["nfe"]) == 4  # sde's final_denoise=last_step: no extra NFE


def test_an_oracle_grid_goes_to_its_file_and_other_settings_are_refused(tmp_path):
    grid = tmp_path / "grid.json"
    proc = _python(
        "diffexp.optimize_grid",
        "sampler=ddim",
        "steps=3",
        f"grid={grid}",
        *FAST_SEARCH,
        f"hydra.run.dir={tmp_path / 'fit'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(grid.read_text())["settings"]["eta"] == 0.0

    def sample(*args: str) -> subprocess.CompletedProcess:
        return _python(
            "diffexp.sample",
            "sampler=ddim",
            "sampler.time_grid=optimized",
            f"grid={grid}",
            "n_samples=32",
            f"hydra.run.dir={tmp_path / 'sample'}",
            *args,
        )

    proc = sample("steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for args, named in [
        (("steps=5",), "not DDIM with steps=5"),
        (("steps=3", "sampler.eta=1.0"), "sampler.eta=1.0 (the grid's: 0.0)"),
    ]:
        proc = sample(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert named in proc.stderr and "Traceback" not in proc.stderr
