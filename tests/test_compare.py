"""compare on hand-made run folders: choices from Hydra, metrics from summary and eval files."""

from __future__ import annotations

import json
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
