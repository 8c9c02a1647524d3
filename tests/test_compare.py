"""compare on hand-made run folders: choices from Hydra, metrics from summary and eval files."""

from __future__ import annotations

import json
import os
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


def test_compare_names_the_known_columns_when_one_is_missing(tmp_path):
    _run(tmp_path, "0", "cosine", {"elbo_nats": -0.5}, {"val/elbo_nats": -0.4})
    with pytest.raises(KeyError, match="the runs have: \\['elbo_nats', 'val/elbo_nats'\\]"):
        compare([tmp_path], columns=["fid"])


# --- broken runs: a failed row each, the good runs still tabulated and plotted ---------------

CSV_HEADER = "epoch,step,train/loss,val/bpd,val/elbo_nats\n"


def _train_run(root: Path, name: str, schedule: str, elbo: float, bpd: float) -> Path:
    """A finished training run as Hydra and diffexp.train leave it."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\nmodel:\n  lr: 0.001\n")
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"schedule={schedule}"]))
    hydra = {"hydra": {"runtime": {"choices": {"schedule": schedule, "data": "ring8"}}}}
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
    assert len(lines) == 8
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


@pytest.mark.parametrize("case", ["group_by", "columns", "all_failed", "out_is_a_file"])
def test_main_refuses_bad_input_with_exit_2_and_one_line(tmp_path, case, capsys, monkeypatch):
    from diffexp.compare import main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # tests/conftest.py sets it
    _train_run(tmp_path, "0", "cosine", -1.0, 1.0)
    args, expected = {
        "group_by": (["--group-by", "colour"], "--group-by 'colour' is not a config choice"),
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
