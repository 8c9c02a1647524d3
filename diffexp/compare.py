"""Compare runs offline: ``python -m diffexp.compare <multirun folder | run folders> [options]``.

Reads each run's Hydra config (``.hydra/config.yaml``, its ``seed``, and ``overrides.yaml``), its
CSV log (``csv/metrics.csv``) and its final numbers (``summary.json``, ``timing.json``, and an
eval's ``metrics.json`` in the run folder or its ``eval/`` subfolder; an eval in
``<run>/eval_<name>/`` adds its numbers as ``<name>/<key>``, so several samplers' evals of one run
sit side by side),
and writes ``comparison.md`` (one row per run: its choices and final ELBO terms and bits/dim) and
PNG plots of validation metrics against training steps, one line per run, coloured by
``--group-by`` (config choices such as parameterization). No network is touched.

Seeds and confidence intervals: ``--group-by parameterization,weighting`` (one or more config
choices, comma-separated) groups the runs that agree on all of them; the runs of a group are its
seeds. ``comparison.md`` then also has a table with one row per group: n (its readable runs) and,
per metric, the mean and its 95 % two-sided Student-t interval, ``mean ± t_{0.975,n-1} s/√n``
(``s`` the sample standard deviation, ddof=1; ``n/a`` when n = 1), and plots of the group means
against steps with a shaded 95 % band (``groups_val_*.png``, on the steps that every run of the
group logged) and of the final values with their intervals (``groups_final.png``).
``--baseline parameterization=eps,weighting=elbo`` (one value per ``--group-by`` key) adds a table
of paired differences (group - baseline) per metric: runs paired by seed (only seeds in both
groups, a seed shared by two runs of one group is not paired), the mean difference and its 95 %
t-interval over the n pairs (n - 1 degrees of freedom).

A run that cannot be read (a truncated ``summary.json``, a garbage ``csv/metrics.csv`` or
``.hydra/config.yaml``, no ``summary.json`` because it was killed or is still running) is a row
marked **failed** with the file and the reason, and a warning on stderr; the other runs are
tabulated and plotted as usual (a failed run is no seed of its group). Exit code 0 when at least
one run was read, 2 (with a message) when none was or the command line is wrong (a path that does
not exist, a folder without runs, an unknown ``--group-by`` choice, a ``--baseline`` without
``--group-by``, with other keys, or naming a group that no run is in).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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
# the files with a run's final numbers: training's summary and fit time, an eval's metrics
# (either place); an eval written to <run>/eval_<name>/ adds its numbers as <name>/<key>
FINAL_FILES = ("summary.json", "timing.json", "metrics.json", "eval/metrics.json")
RUN_FOLDER = (
    "a run folder must contain .hydra/config.yaml (Hydra writes it when the run starts) and, "
    "once the run has finished, csv/metrics.csv and summary.json"
)
USAGE_FIX = (
    "pass a multirun folder (outputs/multirun/train/<date_time>) or one or more run folders "
    "(outputs/train/<date_time>)"
)


Seed = int | str  # a run's config seed: an int, or its text when it is something else
LEVEL = 0.95  # the confidence of the intervals (two-sided)


class UnknownColumnError(ConfigError, KeyError):
    """``--columns`` names a metric that no readable run has."""

    __str__ = ConfigError.__str__  # not KeyError's quoted repr


@dataclass
class Run:
    """One run folder: its choices, final metrics and logged curves; ``error`` when it could not
    be read (``<file>: <reason>``, several joined by ``; ``), then ``final`` and ``curves`` are
    empty. ``seed``: the ``seed`` of its ``.hydra/config.yaml`` (None when it has none)."""

    path: Path
    choices: dict[str, str]
    final: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    error: str | None = None
    seed: Seed | None = None

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
    named = sorted(p.parent.name for p in run_dir.glob("eval_?*/metrics.json"))
    final: dict[str, float] = {}
    for name in [*present, *(f"{folder}/metrics.json" for folder in named)]:
        data = _read_json(run_dir, name)
        prefix = f"{name.split('/')[0].removeprefix('eval_')}/" if name.startswith("eval_") else ""
        final.update(
            {
                prefix + k: v
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
    seed: Seed | None = None
    if not _is_run(run_dir):
        problems.append(
            ".hydra/config.yaml: missing (Hydra writes it when the run starts: the run was "
            "deleted in part, or the folder is not a run)"
        )
    else:
        try:
            seed = _seed(_read_yaml(run_dir, ".hydra/config.yaml", dict).get("seed"))
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
        return Run(run_dir, results["choices"], {}, {}, error="; ".join(problems), seed=seed)
    return Run(run_dir, results["choices"], results["final"], results["curves"], seed=seed)


def _seed(value: Any) -> Seed | None:
    """The config's ``seed`` as an int (or its text when it is not an integer); None if unset."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return str(value)


# --- statistics over seeds: Student-t intervals and paired differences ------------------------


class Interval(NamedTuple):
    """A mean over ``n`` values and the half-width of its confidence interval (None when n = 1:
    one value says nothing about the spread)."""

    mean: float
    half_width: float | None
    n: int


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile ``t_{p,df}`` of Student's t distribution with ``df`` degrees of freedom
    (``scipy.stats.t.ppf``), e.g. t_{0.975,1} = 12.706,
    t_{0.975,2} = 4.303, t_{0.975,4} = 2.776, t_{0.975,29} = 2.045."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"t_quantile: df must be at least 1, got {df}")
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, df))


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of ``values`` and the half-width of its two-sided ``level`` Student-t interval.

    With n values x_i: ``mean = Σ x_i / n``, the sample standard deviation
    ``s = √(Σ (x_i - mean)² / (n - 1))`` (ddof=1) and
    ``half_width = t_{(1+level)/2, n-1} · s / √n``; for level 0.95 the interval is
    mean ± t_{0.975,n-1} · s / √n. ``half_width`` is None when n = 1; ``ValueError`` when
    ``values`` is empty.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, None, 1)
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, t_quantile((1.0 + level) / 2.0, n - 1) * s / math.sqrt(n), n)


def _seed_order(seed: Seed | None) -> tuple[int, Any]:
    """Sort key: integer seeds in order, then the others by their text, then no seed."""
    if seed is None:
        return (2, "")
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def paired_differences(
    a_by_seed: Mapping[Seed, float], b_by_seed: Mapping[Seed, float], level: float = LEVEL
) -> tuple[Interval | None, list[Seed]]:
    """The paired differences of two groups of runs, matched by seed.

    Over the n seeds in both mappings (one value per seed in each), ``d_i = a_i - b_i`` and
    ``t_interval(d)``: the mean difference ``Σ d_i / n`` ± ``t_{0.975,n-1} · s_d / √n`` (for
    level 0.95), ``s_d`` the sample standard deviation of the d_i (ddof=1), n - 1 degrees of
    freedom. Returns (that interval, None when no seed is in both; the paired seeds, sorted).
    """
    seeds = sorted(set(a_by_seed) & set(b_by_seed), key=_seed_order)
    if not seeds:
        return None, []
    return t_interval([a_by_seed[s] - b_by_seed[s] for s in seeds], level), seeds


# --- groups of runs: --group-by and --baseline ------------------------------------------------


@dataclass
class Group:
    """The readable runs that agree on every ``--group-by`` key (``values``, one per key; ``""``
    for a run without that choice); its runs are the seeds."""

    keys: tuple[str, ...]
    values: tuple[str, ...]
    runs: list[Run]

    @property
    def label(self) -> str:
        """``key=value,key=value``: the group as ``--baseline`` names it."""
        return ",".join(f"{k}={v}" for k, v in zip(self.keys, self.values, strict=True))

    @property
    def repeated_seeds(self) -> list[Seed]:
        """Seeds that two or more runs of the group share (they count for its mean, but are
        not paired)."""
        seeds = [r.seed for r in self.runs if r.seed is not None]
        return sorted({s for s in seeds if seeds.count(s) > 1}, key=_seed_order)

    @property
    def pairable_seeds(self) -> list[Seed]:
        """The seeds that pair: those of exactly one run of the group."""
        repeated = set(self.repeated_seeds)
        seeds = {r.seed for r in self.runs if r.seed is not None and r.seed not in repeated}
        return sorted(seeds, key=_seed_order)

    def by_seed(self, metric: str) -> dict[Seed, float]:
        """The final ``metric`` of each run that has it, by seed, for pairing: runs without a
        seed and seeds that two runs share are left out."""
        pairable = set(self.pairable_seeds)
        return {
            r.seed: r.final[metric] for r in self.runs if r.seed in pairable and metric in r.final
        }

    def interval(self, metric: str) -> Interval | None:
        """``t_interval`` of the final ``metric`` over the group's runs that have it."""
        values = [r.final[metric] for r in self.runs if metric in r.final]
        return t_interval(values) if values else None


def parse_group_by(value: str | Sequence[str] | None) -> list[str]:
    """The ``--group-by`` keys: a comma-separated string (or a list) of config choices (repeats
    dropped); ``ConfigError`` naming a key that is not a config choice."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    keys: list[str] = []
    for key in (item.strip() for item in items):
        if key not in CHOICES:
            shown = value if isinstance(value, str) else ",".join(items)
            within = f" (in --group-by {shown!r})" if len(items) > 1 else ""
            raise ConfigError(
                f"--group-by {key!r} is not a config choice{within}; use one of: "
                f"{', '.join(CHOICES)}, several comma-separated (e.g. --group-by "
                "parameterization,weighting), or leave it out for one colour per run"
            )
        if key not in keys:
            keys.append(key)
    return keys


def parse_baseline(value: str | Mapping[str, str], keys: Sequence[str]) -> tuple[str, ...]:
    """The baseline group's values, one per ``--group-by`` key (in their order), from
    ``KEY=VALUE[,KEY=VALUE...]`` (or a mapping); ``ConfigError`` when there are no group-by
    keys or the baseline's keys are not exactly them."""
    if isinstance(value, str):
        shown = value
        pairs = []
        for item in value.split(","):
            if "=" not in item:
                example = ",".join(f"{k}=<value>" for k in keys) or "parameterization=eps"
                raise ConfigError(
                    f"--baseline {value!r}: {item.strip()!r} is not KEY=VALUE; give one value "
                    f"per --group-by key, e.g. --baseline {example}"
                )
            key, val = item.split("=", 1)
            pairs.append((key.strip(), val.strip()))
    else:
        pairs = [(str(k), str(v)) for k, v in value.items()]
        shown = ",".join(f"{k}={v}" for k, v in pairs)
    given = [k for k, _ in pairs]
    if not keys:
        raise ConfigError(
            f"--baseline {shown!r} needs --group-by: the baseline is one group of runs, the "
            f"runs that share its values; add --group-by {','.join(dict.fromkeys(given))}"
        )
    if sorted(given) != sorted(keys):
        example = ",".join(f"{k}=<value>" for k in keys)
        raise ConfigError(
            f"--baseline {shown!r} names the key(s) {','.join(given)} but --group-by is "
            f"{','.join(keys)}: give exactly one value per --group-by key, e.g. --baseline "
            f"{example} (or change --group-by to the baseline's keys)"
        )
    chosen = dict(pairs)
    return tuple(chosen[k] for k in keys)


def group_runs(runs: list[Run], keys: Sequence[str]) -> list[Group]:
    """The readable runs grouped by their values of ``keys``, groups sorted by those values."""
    grouped: dict[tuple[str, ...], list[Run]] = {}
    for r in runs:
        if not r.failed:
            grouped.setdefault(tuple(r.choices.get(k, "") for k in keys), []).append(r)
    return [Group(tuple(keys), values, grouped[values]) for values in sorted(grouped)]


def _num(x: float) -> str:
    return f"{x:.7g}"


def _interval_cell(interval: Interval | None, n: int) -> str:
    """``mean ± half-width`` (``± n/a`` for one value), ``(n=k)`` after it when k != n."""
    if interval is None:
        return ""
    half = "n/a" if interval.half_width is None else _num(interval.half_width)
    cell = f"{_num(interval.mean)} ± {half}"
    return cell if interval.n == n else f"{cell} (n={interval.n})"


def _seeds_cell(seeds: Sequence[Seed | None]) -> str:
    return ", ".join("none" if s is None else str(s) for s in sorted(seeds, key=_seed_order))


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _header(head: Sequence[str]) -> list[str]:
    return [_row(head), "|" + "---|" * len(head)]


def _metrics(groups: list[Group], columns: Sequence[str]) -> list[str]:
    return [c for c in columns if any(c in r.final for g in groups for r in g.runs)]


def group_table(groups: list[Group], columns: Sequence[str] = COLUMNS) -> str:
    """One row per group: its ``--group-by`` values, n (its readable runs), their seeds and, per
    metric in ``columns`` (those that some run has), ``mean ± half-width`` of the 95 % Student-t
    interval over the group's runs (``t_interval``: mean ± t_{0.975,n-1} · s / √n, s with
    ddof=1); ``± n/a`` when n = 1, and ``(n=k)`` after the cell when only k runs have the
    metric."""
    keys = list(groups[0].keys) if groups else []
    metrics = _metrics(groups, columns)
    lines = _header([*keys, "n", "seeds", *metrics])
    for g in groups:
        cells = [*g.values, str(len(g.runs)), _seeds_cell([r.seed for r in g.runs])]
        cells += [_interval_cell(g.interval(c), len(g.runs)) for c in metrics]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def paired_table(groups: list[Group], baseline: Group, columns: Sequence[str] = COLUMNS) -> str:
    """One row per group other than ``baseline``: n pairs (the seeds that pair in both groups),
    those seeds and, per metric in ``columns`` (those that some run has), the mean paired
    difference (group - baseline) ± the half-width of its 95 % Student-t interval over the
    pairs (``paired_differences``; ``± n/a`` for one pair, ``no pairs`` without a common seed,
    ``(n=k)`` when only k pairs have the metric)."""
    metrics = _metrics(groups, columns)
    lines = _header(["group", "n pairs", "seeds", *metrics])
    for g in groups:
        if g is baseline:
            continue
        seeds = sorted(set(g.pairable_seeds) & set(baseline.pairable_seeds), key=_seed_order)
        cells = [g.label, str(len(seeds)), _seeds_cell(seeds)]
        for c in metrics:
            interval, _ = paired_differences(g.by_seed(c), baseline.by_seed(c))
            if interval is not None:
                cells.append(_interval_cell(interval, len(seeds)))
            else:  # no common seed has the metric (blank when no run has it)
                has = any(c in r.final for r in [*g.runs, *baseline.runs])
                cells.append("no pairs" if has else "")
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def _groups_section(runs: list[Run], groups: list[Group], columns: Sequence[str]) -> str:
    keys = ", ".join(groups[0].keys)
    failed = [r.name for r in runs if r.failed]
    text = (
        f"\n## Groups by {keys}\n\n"
        "Per group (the runs that agree on every `--group-by` choice; its runs are the seeds): "
        "n, the number of its readable runs, and per metric the mean over them ± the "
        "half-width of its 95 % two-sided Student-t interval, `t_{0.975,n-1} · s / √n` (s the "
        "sample standard deviation, ddof=1); n/a when n = 1.\n\n" + group_table(groups, columns)
    )
    if failed:
        text += f"\nFailed runs (left out of their groups and of n): {', '.join(failed)}.\n"
    return text


def _paired_section(groups: list[Group], baseline: Group, columns: Sequence[str]) -> str:
    text = (
        f"\n## Paired differences to the baseline {baseline.label}\n\n"
        "The differences are (group - baseline), runs paired by seed (only seeds in both "
        "groups, each at most once per group): per metric the mean difference over the n pairs "
        "± the half-width of its 95 % Student-t interval (n - 1 degrees of freedom). An interval "
        "that excludes 0 is a difference that these seeds resolve; one that includes 0 is not "
        "resolved by them.\n\n" + paired_table(groups, baseline, columns)
    )
    notes = [
        f"seed {s} of {g.label} ({sum(r.seed == s for r in g.runs)} runs share it; they count "
        "for the group's mean)"
        for g in groups
        for s in g.repeated_seeds
    ]
    notes += [
        f"run {r.name} of {g.label} (no seed in .hydra/config.yaml)"
        for g in groups
        for r in g.runs
        if r.seed is None
    ]
    if notes:
        text += f"\nNot paired: {'; '.join(notes)}.\n"
    return text


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


def plot_curves(runs: list[Run], out_dir: Path, group_by: str | Sequence[str] | None) -> list[Path]:
    """One PNG per plotted metric: the metric against steps, one line per run, coloured by its
    values of the ``group_by`` choice(s)."""
    keys = [group_by] if isinstance(group_by, str) else list(group_by or [])

    def group_of(r: Run) -> str:
        return ", ".join(f"{k}={r.choices.get(k, '')}" for k in keys)

    groups = sorted({group_of(r) for r in runs})
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
            group = group_of(r)
            label = f"{r.name} ({group})" if keys else r.name
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


def _aligned(runs: list[Run], metric: str) -> tuple[list[int], list[list[float]]]:
    """The steps at which every run logged ``metric``, and at each the runs' values (a run's
    last value at that step)."""
    by_step = [dict(r.curves[metric]) for r in runs]
    steps = sorted(set.intersection(*(set(d) for d in by_step)))
    return steps, [[d[s] for d in by_step] for s in steps]


def plot_groups(groups: list[Group], out_dir: Path, columns: Sequence[str] = COLUMNS) -> list[Path]:
    """The groups' statistics as PNGs.

    Per plotted metric (``PLOTTED``) that some run logged, ``groups_<metric>.png``: each group's
    mean against steps with a shaded 95 % Student-t band (``t_interval`` across the group's runs
    that logged the metric, at the steps that all of them logged; no band for one run). And
    ``groups_final.png``: per metric in ``columns`` (those that some run has) the final value of
    each group, its mean with the 95 % t-interval as an error bar and its runs as dots.
    """
    colours = {g.values: f"C{i % 10}" for i, g in enumerate(groups)}
    written = []
    for metric in PLOTTED:
        logged = [(g, [r for r in g.runs if metric in r.curves]) for g in groups]
        if not any(runs for _, runs in logged):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for g, runs in logged:
            steps, values = _aligned(runs, metric) if runs else ([], [])
            if not steps:
                continue
            stats = [t_interval(v) for v in values]
            means = [s.mean for s in stats]
            colour = colours[g.values]
            ax.plot(
                steps, means, marker="o", ms=3, color=colour, label=f"{g.label} (n={len(runs)})"
            )
            if len(runs) > 1:
                low = [s.mean - (s.half_width or 0.0) for s in stats]
                high = [s.mean + (s.half_width or 0.0) for s in stats]
                ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric} (group mean, 95 % t-band)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / ("groups_" + metric.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    metrics = _metrics(groups, columns)
    if metrics:
        ncols = min(len(metrics), 4)
        nrows = math.ceil(len(metrics) / ncols)
        width = max(3.0, 0.6 * len(groups) + 1.5)
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.5 * nrows), squeeze=False)
        for ax in axes.flat[len(metrics) :]:
            ax.set_visible(False)
        for ax, metric in zip(axes.flat, metrics, strict=False):
            for x, g in enumerate(groups):
                interval = g.interval(metric)
                if interval is None:
                    continue
                colour = colours[g.values]
                half = interval.half_width
                yerr = None if half is None else [[half], [half]]
                ax.errorbar([x], [interval.mean], yerr=yerr, fmt="o", capsize=4, color=colour)
                runs = [r.final[metric] for r in g.runs if metric in r.final]
                ax.scatter([x + 0.15] * len(runs), runs, s=8, color=colour, alpha=0.5)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([",".join(g.values) for g in groups], rotation=30, ha="right")
            ax.set_title(metric, fontsize=9)
            ax.set_xlim(-0.5, len(groups) - 0.5)
        fig.suptitle(
            f"final values by {','.join(groups[0].keys)}: mean ± 95 % t-interval, runs as dots",
            fontsize=9,
        )
        fig.tight_layout()
        path = out_dir / "groups_final.png"
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
    group_by: str | Sequence[str] | None = None,
    columns: list[str] | None = None,
    baseline: str | Mapping[str, str] | None = None,
) -> Path:
    """Write comparison.md and the plots for the runs under ``paths``; returns the table's path.

    ``columns``: the final metrics to tabulate (default: the validation ELBO terms), e.g. keys of
    an eval's metrics.json such as ``elbo_nats`` or ``schedules/own/nll_std``.

    ``group_by``: config choices (comma-separated, or a list); the runs that agree on all of them
    form a group, its runs are the seeds. Adds to comparison.md a table of each group's n and, per
    metric, mean ± the half-width of its 95 % Student-t interval (``group_table``), and writes the
    group plots (``plot_groups``). ``baseline``: ``KEY=VALUE[,KEY=VALUE...]`` (or a mapping), one
    value per ``group_by`` key: adds the table of paired differences (group - baseline) by seed
    (``paired_table``).

    A run that cannot be read is a failed row of the table (with a warning on stderr) and is left
    out of the plots and groups. ``ConfigError`` when no run could be read or an argument is wrong
    (a path that does not exist or holds no run, an unknown ``group_by`` choice, a ``baseline``
    without ``group_by``, with other keys, or naming a group that no readable run is in;
    ``UnknownColumnError``, also a ``KeyError``, for a column that no run has).
    """
    keys = parse_group_by(group_by)
    base_values = None if baseline is None else parse_baseline(baseline, keys)
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
    groups = group_runs(runs, keys) if keys else []
    base = None
    if base_values is not None:
        base = next((g for g in groups if g.values == base_values), None)
        if base is None:
            wanted = ",".join(f"{k}={v}" for k, v in zip(keys, base_values, strict=True))
            raise ConfigError(
                f"--baseline {wanted!r}: no readable run is in that group; the groups of "
                f"--group-by {','.join(keys)} are: {'; '.join(g.label for g in groups)} "
                "(pass one of them to --baseline)"
            )
    out_dir = out_dir or (paths[0] if len(paths) == 1 else Path("."))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a folder to write the comparison in")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        table = out_dir / "comparison.md"
        text = markdown_table(runs, columns or COLUMNS)
        if groups:
            text += _groups_section(runs, groups, columns or COLUMNS)
        if base is not None:
            text += _paired_section(groups, base, columns or COLUMNS)
        table.write_text(text)
        plot_curves(good, out_dir, keys or None)
        if groups:
            plot_groups(groups, out_dir, columns or COLUMNS)
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
        metavar="CHOICE[,CHOICE...]",
        help="colour lines by config choices, and tabulate and plot each group's mean and 95 %% "
        "t-interval over its runs (the seeds); one or more, comma-separated, of "
        f"{', '.join(CHOICES)}",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE...]",
        help="a group (one value per --group-by key, e.g. parameterization=eps): tabulate each "
        "other group's paired differences to it by seed, with 95 %% t-intervals",
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
        # --baseline only when given: wrappers of the four-argument compare keep working
        extra = {} if args.baseline is None else {"baseline": args.baseline}
        table = compare(args.paths, args.out, args.group_by, args.columns, **extra)
    print(table.read_text())
    print(f"wrote {table} and plots in {table.parent}")


if __name__ == "__main__":
    main()
