"""Train a diffusion model: ``python -m diffexp.train [group=option ...]``."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from diffexp.build.checks import check_train
from diffexp.cli import CONF_DIR, ConfigError, in_multirun, refusing_bad_input, run_cli

# Lightning, torch and the model are imported by ``train`` after the config is checked: a refusal
# of a bad value takes a fraction of a second, not the seconds those imports cost.


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured module, validate it once more, and return the final val metrics.

    ``ckpt_path`` resumes (a file, or ``auto``: this run folder's last.ckpt when there is one);
    a stop on a signal exits with ``training.preemption.Interrupted`` after writing last.ckpt.
    """
    check_train(cfg)
    refuse_multirun_with_subprocess_ddp(cfg)
    from diffexp.training.resume import plan_resume

    plan = plan_resume(cfg)
    import pytorch_lightning as pl

    from diffexp.build.factory import build_datamodule, build_module
    from diffexp.objectives import log_implied_weighting
    from diffexp.training.loggers import offline_wandb_by_default, training_run, write_json

    offline_wandb_by_default()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data, require_files=True)
    module = build_module(cfg, datamodule)
    continuing = plan is not None and plan.same_folder
    if continuing and plan.wandb_run_id and cfg.get("logger") and cfg.logger.get("wandb"):
        with open_dict(cfg):
            cfg.logger.wandb.id, cfg.logger.wandb.resume = plan.wandb_run_id, "allow"
    if continuing:  # a finished leg's summary is not this run's: it is written again at the end
        Path(cfg.paths.output_dir, "summary.json").unlink(missing_ok=True)
    with training_run(cfg, continue_csv_before=plan.step if continuing else None) as trainer:
        if trainer.is_global_zero and plan is None:
            log_implied_weighting(module, datamodule.dim, trainer, Path(cfg.paths.output_dir))
        fit_time = math.nan
        if module.has_trainable_parameters():
            start = time.perf_counter()
            fit(trainer, module, datamodule, plan)
            fit_time = time.perf_counter() - start
        else:
            from diffexp.training.loggers import log

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
                # wall time of this process's fit, its validations included (a resumed run: the
                # last leg); apart from summary.json, which a resumed run reproduces exactly
                if not math.isnan(fit_time):
                    write_json(Path(cfg.paths.output_dir) / "timing.json", {"fit_time_s": fit_time})
    return metrics


def fit(trainer: Any, module: Any, datamodule: Any, plan: Any) -> None:
    """``trainer.fit``, resumed from ``plan``'s checkpoint; SIGTERM, SIGINT and SLURM's
    preemption signal stop it at a step's end, and it exits with ``Interrupted``."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from diffexp.training.preemption import GracefulStop

    stop = GracefulStop(trainer)
    if trainer.world_size == 1:
        # a resume inside an epoch is exact on one process (the sampler skips the trained
        # batches), whatever Lightning's warning about loaders without a saved position says;
        # under DDP the warning is right and stays
        warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before")
    try:
        with stop.installed():
            trainer.fit(
                module,
                datamodule=datamodule,
                ckpt_path=str(plan.path) if plan is not None else None,
                weights_only=True,
            )
    except SIGTERMException:
        interrupted = stop.interrupted()
        if trainer.is_global_zero:
            print(interrupted_line(interrupted, Path(trainer.default_root_dir)), flush=True)
        raise interrupted from None


def interrupted_line(interrupted: Any, run_dir: Path) -> str:
    """What happened and how to continue, for a run stopped on a signal."""
    import signal

    name = signal.Signals(interrupted.signum).name
    then = (
        "the SLURM job was requeued and resumes with ckpt_path=auto"
        if interrupted.requeued
        else f"resume with the same command plus hydra.run.dir={run_dir} ckpt_path=auto"
    )
    return f"stopped by {name} after step {interrupted.step}: last.ckpt written; {then}"


def refuse_multirun_with_subprocess_ddp(cfg: DictConfig) -> None:
    """Hydra's local multirun launcher and Lightning's subprocess DDP do not mix: stop early."""
    if not in_multirun():
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` (for sweepers that optimize it)."""
    with refusing_bad_input():
        return optimized_value(train(cfg), cfg.get("optimized_metric"))


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The final validation metric a sweeper optimizes; a clear error when it was not logged."""
    if name is None:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name!r} was not logged by this run; logged: "
            f"{', '.join(sorted(metrics)) or 'nothing (is validation disabled?)'}"
        )
    return float(metrics[name])


def run() -> None:
    """Console script ``diffexp-train``: ``main`` with the command line's exit codes."""
    run_cli(main)


if __name__ == "__main__":
    run()
