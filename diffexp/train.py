"""Train a diffusion model: ``python -m diffexp.train [group=option ...]``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffexp.factory import ConfigError, build_datamodule, build_module
from diffexp.objectives import log_implied_weighting
from diffexp.utils import (
    log,
    offline_wandb_by_default,
    training_run,
    write_json,
)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured module, validate it once more, and return the final val metrics."""
    offline_wandb_by_default()
    refuse_multirun_with_subprocess_ddp(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    module = build_module(cfg, datamodule)
    with training_run(cfg) as trainer:
        if trainer.is_global_zero:
            log_implied_weighting(module, datamodule.dim, trainer, Path(cfg.paths.output_dir))
        if module.has_trainable_parameters():
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        else:
            log.info(
                "nothing to train (network=%s has no parameters): validating only",
                cfg.network.get("_target_"),
            )
        metrics: dict[str, Any] = {}
        if not cfg.trainer.get("fast_dev_run"):
            results = trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
            if trainer.is_global_zero:
                print(summary_line(metrics))
                write_json(Path(cfg.paths.output_dir) / "summary.json", metrics)
    return metrics


def refuse_multirun_with_subprocess_ddp(cfg: DictConfig) -> None:
    """Hydra's local multirun launcher and Lightning's subprocess DDP do not mix: stop early."""
    if not HydraConfig.initialized() or str(HydraConfig.get().mode) != "RunMode.MULTIRUN":
        return
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    many = devices in (-1, "auto") or (str(devices).isdigit() and int(devices) > 1)
    if strategy == "ddp" and many and "submitit" not in launcher:
        raise ConfigError(
            f"multirun with trainer.strategy=ddp on devices={devices} is not supported: Lightning "
            "would re-launch this script once per device inside a sweep job. Supported ways: "
            "trainer=ddp_spawn (processes spawned inside each job), the SLURM launcher "
            "(hydra/launcher=submitit_slurm, one task per GPU), or one process per job "
            "(trainer.devices=1)."
        )


def summary_line(metrics: dict[str, float]) -> str:
    """One line: the validation ELBO next to the true log-likelihood when it is known."""
    if "val/elbo_nats" not in metrics:
        return "no validation ELBO was logged (is callbacks.elbo disabled?)"
    elbo = metrics["val/elbo_nats"]
    bpd = metrics.get("val/bpd", math.nan)
    se = metrics.get("val/elbo_nats_se", math.nan)
    line = f"validation ELBO: {elbo:.4f} +- {se:.4f} nats/example (bits/dim {bpd:.4f})"
    if "val/true_log_likelihood_nats" in metrics:
        true_ll = metrics["val/true_log_likelihood_nats"]
        gap_se = metrics.get("val/elbo_gap_nats_se", math.nan)
        line += (
            f"; true log-likelihood: {true_ll:.4f} nats/example; "
            f"gap: {true_ll - elbo:.4f} +- {gap_se:.4f} nats"
        )
    return line


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` (for sweepers that optimize it)."""
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The final validation metric a sweeper optimizes; a clear error when it was not logged."""
    if name is None:
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric={name!r} was not logged by this run; logged: "
            f"{', '.join(sorted(metrics)) or 'nothing (is validation disabled?)'}"
        )
    return float(metrics[name])


if __name__ == "__main__":
    main()
