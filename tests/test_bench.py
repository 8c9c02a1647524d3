"""The benches of ``make bench`` and the docs run and print their tables (tiny sizes here; the
measurements themselves are in docs/benchmarks.md with their commands)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _bench(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_minimal_loop_trains():
    assert "minimal loop: 5 steps in" in _bench("bench.minimal_loop", "--steps", "5")


def test_train_throughput_prints_both_ratios():
    out = _bench(
        "bench.train_throughput", "--steps", "10", "--warmup", "2", "--rounds", "1", "--chunk", "5"
    )
    assert "ratio framework / plain" in out and "ratio framework / minimal" in out


def test_step_profile_prints_every_part():
    out = _bench("bench.step_profile", "--steps", "10", "--warmup", "2")
    for part in ("loss forward", "backward", "Adam step", "EMA", "sum"):
        assert f"| {part} |" in out


@pytest.mark.slow
def test_step_time_differences_whole_processes():
    out = _bench("bench.step_time", "--short", "2", "--long", "4", "--rounds", "1")
    assert out.count("ms/step") >= 1 and "| minimal hand-written loop |" in out


@pytest.mark.slow
def test_noise_sampling_variance_prints_its_tables():
    out = _bench("bench.noise_sampling_variance", "--steps", "20", "--batches", "3")
    assert out.count("| adaptive |") == 4  # an ELBO row and a variance row per weighting


def test_sampler_quality_prints_a_row_per_sampler_and_the_adaptive_table():
    args = ["--n", "500", "--floor-sets", "2", "--fit-n", "200"]
    out = _bench("bench.sampler_quality", *args, "--nfe", "5", "10", "--optimized-nfe", "5")
    from bench.sampler_quality import ADAPTIVE, OPTIMIZED, ROWS, optimized_row

    for label in ROWS:
        assert f"| {label} |" in out, label
    for label in OPTIMIZED:  # fitted at NFE 5 only
        row = next(
            line for line in out.splitlines() if line.startswith(f"| {optimized_row(label)} |")
        )
        assert row.endswith("| - |") and row.count("/") == 1, row
    assert out.count("(+denoise) |") == len(ADAPTIVE)
    best = out[out.index("| NFE | best sampler | KL (nats) |") :].splitlines()
    assert best[2].startswith("| 5 | ") and best[3].startswith("| 10 | ")
    only = _bench(
        "bench.sampler_quality", *args, "--nfe", "5", "--rows", "dpmpp_2m_sde", "--optimized-nfe"
    )
    rows = [line for line in only.splitlines() if line.startswith("| dpmpp_2m_sde")]
    assert len(rows) == 2 and "| ancestral" not in only


def test_sampler_quality_takes_a_trained_run_instead_of_the_oracle(tmp_path):
    """--run: a ring run's EMA denoiser (trained here for 20 steps: far from the oracle, so its
    KL at 20 NFE is far above the oracle's 0.03)."""
    run = tmp_path / "run"
    train = ["diffexp.train", "trainer.max_steps=20", "logger=csv"]
    _bench(*train, f"hydra.run.dir={run}")
    out = _bench(
        "bench.sampler_quality",
        "--run",
        str(run),
        "--n",
        "1000",
        "--nfe",
        "20",
        "--rows",
        "dpmpp_2m_sde eta=0.5",
        "--floor-sets",
        "2",
        "--optimized-nfe",
    )
    assert f"trained denoiser of {run}" in out
    row = next(line for line in out.splitlines() if line.startswith("| dpmpp_2m_sde eta=0.5"))
    assert float(row.split("|")[2].split("/")[0]) > 0.3, row
