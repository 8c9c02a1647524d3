"""The image-scale benches (bench.image_throughput, bench.data_loading) and the GPU check
(bench.gpu_check, on the CPU with --tiny) run and print or save their numbers (tiny sizes here;
the measurements are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_bench import _bench


def _finite(value: object) -> bool:
    """Whether value is a finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_image_throughput_prints_both_cases() -> None:
    """Both cases (digits, CIFAR UNet) are timed and their framework / plain ratios printed."""
    out = _bench("bench.image_throughput", "--tiny")
    assert "| framework / plain |" in out
    assert out.count("ratio framework / plain") == 2
    assert "experiment=digits" in out and "synthetic 3x32x32" in out


@pytest.mark.slow
def test_image_throughput_times_the_compiled_network_too() -> None:
    """--compile adds the framework with model.compile=true and its eager / compiled ratio."""
    out = _bench("bench.image_throughput", "--tiny", "--compile", "--cases", "digits")
    head, _, row = [line for line in out.splitlines() if line.startswith("|")][:3]
    assert head.split("|")[-2].strip() == "eager / compiled"
    assert float(row.split("|")[-2]) > 0


def test_data_loading_prints_every_loader_and_the_step() -> None:
    """Every num_workers x pin_memory row and the UNet step reference are printed."""
    out = _bench("bench.data_loading", "--tiny")
    for workers in (0, 2):
        for pin in (False, True):
            assert f"| {workers} | {pin} |" in out
    assert "the CIFAR UNet's training step at batch 8" in out
    assert "loader share of a step" in out


@pytest.mark.slow
def test_gpu_check_on_the_cpu_saves_finite_numbers(tmp_path: Path) -> None:
    """--device cpu --tiny writes every expected key of the JSON with a finite number."""
    out_file = tmp_path / "gpu_check.json"
    out = _bench(
        "bench.gpu_check",
        "--device",
        "cpu",
        "--tiny",
        "--plain",
        "--profile",
        "2",
        "--out",
        str(out_file),
    )
    assert "bf16-mixed / 32-true" in out and "DDP (1 device) - single ELBO" in out
    results = json.loads(out_file.read_text())
    assert results["environment"]["device"] == "cpu"
    for name in ("fp32", "bf16"):
        run = results["throughput"][name]
        for key in ("images_per_s", "ms_per_step", "warmup_s", "peak_mem_mb"):
            assert _finite(run[key]) and run[key] > 0, (name, key, run)
    assert "bf16_compile" not in results["throughput"]  # --tiny on the CPU skips compile
    assert _finite(results["bf16_speedup"])
    # --plain: the plain loop's throughput and framework / plain; --profile: the operators' table
    assert _finite(results["plain_fp32"]["images_per_s"]) and results["plain_fp32"]["steps"] == 3
    assert _finite(results["framework_over_plain_fp32"])
    assert results["profile_bf16"]["steps"] == 2 and results["profile_bf16"]["host_op_s"] > 0
    assert "aten::convolution" in (tmp_path / "profile_bf16.txt").read_text()
    ddp = results["ddp"]
    for run in (ddp["single"], ddp["ddp"]):
        assert _finite(run["elbo_nats"]) and _finite(run["elbo_se"]) and run["elbo_se"] > 0
    assert _finite(ddp["diff_nats"]) and _finite(ddp["diff_in_se"])
    # the same seed and data on one process: DDP changes nothing but the launcher
    assert abs(ddp["diff_in_se"]) < 1.0
