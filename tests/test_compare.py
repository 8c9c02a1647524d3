"""compare on hand-made run folders: choices from Hydra, metrics from summary and eval files."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffexp.compare import compare


def _run(root: Path, name: str, schedule: str, metrics: dict, summary: dict) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    hydra = {"hydra": {"runtime": {"choices": {"schedule": schedule, "data": "ring8"}}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_compare_tabulates_chosen_eval_columns_per_run(tmp_path):
    _run(tmp_path, "0", "cosine", {"elbo_nats": -0.5, "schedules/own/nll_std": 38.8}, {})
    _run(tmp_path, "1", "linear", {"elbo_nats": -0.25, "schedules/own/nll_std": 52.1}, {})
    table = compare([tmp_path], columns=["elbo_nats", "schedules/own/nll_std"]).read_text()
    lines = table.splitlines()
    assert lines[0] == "| run | schedule | elbo_nats | schedules/own/nll_std |"
    assert lines[2] == "| 0 | cosine | -0.5000 | 38.8000 |"
    assert lines[3] == "| 1 | linear | -0.2500 | 52.1000 |"


def test_named_evals_and_the_fit_time_sit_side_by_side_in_one_row(tmp_path):
    run = _run(tmp_path, "0", "cosine", {"elbo_nats": -0.5}, {"val/elbo_nats": -0.4})
    (run / "timing.json").write_text(json.dumps({"fit_time_s": 81.5}))
    for name, kl in (("ddim20", 0.25), ("ancestral100", 0.0625)):
        (run / f"eval_{name}").mkdir()
        (run / f"eval_{name}" / "metrics.json").write_text(
            json.dumps({"sample_kl_nats": kl, "elbo_nats": -9.0, "sampler": "text"})
        )
    columns = ["elbo_nats", "ddim20/sample_kl_nats", "ancestral100/sample_kl_nats", "fit_time_s"]
    lines = compare([tmp_path], columns=columns).read_text().splitlines()
    # eval/ keeps its plain names; eval_<name>/ is prefixed and never overwrites them
    assert lines[2] == "| 0 | ring8 | cosine | -0.5000 | 0.2500 | 0.0625 | 81.5000 |"


def test_compare_names_the_known_columns_when_one_is_missing(tmp_path):
    _run(tmp_path, "0", "cosine", {"elbo_nats": -0.5}, {"val/elbo_nats": -0.4})
    with pytest.raises(KeyError, match="the runs have: \\['elbo_nats', 'val/elbo_nats'\\]"):
        compare([tmp_path], columns=["fid"])


# --- broken runs: a failed row each, the good runs still tabulated and plotted ---------------

CSV_HEADER = "epoch,step,train/loss,val/bpd,val/elbo_nats\n"


def _train_run(
    root: Path,
    name: str,
    schedule: str,
    elbo: float,
    bpd: float,
    *,
    seed: int = 0,
    choices: dict[str, str] | None = None,
) -> Path:
    """A finished training run as Hydra and diffexp.train leave it (``choices``: more config
    choices than the schedule, e.g. parameterization and weighting)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nmodel:\n  lr: 0.001\n")
    chosen = {"schedule": schedule, **(choices or {})}
    overrides = [f"{k}={v}" for k, v in chosen.items()]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {"hydra": {"runtime": {"choices": {**chosen, "data": "ring8"}}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text(
        CSV_HEADER + "0,49,1.5,,\n" + f"0,49,,{bpd + 1},{elbo - 1}\n" + f"1,99,,{bpd},{elbo}\n"
    )
    (run / "summary.json").write_text(json.dumps({"val/elbo_nats": elbo, "val/bpd": bpd}, indent=2))
    return run


def _sweep_with_broken_runs(root: Path) -> Path:
    sweep = root / "sweep"
    _train_run(sweep, "0", "cosine", -1.25, 3.5)
    _train_run(sweep, "1", "linear", -0.75, 2.125)
    # killed while writing summary.json
    _train_run(sweep, "2", "cosine", -9.0, 9.0)
    (sweep / "2" / "summary.json").write_text('{\n  "val/elbo_nats":\n')
    # a CSV log overwritten with binary garbage
    _train_run(sweep, "3", "linear", -9.0, 9.0)
    (sweep / "3" / "csv" / "metrics.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x01garbage\n")
    # killed (or still running): no summary.json
    _train_run(sweep, "4", "cosine", -9.0, 9.0)
    (sweep / "4" / "summary.json").unlink()
    # a Hydra config that is not YAML
    _train_run(sweep, "5", "linear", -9.0, 9.0)
    (sweep / "5" / ".hydra" / "config.yaml").write_text("seed: [0\nmodel: {: \n")
    return sweep


def test_compare_marks_each_broken_run_failed_and_keeps_the_good_ones(
    tmp_path, capsys, monkeypatch
):
    import diffexp.compare as compare_module

    plotted: list[list[str]] = []
    plot_curves = compare_module.plot_curves

    def spy(runs, out_dir, group_by):
        plotted.append([r.name for r in runs])
        return plot_curves(runs, out_dir, group_by)

    monkeypatch.setattr(compare_module, "plot_curves", spy)
    sweep = _sweep_with_broken_runs(tmp_path)
    table = compare([sweep], group_by="schedule")
    assert table == sweep / "comparison.md"
    lines = table.read_text().splitlines()
    assert lines[0] == "| run | schedule | val/elbo_nats | val/bpd | status |"
    assert lines[2] == "| 0 | cosine | -1.2500 | 3.5000 | ok |"
    assert lines[3] == "| 1 | linear | -0.7500 | 2.1250 | ok |"
    assert lines[4] == (
        "| 2 | cosine |  |  | **failed**: summary.json: truncated JSON "
        "(Expecting value: line 3 column 1) |"
    )
    assert (
        lines[5]
        == "| 3 | linear |  |  | **failed**: csv/metrics.csv: not a CSV with a step column |"
    )
    assert lines[6] == (
        "| 4 | cosine |  |  | **failed**: no summary.json "
        "(the run did not finish: killed or still running) |"
    )
    assert lines[7].startswith(
        "| 5 | linear |  |  | **failed**: .hydra/config.yaml: not valid YAML ("
    )
    # then the groups (--group-by): one readable run each, so no interval; failed runs left out
    assert lines[8:10] == ["", "## Groups by schedule"]
    assert "| cosine | 1 | 0 | -1.25 ± n/a | 3.5 ± n/a |" in lines
    assert "| linear | 1 | 0 | -0.75 ± n/a | 2.125 ± n/a |" in lines
    assert lines[-1] == "Failed runs (left out of their groups and of n): 2, 3, 4, 5."
    # only the good runs' curves are plotted, and the plots are written
    assert plotted == [["0", "1"]]
    for metric in ("val_elbo_nats", "val_bpd"):
        assert (sweep / f"{metric}.png").stat().st_size > 0
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning: ")]
    assert len(warnings) == 4
    files = ("summary.json", "csv/metrics.csv", "no summary.json", ".hydra/config.yaml")
    for name, file in zip("2345", files, strict=True):
        assert any(str(sweep / name) in w and file in w for w in warnings), (name, warnings)


def test_compare_reads_more_kinds_of_breakage_as_failed_rows(tmp_path):
    _train_run(tmp_path, "0", "cosine", -1.25, 3.5)
    _train_run(tmp_path, "1", "linear", -9.0, 9.0)
    (tmp_path / "1" / "summary.json").write_text("[1, 2]")
    _train_run(tmp_path, "2", "linear", -9.0, 9.0)
    (tmp_path / "2" / "csv" / "metrics.csv").write_text(CSV_HEADER + "0,49,oops,,\n")
    _train_run(tmp_path, "3", "linear", -9.0, 9.0)
    (tmp_path / "3" / ".hydra" / "config.yaml").write_text("")
    _train_run(tmp_path, "4", "linear", -9.0, 9.0)
    (tmp_path / "4" / ".hydra" / "config.yaml").unlink()
    _train_run(tmp_path, "5", "linear", -9.0, 9.0)
    (tmp_path / "5" / ".hydra" / "hydra.yaml").write_bytes(b"\xff\xfe\x00garbage")
    rows = (compare([tmp_path])).read_text().splitlines()[2:]
    assert rows[0] == "| 0 | cosine | -1.2500 | 3.5000 | ok |"
    reasons = [row.split("**failed**: ")[1] for row in rows[1:]]
    assert reasons[0] == "summary.json: not a JSON object (a list) |"
    assert reasons[1] == "csv/metrics.csv: line 2: train/loss = 'oops' is not a number |"
    assert reasons[2].startswith(".hydra/config.yaml: empty file")
    assert reasons[3].startswith(".hydra/config.yaml: missing")
    assert reasons[4] == ".hydra/hydra.yaml: not UTF-8 text (garbage bytes at offset 0) |"


def test_compare_refuses_when_no_run_can_be_read(tmp_path):
    from diffexp.cli import ConfigError

    _train_run(tmp_path, "0", "cosine", -1.0, 1.0)
    (tmp_path / "0" / "summary.json").write_text("{")
    with pytest.raises(ConfigError, match="no run could be read .* summary.json: truncated JSON"):
        compare([tmp_path])
    assert not (tmp_path / "comparison.md").exists()


# --- the command line: exit 0 with warnings, 2 with one paragraph and no traceback -----------


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", "diffexp.compare", *map(str, args)],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_the_comparison_and_warns_per_failed_run(tmp_path):
    sweep = _sweep_with_broken_runs(tmp_path)
    proc = _cli(sweep, "--group-by", "schedule", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "| 0 | cosine | -1.2500 | 3.5000 | ok |" in proc.stdout
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: ") for w in warnings), proc.stderr
    assert (tmp_path / "out" / "comparison.md").is_file()
    assert (tmp_path / "out" / "val_elbo_nats.png").is_file()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_cli_refuses_a_bad_path_with_exit_2_and_no_traceback(tmp_path, case):
    target = tmp_path / "no_such_sweep" if case == "missing" else tmp_path
    proc = _cli(target)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert str(target) in proc.stderr
    if case == "missing":
        assert "does not exist" in proc.stderr
    else:  # names what a run folder must contain
        assert "no run folders in" in proc.stderr and ".hydra/config.yaml" in proc.stderr


MAIN_REFUSALS = [
    "group_by",
    "columns",
    "all_failed",
    "out_is_a_file",
    "group_by_list",
    "baseline_without_group_by",
    "baseline_keys",
    "baseline_missing_group",
]


@pytest.mark.parametrize("case", MAIN_REFUSALS)
def test_main_refuses_bad_input_with_exit_2_and_one_line(tmp_path, case, capsys, monkeypatch):
    from diffexp.compare import main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # tests/conftest.py sets it
    _train_run(tmp_path, "0", "cosine", -1.0, 1.0)
    args, expected = {
        "group_by": (["--group-by", "colour"], "--group-by 'colour' is not a config choice"),
        "group_by_list": (
            ["--group-by", "schedule,colour"],
            "--group-by 'colour' is not a config choice (in --group-by 'schedule,colour')",
        ),
        "baseline_without_group_by": (
            ["--baseline", "schedule=cosine"],
            "--baseline 'schedule=cosine' needs --group-by",
        ),
        "baseline_keys": (
            ["--group-by", "schedule,data", "--baseline", "schedule=cosine"],
            "--baseline 'schedule=cosine' names the key(s) schedule but --group-by is "
            "schedule,data",
        ),
        "baseline_missing_group": (
            ["--group-by", "schedule", "--baseline", "schedule=linear"],
            "the groups of --group-by schedule are: schedule=cosine",
        ),
        "columns": (["--columns", "fid"], "--columns: no run has the column(s) ['fid']"),
        "all_failed": ([], "no run could be read in"),
        "out_is_a_file": (["--out", str(tmp_path / "0" / "summary.json")], "is a file"),
    }[case]
    if case == "all_failed":
        (tmp_path / "0" / "summary.json").unlink()
    monkeypatch.setattr(sys, "argv", ["diffexp.compare", str(tmp_path), *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err


# --- seeds: groups, Student-t intervals, paired differences to a baseline --------------------

# t quantiles in closed form: df = 1 is the Cauchy distribution, t = tan(pi (p - 1/2)); for
# df = 2, F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so t = sqrt(2 q^2 / (1 - q^2)) with q = 2p - 1
T_975_DF1 = math.tan(math.pi * 0.475)
T_975_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
REL = 1e-6


def _by_hand(values: list[float], t: float) -> tuple[float, float]:
    """mean and t * s / sqrt(n), s the sample standard deviation (ddof=1)."""
    return statistics.mean(values), t * statistics.stdev(values) / math.sqrt(len(values))


# 3 groups by parameterization,weighting; the runs are the seeds. eps/elbo is the baseline;
# v/unit has its ELBO 0.5 above it at every seed and its bits/dim above it by BPD_DIFFS;
# x0/elbo has seed 0 twice (in its mean, not paired) and seeds 1 and 2 once each.
A_ELBO, A_BPD = [-1.0, -1.25, -1.75], [3.0, 3.5, 4.5]
BPD_DIFFS = [0.125, 0.25, 0.625]
C_RUNS = [(0, -2.0, 5.0), (0, -3.0, 6.0), (1, -1.0, 4.0), (2, -1.25, 4.25)]  # seed, elbo, bpd
GROUP_BY = "parameterization,weighting"
BASELINE = "parameterization=eps,weighting=elbo"


def _seeded_sweep(root: Path) -> Path:
    sweep = root / "sweep"
    eps, v, x0 = (
        {"parameterization": p, "weighting": w}
        for p, w in (("eps", "elbo"), ("v", "unit"), ("x0", "elbo"))
    )
    job = iter(range(100))
    for seed, (elbo, bpd) in enumerate(zip(A_ELBO, A_BPD, strict=True)):
        _train_run(sweep, str(next(job)), "cosine", elbo, bpd, seed=seed, choices=eps)
    for seed, (elbo, bpd, d) in enumerate(zip(A_ELBO, A_BPD, BPD_DIFFS, strict=True)):
        _train_run(sweep, str(next(job)), "cosine", elbo + 0.5, bpd + d, seed=seed, choices=v)
    for seed, elbo, bpd in C_RUNS:
        _train_run(sweep, str(next(job)), "cosine", elbo, bpd, seed=seed, choices=x0)
    # a failed run of the baseline group: a failed row, no seed of its group
    _train_run(sweep, str(next(job)), "cosine", 9.0, 9.0, seed=3, choices=eps)
    (sweep / "10" / "summary.json").write_text("{")
    return sweep


def _section(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after the line ``heading``, as dicts by column."""
    lines = text.splitlines()
    start = lines.index(heading)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    head, rows = table[0], table[2:]
    return [dict(zip(head, row, strict=True)) for row in rows]


def _pm(cell: str) -> tuple[float, float | None]:
    """``mean ± half-width`` (``± n/a``: None) as numbers."""
    mean, half = cell.split(" ± ")
    return float(mean), None if half == "n/a" else float(half)


def test_t_quantile_matches_closed_forms_and_the_table():
    from diffexp.compare import t_quantile

    assert t_quantile(0.975, 1) == pytest.approx(T_975_DF1, rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(T_975_DF2, rel=1e-9)
    for df, tabulated in ((1, 12.706), (2, 4.303), (4, 2.776), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(tabulated, abs=5e-4), df
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_t_interval_and_paired_differences_follow_their_formulas():
    from diffexp.compare import Interval, paired_differences, t_interval

    mean, half = _by_hand(A_ELBO, T_975_DF2)
    got = t_interval(A_ELBO)
    assert got.n == 3
    assert got.mean == pytest.approx(mean, rel=REL) and mean == pytest.approx(-4 / 3)
    assert got.half_width == pytest.approx(half, rel=REL)
    assert half == pytest.approx(T_975_DF2 * math.sqrt(21) / 12 / math.sqrt(3), rel=1e-12)
    assert t_interval([2.5]) == Interval(2.5, None, 1)
    with pytest.raises(ValueError):
        t_interval([])
    # constant differences: a zero-width interval; only the common seeds pair
    a = {0: 1.5, 1: 2.5, 2: 4.0, 7: 0.0}
    b = {0: 1.0, 1: 2.0, 2: 3.5, 8: 0.0}
    interval, seeds = paired_differences(a, b)
    assert seeds == [0, 1, 2] and interval == Interval(0.5, 0.0, 3)
    # known differences: 0.25 and 0.5 over two pairs, one degree of freedom
    interval, seeds = paired_differences({1: 1.25, 2: 2.5}, {1: 1.0, 2: 2.0})
    mean, half = _by_hand([0.25, 0.5], T_975_DF1)
    assert seeds == [1, 2] and interval.n == 2
    assert interval.mean == pytest.approx(mean, rel=REL)
    assert interval.half_width == pytest.approx(half, rel=REL)
    assert paired_differences({0: 1.0}, {1: 1.0}) == (None, [])


def test_group_table_gives_each_groups_mean_and_t_interval(tmp_path):
    sweep = _seeded_sweep(tmp_path)
    text = compare([sweep], group_by=GROUP_BY).read_text()
    assert "## Paired differences" not in text  # no --baseline
    rows = _section(text, "## Groups by parameterization, weighting")
    assert [(r["parameterization"], r["weighting"], r["n"], r["seeds"]) for r in rows] == [
        ("eps", "elbo", "3", "0, 1, 2"),  # the failed run with seed 3 is not counted
        ("v", "unit", "3", "0, 1, 2"),
        ("x0", "elbo", "4", "0, 0, 1, 2"),
    ]
    eps, v, x0 = rows
    expected = {
        (0, "val/elbo_nats"): A_ELBO,
        (0, "val/bpd"): A_BPD,
        (1, "val/elbo_nats"): [e + 0.5 for e in A_ELBO],
        (1, "val/bpd"): [b + d for b, d in zip(A_BPD, BPD_DIFFS, strict=True)],
    }
    for (i, metric), values in expected.items():
        mean, half = _pm(rows[i][metric])
        want_mean, want_half = _by_hand(values, T_975_DF2)
        assert mean == pytest.approx(want_mean, rel=REL), (i, metric)
        assert half == pytest.approx(want_half, rel=REL), (i, metric)
    # x0: four runs (seed 0 twice), three degrees of freedom: t_{0.975,3} = 3.182
    elbos = [elbo for _, elbo, _ in C_RUNS]
    mean, half = _pm(x0["val/elbo_nats"])
    assert mean == pytest.approx(statistics.mean(elbos), rel=REL)
    assert half == pytest.approx(3.182 * statistics.stdev(elbos) / 2, rel=2e-4)
    assert "Failed runs (left out of their groups and of n): 10." in text


def test_paired_table_gives_differences_to_the_baseline_by_seed(tmp_path):
    sweep = _seeded_sweep(tmp_path)
    text = compare([sweep], group_by=GROUP_BY, baseline=BASELINE).read_text()
    heading = "## Paired differences to the baseline parameterization=eps,weighting=elbo"
    assert "The differences are (group - baseline)" in text
    assert "An interval that excludes 0 is a difference that these seeds resolve" in text
    rows = {r["group"]: r for r in _section(text, heading)}
    assert set(rows) == {"parameterization=v,weighting=unit", "parameterization=x0,weighting=elbo"}
    v = rows["parameterization=v,weighting=unit"]
    assert (v["n pairs"], v["seeds"]) == ("3", "0, 1, 2")
    # the ELBO is 0.5 above the baseline at every seed: a zero-width interval
    assert v["val/elbo_nats"] == "0.5 ± 0"
    mean, half = _pm(v["val/bpd"])
    want_mean, want_half = _by_hand(BPD_DIFFS, T_975_DF2)
    assert mean == pytest.approx(want_mean, rel=REL) and want_mean == pytest.approx(1 / 3)
    assert half == pytest.approx(want_half, rel=REL)
    # x0: seed 0 is shared by two of its runs, so only seeds 1 and 2 pair (df = 1)
    x0 = rows["parameterization=x0,weighting=elbo"]
    assert (x0["n pairs"], x0["seeds"]) == ("2", "1, 2")
    by_seed = {seed: (elbo, bpd) for seed, elbo, bpd in C_RUNS if seed > 0}
    for j, metric in enumerate(("val/elbo_nats", "val/bpd")):
        base = A_ELBO if j == 0 else A_BPD
        diffs = [by_seed[s][j] - base[s] for s in (1, 2)]
        mean, half = _pm(x0[metric])
        want_mean, want_half = _by_hand(diffs, T_975_DF1)
        assert mean == pytest.approx(want_mean, rel=REL), metric
        assert half == pytest.approx(want_half, rel=REL), metric
    assert "Not paired: seed 0 of parameterization=x0,weighting=elbo (2 runs share it" in text


def test_group_plots_are_written_on_the_steps_every_run_logged(tmp_path):
    from diffexp.compare import _aligned, load_run

    sweep = _seeded_sweep(tmp_path)
    # one baseline run logged one more validation step: the group's band leaves it out
    with (sweep / "0" / "csv" / "metrics.csv").open("a") as f:
        f.write("2,149,,1.0,-0.5\n")
    steps, values = _aligned([load_run(sweep / str(i)) for i in range(3)], "val/elbo_nats")
    assert steps == [49, 99]
    assert values == [[e - 1 for e in A_ELBO], A_ELBO]
    compare([sweep], group_by=GROUP_BY, baseline=BASELINE)
    for name in ("groups_val_elbo_nats", "groups_val_bpd", "groups_final"):
        assert (sweep / f"{name}.png").stat().st_size > 0, name
    for name in ("val_elbo_nats", "val_bpd"):  # the per-run plots are still there
        assert (sweep / f"{name}.png").stat().st_size > 0, name


@pytest.mark.parametrize(
    "case", ["baseline_without_group_by", "baseline_keys", "baseline_missing_group", "group_by"]
)
def test_compare_refuses_a_bad_group_by_or_baseline(tmp_path, case):
    from diffexp.cli import ConfigError

    sweep = _seeded_sweep(tmp_path)
    group_by, baseline, expected = {
        "baseline_without_group_by": (
            None,
            BASELINE,
            f"--baseline {BASELINE!r} needs --group-by: .* add --group-by {GROUP_BY}",
        ),
        "baseline_keys": (
            GROUP_BY,
            "parameterization=eps",
            "--baseline 'parameterization=eps' names the key\\(s\\) parameterization but "
            f"--group-by is {GROUP_BY}: .* e.g. --baseline "
            "parameterization=<value>,weighting=<value>",
        ),
        "baseline_missing_group": (
            GROUP_BY,
            "parameterization=v,weighting=elbo",
            "no readable run is in that group; the groups of --group-by "
            f"{GROUP_BY} are: parameterization=eps,weighting=elbo; "
            "parameterization=v,weighting=unit; parameterization=x0,weighting=elbo",
        ),
        "group_by": (
            "parameterization,seed",
            None,
            "--group-by 'seed' is not a config choice .*use one of: data, schedule, "
            "parameterization, weighting",
        ),
    }[case]
    with pytest.raises(ConfigError, match=expected) as err:
        compare([sweep], group_by=group_by, baseline=baseline)
    assert "\n" not in str(err.value)
    assert not (sweep / "comparison.md").exists()


def test_cli_refuses_a_missing_baseline_group_with_exit_2_and_no_traceback(tmp_path):
    sweep = _seeded_sweep(tmp_path)
    proc = _cli(
        sweep, "--group-by", GROUP_BY, "--baseline", "parameterization=score,weighting=elbo"
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.startswith("error: --baseline") and len(proc.stderr.strip().splitlines()) == 1
    )
    assert "parameterization=eps,weighting=elbo; parameterization=v,weighting=unit" in proc.stderr
    assert not (sweep / "comparison.md").exists()


def test_main_prints_the_group_and_paired_tables(tmp_path, capsys, monkeypatch):
    from diffexp.compare import main

    sweep = _seeded_sweep(tmp_path)
    out = tmp_path / "out"
    argv = [str(sweep), "--group-by", GROUP_BY, "--baseline", BASELINE, "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["diffexp.compare", *argv])
    main()
    printed = capsys.readouterr().out
    assert "## Groups by parameterization, weighting" in printed
    assert "| parameterization=v,weighting=unit | 3 | 0, 1, 2 | 0.5 ± 0 |" in printed
    assert (out / "comparison.md").is_file() and (out / "groups_final.png").is_file()
