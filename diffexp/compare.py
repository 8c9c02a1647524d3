"""Compare runs offline: ``python -m diffexp.compare <multirun folder | run folders> [options]``.

Reads each run's Hydra config (``.hydra/config.yaml`` and ``overrides.yaml``), its CSV log
(``csv/metrics.csv``) and its final numbers (``summary.json``, and an eval's ``metrics.json`` in
the run folder or its ``eval/`` subfolder),
and writes ``comparison.md`` (one row per run: its choices and final ELBO terms and bits/dim) and
PNG plots of validation metrics against training steps, one line per run, coloured by
``--group-by`` (a config choice such as parameterization). No network is touched.

A run that cannot be read (a truncated ``summary.json``, a garbage ``csv/metrics.csv`` or
``.hydra/config.yaml``, no ``summary.json`` because it was killed or is still running) is a row
marked **failed** with the file and the reason, and a warning on stderr; the other runs are
tabulated and plotted as usual. Exit code 0 when at least one run was read, 2 (with a message)
when none was or the command line is wrong (a path that does not exist, a folder without runs).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from diffexp.cli import ConfigError, refusing_bad_input  # noqa: E402
from diffexp.training.loggers import CHOICE_GROUPS as CHOICES  # noqa: E402

COLUMNS = (
    "val/elbo_nats",
    "val/elbo_nats_se",
    "val/elbo_gap_nats",
    "val/bpd",
    "val/reconstruction_nats",
    "val/prior_nats",
    "val/diffusion_nats",
    "val/fid_small_sample",
)
PLOTTED = ("val/elbo_nats", "val/bpd", "val/diffusion_nats", "val/reconstruction_nats")
# the files with a run's final numbers: training's summary, an eval's metrics (either place)
FINAL_FILES = ("summary.json", "metrics.json", "eval/metrics.json")
RUN_FOLDER = (
    "a run folder must contain .hydra/config.yaml (Hydra writes it when the run starts) and, "
    "once the run has finished, csv/metrics.csv and summary.json"
)
USAGE_FIX = (
    "pass a multirun folder (outputs/multirun/train/<date_time>) or one or more run folders "
    "(outputs/train/<date_time>)"
)


class UnknownColumnError(ConfigError, KeyError):
    """``--columns`` names a metric that no readable run has."""

    __str__ = ConfigError.__str__  # not KeyError's quoted repr


@dataclass
class Run:
    """One run folder: its choices, final metrics and logged curves; ``error`` when it could not
    be read (``<file>: <reason>``, several joined by ``; ``), then ``final`` and ``curves`` are
    empty."""

    path: Path
    choices: dict[str, str]
    final: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    error: str | None = None

    @property
    def name(self) -> str:
        """The folder's name relative to its parent (e.g. the sweep's job number)."""
        return self.path.name

    @property
    def failed(self) -> bool:
        """Whether some file of the run could not be read."""
        return self.error is not None


class BrokenFile(Exception):
    """A file of a run that cannot be read; ``str``: ``<file>: <reason>`` on one line."""

    def __init__(self, rel: str, reason: str | None = None) -> None:
        super().__init__(_one_line(rel if reason is None else f"{rel}: {reason}"))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _natural(path: Path) -> list[Any]:
    """Sort key: job folders 0, 1, 2, ..., 10 in numeric order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _is_run(folder: Path) -> bool:
    return (folder / ".hydra" / "config.yaml").is_file()


def _looks_like_run(folder: Path) -> bool:
    """A folder that is a run, or was one whose ``.hydra/config.yaml`` is missing."""
    return (
        _is_run(folder)
        or (folder / ".hydra").is_dir()
        or (folder / "summary.json").exists()
        or (folder / "csv" / "metrics.csv").exists()
    )


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders under the given paths: folders that hold a ``.hydra/config.yaml`` (and, in a
    multirun folder, job folders that lack it but hold a ``.hydra/``, ``summary.json`` or
    ``csv/metrics.csv``: ``load_run`` marks those failed). Refuses (``ConfigError``) a path that
    does not exist, is a file, or holds no run."""
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ConfigError(
                f"the path {p} does not exist; {USAGE_FIX}, e.g. "
                "`python -m diffexp.compare outputs/multirun/train/<date_time>`"
            )
        if not p.is_dir():
            raise ConfigError(
                f"the path {p} is a file, not a run folder; pass the folder that holds it "
                f"({RUN_FOLDER}), or {USAGE_FIX}"
            )
        if _is_run(p):
            runs = [p]
        else:
            try:
                children = [c for c in p.iterdir() if c.is_dir()]
            except OSError as err:
                raise ConfigError(f"cannot list the folder {p} ({err.strerror or err})") from None
            runs = sorted((c for c in children if _looks_like_run(c)), key=_natural)
            if not runs and _looks_like_run(p):
                runs = [p]  # a run folder whose .hydra/config.yaml is missing
        if not runs:
            raise ConfigError(
                f"no run folders in {p}: {RUN_FOLDER}; a multirun folder holds one run folder "
                f"per job (0/, 1/, ...). Fix: {USAGE_FIX}"
            )
        found.extend(r for r in runs if r not in found)
    return found


def _read_bytes(run_dir: Path, rel: str) -> bytes:
    """The file's bytes; ``BrokenFile`` when it cannot be read or is empty."""
    try:
        raw = (run_dir / rel).read_bytes()
    except OSError as err:
        raise BrokenFile(rel, f"cannot read ({err.strerror or err})") from None
    if not raw.strip():
        raise BrokenFile(rel, "empty file (the run was killed while writing it?)")
    return raw


def _read_text(run_dir: Path, rel: str) -> str:
    """The file's text; ``BrokenFile`` when it cannot be read, is empty or is not UTF-8."""
    raw = _read_bytes(run_dir, rel)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BrokenFile(rel, f"not UTF-8 text (garbage bytes at offset {err.start})") from None


def _read_yaml(run_dir: Path, rel: str, kind: type) -> Any:
    """The YAML file parsed; ``BrokenFile`` unless it is a ``kind`` (dict or list)."""
    text = _read_text(run_dir, rel)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
        if problem and mark is not None:
            detail = f"{problem} at line {mark.line + 1} column {mark.column + 1}"
        else:
            detail = _one_line(str(err))
        raise BrokenFile(rel, f"not valid YAML ({detail})") from None
    if not isinstance(data, kind):
        wanted = "mapping" if kind is dict else "list"
        raise BrokenFile(rel, f"not a YAML {wanted} (a {type(data).__name__})")
    return data


def _read_json(run_dir: Path, rel: str) -> dict[str, Any]:
    """The JSON object in the file; ``BrokenFile`` when it is truncated or not a JSON object."""
    text = _read_text(run_dir, rel)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{err.msg}: line {err.lineno} column {err.colno}"
        truncated = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        raise BrokenFile(rel, f"{'truncated' if truncated else 'invalid'} JSON ({where})") from None
    if not isinstance(data, dict):
        raise BrokenFile(rel, f"not a JSON object (a {type(data).__name__})")
    return data


def _choices(run_dir: Path) -> dict[str, str]:
    """Hydra's runtime choices of the run (from hydra.yaml), else the overrides."""
    if (run_dir / ".hydra" / "hydra.yaml").is_file():
        hydra = _read_yaml(run_dir, ".hydra/hydra.yaml", dict).get("hydra") or {}
        runtime = (hydra.get("runtime") or {}) if isinstance(hydra, dict) else {}
        choices = (runtime.get("choices") or {}) if isinstance(runtime, dict) else {}
        if not isinstance(choices, dict):
            raise BrokenFile(".hydra/hydra.yaml", "hydra.runtime.choices is not a mapping")
        return {k: str(v) for k, v in choices.items() if k in CHOICES and v is not None}
    if (run_dir / ".hydra" / "overrides.yaml").is_file():
        overrides = _read_yaml(run_dir, ".hydra/overrides.yaml", list)
        pairs = (str(o).split("=", 1) for o in overrides if "=" in str(o))
        return {k.lstrip("+~"): v for k, v in pairs if k.lstrip("+~") in CHOICES}
    return {}


def _final(run_dir: Path) -> dict[str, float]:
    """The numbers of summary.json and of an eval's metrics.json; ``BrokenFile`` when none of them
    exists (the run did not finish) or one cannot be read."""
    present = [name for name in FINAL_FILES if (run_dir / name).exists()]
    if not present:
        raise BrokenFile("no summary.json (the run did not finish: killed or still running)")
    final: dict[str, float] = {}
    for name in present:
        data = _read_json(run_dir, name)
        final.update(
            {
                k: v
                for k, v in data.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
    return final


def _curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric as (step, value) pairs from the run's CSV log (none without one);
    ``BrokenFile`` when the log is not a CSV with a step column or holds a non-number."""
    rel = "csv/metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = {}
    if not (run_dir / rel).exists():
        return curves
    raw = _read_bytes(run_dir, rel)
    try:
        raw.decode("utf-8")
        garbage_at = None
    except UnicodeDecodeError as err:
        garbage_at = err.start
    try:
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace")))
        if "step" not in (reader.fieldnames or []):
            raise BrokenFile(rel, "not a CSV with a step column")
        if garbage_at is not None:
            raise BrokenFile(rel, f"not UTF-8 text (garbage bytes at offset {garbage_at})")
        for row in reader:
            line = reader.line_num
            if None in row:
                raise BrokenFile(rel, f"line {line} has more fields than the header")
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                raise BrokenFile(
                    rel, f"line {line}: step {row['step']!r} is not a number"
                ) from None
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                try:
                    curves.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    raise BrokenFile(
                        rel, f"line {line}: {key} = {value[:40]!r} is not a number"
                    ) from None
    except csv.Error as err:
        raise BrokenFile(rel, f"not a CSV ({err})") from None
    return curves


def load_run(run_dir: Path) -> Run:
    """Read one run folder; a file that cannot be read makes it a failed run (``Run.error``)."""
    problems: list[str] = []
    if not _is_run(run_dir):
        problems.append(
            ".hydra/config.yaml: missing (Hydra writes it when the run starts: the run was "
            "deleted in part, or the folder is not a run)"
        )
    else:
        try:
            _read_yaml(run_dir, ".hydra/config.yaml", dict)
        except BrokenFile as err:
            problems.append(str(err))
    results: dict[str, Any] = {}
    for key, reader in (("choices", _choices), ("final", _final), ("curves", _curves)):
        try:
            results[key] = reader(run_dir)
        except BrokenFile as err:
            problems.append(str(err))
            results[key] = {}
    if problems:
        return Run(run_dir, results["choices"], {}, {}, error="; ".join(problems))
    return Run(run_dir, results["choices"], results["final"], results["curves"])


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def markdown_table(runs: list[Run], columns: tuple[str, ...] | list[str] = COLUMNS) -> str:
    """One row per run: the choices that vary between runs and the final metrics in
    ``columns`` (those that some run has); when a run failed, a last column ``status``: ``ok``
    or ``**failed**: <file>: <reason>``."""
    known = [r for r in runs if r.choices]
    varying = [c for c in CHOICES if len({r.choices.get(c) for r in known}) > 1] or [
        c for c in CHOICES if any(c in r.choices for r in runs)
    ]
    columns = [c for c in columns if any(c in r.final for r in runs)]
    status = any(r.failed for r in runs)
    head = ["run", *varying, *columns, *(["status"] if status else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        values = [f"{r.final[c]:.4f}" if c in r.final else "" for c in columns]
        cells = [r.name, *(r.choices.get(c, "") for c in varying), *values]
        if status:
            cells.append(f"**failed**: {r.error}" if r.failed else "ok")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[Run], out_dir: Path, group_by: str | None) -> list[Path]:
    """One PNG per plotted metric: the metric against steps, one line per run."""
    groups = sorted({r.choices.get(group_by, "") for r in runs}) if group_by else [""]
    colours = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    written = []
    for metric in PLOTTED:
        if not any(metric in r.curves for r in runs):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            if metric not in r.curves:
                continue
            steps, values = zip(*r.curves[metric], strict=True)
            group = r.choices.get(group_by, "") if group_by else ""
            label = f"{r.name} ({group_by}={group})" if group_by else r.name
            ax.plot(steps, values, marker="o", ms=3, color=colours[group], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / (metric.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _no_run_read(runs: list[Run], paths: list[Path]) -> ConfigError:
    shown = "; ".join(f"{r.path}: {r.error}" for r in runs[:5])
    more = f"; and {len(runs) - 5} more" if len(runs) > 5 else ""
    where = ", ".join(str(p) for p in paths)
    return ConfigError(
        f"no run could be read in {where}: all {len(runs)} run folder(s) failed ({shown}{more}); "
        f"rerun or repair the runs, or pass other run folders ({RUN_FOLDER})"
    )


def compare(
    paths: list[Path],
    out_dir: Path | None = None,
    group_by: str | None = None,
    columns: list[str] | None = None,
) -> Path:
    """Write comparison.md and the plots for the runs under ``paths``; returns the table's path.

    ``columns``: the final metrics to tabulate (default: the validation ELBO terms), e.g. keys of
    an eval's metrics.json such as ``elbo_nats`` or ``schedules/own/nll_std``.

    A run that cannot be read is a failed row of the table (with a warning on stderr) and is left
    out of the plots. ``ConfigError`` when no run could be read or an argument is wrong (a path
    that does not exist or holds no run, an unknown ``group_by``; ``UnknownColumnError``, also a
    ``KeyError``, for a column that no run has).
    """
    if group_by is not None and group_by not in CHOICES:
        raise ConfigError(
            f"--group-by {group_by!r} is not a config choice; use one of: {', '.join(CHOICES)} "
            "(or leave it out for one colour per run)"
        )
    runs = [load_run(p) for p in find_runs(paths)]
    good = [r for r in runs if not r.failed]
    if not good:
        raise _no_run_read(runs, paths)
    if columns:
        known = sorted({k for r in good for k in r.final})
        missing = [c for c in columns if c not in known]
        if missing:
            raise UnknownColumnError(
                f"--columns: no run has the column(s) {missing}; the runs have: {known}"
            )
    out_dir = out_dir or (paths[0] if len(paths) == 1 else Path("."))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a folder to write the comparison in")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        table = out_dir / "comparison.md"
        table.write_text(markdown_table(runs, columns or COLUMNS))
        plot_curves(good, out_dir, group_by)
    except OSError as err:
        raise ConfigError(
            f"cannot write the comparison in {out_dir} ({err.strerror or err}); pass a writable "
            "folder with --out"
        ) from None
    for r in runs:
        if r.failed:
            print(f"warning: {r.path}: {r.error} (a failed row in {table})", file=sys.stderr)
    return table


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m diffexp.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun folder or run folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the folder)"
    )
    parser.add_argument(
        "--group-by",
        default=None,
        metavar="CHOICE",
        help=f"colour lines by a config choice: one of {', '.join(CHOICES)}",
    )
    parser.add_argument(
        "--columns",
        nargs="+",
        default=None,
        help="final metrics to tabulate (default: the validation ELBO terms); keys of "
        "summary.json or of an eval's metrics.json (<run>/metrics.json or <run>/eval/)",
    )
    args = parser.parse_args()
    with refusing_bad_input():
        table = compare(args.paths, args.out, args.group_by, args.columns)
    print(table.read_text())
    print(f"wrote {table} and plots in {table.parent}")


if __name__ == "__main__":
    main()
