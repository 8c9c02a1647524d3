"""Train a noisy classifier for classifier guidance: ``python -m diffexp.train_classifier``.

The classifier p_phi(y | x_t, log-SNR) learns the labels of a labelled data set at every noise
level of the configured schedule. The ``classifier`` group picks the network: ``auto`` (default)
an MLP for vectors and a conv net for images, ``mlp`` or ``conv``; its keys left null (shape, sizes,
classes) come from the data module. The run writes ``checkpoints/last.ckpt``, which
``guidance=classifier guidance.classifier=<that file>`` samples with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffexp.build.factory import build_datamodule, labelled_data_options
from diffexp.cli import CONF_DIR, ConfigError, refusing_bad_input, run_cli
from diffexp.networks.classifier import classifier_spec
from diffexp.training.classifier_module import (
    CLASSIFIER_CLASSES,
    NETWORK_KEY,
    NoisyClassifierModule,
)
from diffexp.training.loggers import (
    hydra_choices,
    offline_wandb_by_default,
    training_run,
    write_json,
)

__all__ = ["TrainedClassifier", "build_classifier", "summary_line", "train_noisy_classifier"]


def _option(cfg_classifier: DictConfig) -> str:
    """The classifier as the command line names it (classifier=mlp), else by its target."""
    choice = hydra_choices().get("classifier")
    if choice:
        return f"classifier={choice}"
    return f"classifier {str(cfg_classifier.get('_target_', '?')).rsplit('.', 1)[-1]}"


def _square_image(shape: tuple[int, ...], option: str) -> tuple[int, int]:
    """(channels, side) of square images [C, H, H]; a clear error for anything else."""
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(
            f"{option} takes square images [C, H, H]; the data has shape {shape}. "
            "Use classifier=mlp (or auto) for vectors."
        )
    return shape[0], shape[1]


def _vector_dim(shape: tuple[int, ...], option: str) -> int:
    """The dimension of vectors [d]; a clear error for anything else."""
    if len(shape) != 1:
        raise ConfigError(
            f"{option} takes vectors; the data has shape {shape}. "
            "Use classifier=conv (or auto) for images."
        )
    return shape[0]


def build_classifier(cfg_classifier: DictConfig, datamodule: Any) -> nn.Module:
    """The classifier of the ``classifier`` group; its keys left null (``shape``, ``dim``,
    ``in_channels``, ``image_size``, ``num_classes``) come from the data module."""
    shape = tuple(int(s) for s in datamodule.shape)
    option = _option(cfg_classifier)
    from_data = {
        "shape": lambda: list(shape),
        "dim": lambda: _vector_dim(shape, option),
        "in_channels": lambda: _square_image(shape, option)[0],
        "image_size": lambda: _square_image(shape, option)[1],
        "num_classes": lambda: int(datamodule.num_classes),
    }
    kwargs = {
        k: get()
        for k, get in from_data.items()
        if k in cfg_classifier and cfg_classifier[k] is None
    }
    try:
        classifier = instantiate(cfg_classifier, **kwargs)
    except InstantiationException as err:
        # refused arguments (num_classes < 2, auto on data that no classifier takes, a key the
        # class does not take) are the command line's; anything else is a bug
        if not isinstance(err.__cause__, (ValueError, TypeError)):
            raise
        raise ConfigError(f"{option}: {err.__cause__}") from err
    if type(classifier) not in CLASSIFIER_CLASSES.values():
        raise ConfigError(
            f"{option} built a {type(classifier).__name__}; a noisy classifier must be one of "
            f"{sorted(CLASSIFIER_CLASSES)} (what its checkpoint can be loaded as)"
        )
    return classifier


def check_labelled(datamodule: Any, cfg: DictConfig) -> None:
    """A ConfigError naming the labelled data sets when ``datamodule`` has no labels."""
    labelled = getattr(datamodule, "labelled", datamodule.num_classes > 0)
    if not labelled or datamodule.num_classes < 2:
        raise ConfigError(
            f"classifier guidance needs a labelled data set; data={_data_name(cfg)} has no labels "
            f"(num_classes={datamodule.num_classes}). Use one of data="
            + ", ".join(labelled_data_options(cfg))
        )


def _data_name(cfg: DictConfig) -> str:
    """The data option's name: Hydra's choice, else the preset / toy name, else the target."""
    return hydra_choices().get("data") or str(
        cfg.data.get("preset") or cfg.data.get("name") or cfg.data.get("_target_")
    )


def build_classifier_module(cfg: DictConfig, datamodule: Any) -> NoisyClassifierModule:
    """The LightningModule for ``cfg`` on ``datamodule``, its config with the classifier spec."""
    check_labelled(datamodule, cfg)
    classifier = build_classifier(cfg.classifier, datamodule)
    with torch.no_grad():
        try:
            classifier(torch.zeros(2, *datamodule.shape), torch.zeros(2))
        except (ValueError, RuntimeError) as err:
            raise ConfigError(
                f"the classifier cannot take data of shape {tuple(datamodule.shape)}: {err}"
            ) from err
    config = OmegaConf.to_container(cfg, resolve=True)
    # what load_noisy_classifier rebuilds the classifier from: its class and arguments
    config[NETWORK_KEY] = classifier_spec(classifier)
    lr_scheduler = cfg.get("lr_scheduler")
    return NoisyClassifierModule(
        classifier=classifier,
        schedule=instantiate(cfg.schedule),
        optimizer=instantiate(cfg.optimizer),
        config=config,
        lr_scheduler=instantiate(lr_scheduler) if lr_scheduler else None,
        band_edges=list(cfg.get("band_edges", (5.0, 0.0, -5.0))),
    )


@dataclass
class TrainedClassifier:
    """A finished run: the module, its data, the final validation metrics, the checkpoint."""

    module: NoisyClassifierModule
    datamodule: Any
    metrics: dict[str, float]
    checkpoint: Path | None


def train_noisy_classifier(cfg: DictConfig) -> TrainedClassifier:
    """Fit the configured noisy classifier, save checkpoints/last.ckpt, validate it once more."""
    offline_wandb_by_default()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    module = build_classifier_module(cfg, datamodule)
    with training_run(cfg) as trainer:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if cfg.trainer.get("fast_dev_run"):
            return TrainedClassifier(module, datamodule, {}, None)
        # the final weights, whatever step the checkpoint callback last saved at
        checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(checkpoint, weights_only=False)
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        if trainer.is_global_zero:
            write_json(
                Path(cfg.paths.output_dir) / "summary.json",
                {**metrics, "checkpoint": str(checkpoint)},
            )
            print(summary_line(metrics, checkpoint))
    return TrainedClassifier(module, datamodule, metrics, checkpoint)


def summary_line(metrics: dict[str, float], checkpoint: Path | None) -> str:
    """One line: the validation accuracy (overall and per log-SNR band) and the checkpoint."""
    acc, loss = metrics.get("val/accuracy"), metrics.get("val/loss", math.nan)
    if acc is None:
        return f"no validation accuracy was logged; classifier checkpoint: {checkpoint}"
    prefix = "val/accuracy_band/"
    bands = ", ".join(
        f"{k[len(prefix) :].replace('_to_', '..')}: {v:.4f}"
        for k, v in metrics.items()
        if k.startswith(prefix)
    )
    return (
        f"noisy classifier validation accuracy: {acc:.4f} over t ~ U(0, 1) "
        f"(by log-SNR band: {bands or 'none logged'}); cross-entropy {loss:.4f} nats; "
        f"checkpoint: {checkpoint}"
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_classifier")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the validation accuracy (for sweepers that optimize it)."""
    with refusing_bad_input():
        return train_noisy_classifier(cfg).metrics.get("val/accuracy")


def run() -> None:
    """Console script ``diffexp-train-classifier``: ``main`` with the command line's exit codes."""
    run_cli(main)


if __name__ == "__main__":
    run()
