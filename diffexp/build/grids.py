"""Optimized time grids on disk: where a model's grid file is, what it holds, and its checks.

``python -m diffexp.optimize_grid`` fits a grid to a model for one sampler and number of steps
(``diffexp.diffusion.grid_search``) and writes it next to the checkpoint,
``<checkpoint folder>/grids/<Sampler>-<steps>.json`` (``grid=<file>`` to choose the file; with
``network=oracle``, which has no checkpoint, ``grid=`` is needed). ``eval`` and ``sample`` with
``sampler.time_grid=optimized`` read it back; a grid fitted to other sampler settings or another
number of steps is refused before any compute.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffexp.build.checks import ConfigError

# the settings that do not identify the sampler a grid was fitted for
_NOT_IDENTIFYING = ("steps", "time_grid", "times")


def uses_optimized_grid(cfg: DictConfig, key: str = "sampler") -> bool:
    """Whether the sampler at ``key`` asks for ``time_grid=optimized``."""
    return OmegaConf.select(cfg, f"{key}.time_grid") == "optimized"


def sampler_steps(cfg: DictConfig) -> int:
    """The number of steps the command runs: ``steps=`` if set, else the sampler's."""
    return int(cfg.get("steps") or cfg.sampler.steps)


def sampler_name(cfg_sampler: DictConfig) -> str:
    """The sampler's class name (the last part of its ``_target_``)."""
    return str(cfg_sampler._target_).rsplit(".", 1)[-1]


def identifying_settings(sampler: Any) -> dict[str, Any]:
    """The sampler's settings that a grid depends on (all but steps, time_grid and times)."""
    return {k: v for k, v in sampler.settings().items() if k not in _NOT_IDENTIFYING}


def grid_path(cfg: DictConfig) -> Path:
    """``grid=`` if set, else ``<checkpoint folder>/grids/<Sampler>-<steps>.json``."""
    from diffexp.build.runs import resolve_checkpoint

    if cfg.get("grid"):
        return Path(str(cfg.grid)).expanduser()
    ckpt = resolve_checkpoint(cfg.get("run"), cfg.get("ckpt"))
    if ckpt is None:
        raise ConfigError(
            "sampler.time_grid=optimized without run= or ckpt=: a grid fitted to the configured "
            "network has no checkpoint to sit next to. Pass grid=<the file python -m "
            "diffexp.optimize_grid wrote> (it prints the path)."
        )
    return ckpt.parent / "grids" / f"{sampler_name(cfg.sampler)}-{sampler_steps(cfg)}.json"


def save_grid(path: Path, record: dict[str, Any]) -> Path:
    """Write the grid's record as JSON, atomically (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".grid-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_grid_times(cfg: DictConfig) -> list[float] | None:
    """The times of the grid file for ``sampler.time_grid=optimized`` (None for a fixed grid),
    checked against the configured sampler and steps; a ConfigError naming the fix otherwise."""
    if not uses_optimized_grid(cfg):
        return None
    from hydra.utils import instantiate

    path = grid_path(cfg)
    steps = sampler_steps(cfg)
    fit = (
        f"python -m diffexp.optimize_grid <the same run=/ckpt=> sampler=<the same> steps={steps}"
        f"{f' grid={path}' if cfg.get('grid') else ''}"
    )
    if not path.is_file():
        raise ConfigError(
            f"sampler.time_grid=optimized: no grid file {path}. Fit one first ({fit}), pass "
            "grid=<file> for another, or choose a fixed grid (sampler.time_grid=log_snr, "
            "uniform or karras)."
        )
    try:
        record = json.loads(path.read_text())
        times = [float(t) for t in record["times"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"grid={path} is not a grid file of diffexp.optimize_grid ({err})."
        ) from None
    name = sampler_name(cfg.sampler)
    if record.get("sampler") != name or len(times) != steps + 1:
        raise ConfigError(
            f"grid={path} was fitted for {record.get('sampler')} with {len(times) - 1} steps, "
            f"not {name} with steps={steps}. Fit a grid for this sampler and number of steps "
            f"({fit})."
        )
    wanted = identifying_settings(instantiate(cfg.sampler, steps=steps, time_grid="log_snr"))
    stored = record.get("settings", {})
    differ = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
    if differ:
        listed = ", ".join(
            f"sampler.{k}={new!r} (the grid's: {old!r})" for k, (old, new) in differ.items()
        )
        raise ConfigError(
            f"grid={path} was fitted with other sampler settings: {listed}. Use the grid's "
            f"settings on the command line, or fit a grid for these ({fit})."
        )
    return times
