"""Compare runs offline: ``python -m diffexp.compare <multirun folder | run folders> [options]``.

Reads each run's Hydra config (``.hydra/config.yaml`` and ``overrides.yaml``), its CSV log
(``csv/metrics.csv``) and its final numbers (``summary.json``, and an eval's ``metrics.json`` in
the run folder or its ``eval/`` subfolder),
and writes ``comparison.md`` (one row per run: its choices and final ELBO terms and bits/dim) and
PNG plots of validation metrics against training steps, one line per run, coloured by
``--group-by`` (a config choice such as parameterization). No network is touched.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from diffexp.utils import CHOICE_GROUPS as CHOICES  # noqa: E402

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


@dataclass
class Run:
    """One run folder: its choices, final metrics and logged curves."""

    path: Path
    choices: dict[str, str]
    final: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The folder's name relative to its parent (e.g. the sweep's job number)."""
        return self.path.name


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders under the given paths: folders that hold a ``.hydra/config.yaml``."""
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if (p / ".hydra" / "config.yaml").is_file():
            found.append(p)
        else:
            found.extend(sorted(c.parent.parent for c in p.glob("*/.hydra/config.yaml")))
    if not found:
        raise FileNotFoundError(
            f"no run folders (with .hydra/config.yaml) in {[str(p) for p in paths]}; pass a "
            "multirun folder (outputs/multirun/train/<date>) or run folders"
        )
    return found


def _choices(run_dir: Path) -> dict[str, str]:
    """Hydra's runtime choices of the run (from hydra.yaml), else the overrides."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        runtime = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {})
        choices = runtime.get("choices", {}) or {}
        return {k: str(v) for k, v in choices.items() if k in CHOICES and v is not None}
    return {}


def _curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric as (step, value) pairs from the run's CSV log."""
    path = run_dir / "csv" / "metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return curves
    with path.open() as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    curves.setdefault(key, []).append((step, float(value)))
    return curves


def load_run(run_dir: Path) -> Run:
    """Read one run folder."""
    final: dict[str, float] = {}
    for name in ("summary.json", "metrics.json", "eval/metrics.json"):
        if (run_dir / name).is_file():
            data = json.loads((run_dir / name).read_text())
            final.update({k: v for k, v in data.items() if isinstance(v, (int, float))})
    return Run(run_dir, _choices(run_dir), final, _curves(run_dir))


def markdown_table(runs: list[Run], columns: tuple[str, ...] | list[str] = COLUMNS) -> str:
    """One row per run: the choices that vary between runs and the final metrics in
    ``columns`` (those that some run has)."""
    varying = [c for c in CHOICES if len({r.choices.get(c) for r in runs}) > 1] or [
        c for c in CHOICES if any(c in r.choices for r in runs)
    ]
    columns = [c for c in columns if any(c in r.final for r in runs)]
    head = ["run", *varying, *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        values = [f"{r.final[c]:.4f}" if c in r.final else "" for c in columns]
        lines.append(
            "| " + " | ".join([r.name, *(r.choices.get(c, "") for c in varying), *values]) + " |"
        )
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


def compare(
    paths: list[Path],
    out_dir: Path | None = None,
    group_by: str | None = None,
    columns: list[str] | None = None,
) -> Path:
    """Write comparison.md and the plots for the runs under ``paths``; returns the table's path.

    ``columns``: the final metrics to tabulate (default: the validation ELBO terms), e.g. keys of
    an eval's metrics.json such as ``elbo_nats`` or ``schedules/own/nll_std``.
    """
    runs = [load_run(p) for p in find_runs(paths)]
    if columns:
        known = sorted({k for r in runs for k in r.final})
        missing = [c for c in columns if c not in known]
        if missing:
            raise KeyError(f"no run has the column(s) {missing}; the runs have: {known}")
    out_dir = out_dir or (paths[0] if len(paths) == 1 else Path("."))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "comparison.md"
    table.write_text(markdown_table(runs, columns or COLUMNS))
    plot_curves(runs, out_dir, group_by)
    return table


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun folder or run folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the folder)"
    )
    parser.add_argument(
        "--group-by", default=None, choices=CHOICES, help="colour lines by a choice"
    )
    parser.add_argument(
        "--columns",
        nargs="+",
        default=None,
        help="final metrics to tabulate (default: the validation ELBO terms); keys of "
        "summary.json or of an eval's metrics.json (<run>/metrics.json or <run>/eval/)",
    )
    args = parser.parse_args()
    table = compare(args.paths, args.out, args.group_by, args.columns)
    print(table.read_text())
    print(f"wrote {table} and plots in {table.parent}")


if __name__ == "__main__":
    main()
