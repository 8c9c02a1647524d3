"""Glue for the entry points: loggers, callbacks, W&B's lifecycle, the logged config."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffexp.cli import in_multirun

log = logging.getLogger("diffexp")

# the config groups that are the paper's choices: they become W&B tags and dashboard filters
CHOICE_GROUPS = (
    "data",
    "schedule",
    "parameterization",
    "weighting",
    "noise_sampling",
    "network",
    "sampler",
    "guidance",
    "objective",
)


def offline_wandb_by_default() -> None:
    """W&B never waits on the network: offline unless the user set WANDB_MODE."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


def hydra_choices() -> dict[str, str]:
    """Hydra's runtime choices (group -> option), empty outside a Hydra app."""
    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}


def tag_wandb(cfg: DictConfig) -> None:
    """Tag the W&B logger with the paper's choices; a sweep's jobs share one group."""
    wandb_cfg = cfg.get("logger", {}).get("wandb") if cfg.get("logger") else None
    if wandb_cfg is None:
        return
    choices = hydra_choices()
    tags = [f"{g}:{choices[g]}" for g in CHOICE_GROUPS if g in choices] + list(cfg.get("tags", []))
    with open_dict(cfg):
        wandb_cfg.tags = tags
        if wandb_cfg.get("group") is None and in_multirun():
            wandb_cfg.group = Path(HydraConfig.get().sweep.dir).name


def instantiate_all(cfg_group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (loggers, callbacks)."""
    if not cfg_group:
        return []
    return [instantiate(c) for c in cfg_group.values() if c is not None and "_target_" in c]


def log_config(loggers: list[Any], cfg: DictConfig) -> None:
    """Log the resolved config and Hydra's runtime choices to every logger."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params["choices"] = hydra_choices()
    for lg in loggers:
        lg.log_hyperparams(params)


@contextlib.contextmanager
def closing_wandb() -> Iterator[None]:
    """Run a job and finish its W&B run afterwards, also after an exception."""
    failed = True
    try:
        yield
        failed = False
    finally:
        import sys

        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=1 if failed else 0)


@contextlib.contextmanager
def training_run(cfg: DictConfig, continue_csv_before: int | None = None) -> Iterator[Any]:
    """W&B tagged and closed afterwards; yields the Trainer with the configured loggers and
    callbacks, the resolved config already logged to every logger. ``continue_csv_before``: the
    step a run continued in its own folder resumes at (its CSV log keeps the rows before it)."""
    tag_wandb(cfg)
    with closing_wandb():
        loggers = instantiate_all(cfg.get("logger"))
        callbacks = instantiate_all(cfg.get("callbacks"))
        if not cfg.trainer.get("enable_progress_bar", True):  # the switch keeps its meaning
            from pytorch_lightning.callbacks import ProgressBar

            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        trainer = instantiate(
            cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=trainer_plugins(cfg)
        )
        if continue_csv_before is not None:
            continue_csv_log(loggers, continue_csv_before)
        log_config(loggers, cfg)
        yield trainer


def trainer_plugins(cfg: DictConfig) -> list[Any]:
    """The configured plugins; on SLURM, Lightning's own requeue is off (``training.preemption``
    stops at a step's end, writes last.ckpt and requeues)."""
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def continue_csv_log(loggers: list[Any], step: int) -> None:
    """Start each CSV logger's metrics.csv with its own rows from before ``step`` (Lightning's CSV
    writer deletes the old file when it starts, so they are read first)."""
    from pytorch_lightning.loggers import CSVLogger

    from diffexp.training.resume import rows_before

    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        header, rows = rows_before(Path(lg.log_dir) / "metrics.csv", step)
        if rows:
            writer = lg.experiment
            with open(writer.metrics_file_path, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(rows)
            writer.metrics_keys = list(header)


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON atomically (through a temporary file and a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
