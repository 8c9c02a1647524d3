"""Train a noisy classifier for classifier guidance: ``python -m diffexp.train_classifier``.

The classifier p_phi(y | x_t, log-SNR) learns the labels of a labelled data set at every noise
level of the configured schedule. ``classifier.kind=auto`` picks an MLP for vectors and a conv
net for images, sized from the data module. The run writes ``checkpoints/last.ckpt``, which
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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffexp.build.factory import ConfigError, build_datamodule
from diffexp.cli import CONF_DIR, refusing_bad_input, run_cli
from diffexp.data import LABELLED_DATA
from diffexp.networks.classifier import NoisyConvClassifier, NoisyMLPClassifier
from diffexp.training.classifier_module import (
    CLASSIFIER_CLASSES,
    NETWORK_KEY,
    NoisyClassifierModule,
    build_classifier_from_spec,
)
from diffexp.training.loggers import (
    hydra_choices,
    offline_wandb_by_default,
    training_run,
    write_json,
)

__all__ = ["TrainedClassifier", "classifier_spec", "summary_line", "train_noisy_classifier"]

KINDS = ("auto", "mlp", "conv")


def _target(cls: type) -> str:
    """The ``_target_`` string of a classifier class."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name not in CLASSIFIER_CLASSES:
        raise ValueError(f"{name} is not a loadable noisy classifier class")
    return name


def classifier_spec(cfg_classifier: DictConfig, datamodule: Any) -> dict[str, Any]:
    """``{"_target_": <classifier class>, **kwargs}`` for the data: sizes and classes from it."""
    shape = tuple(int(s) for s in datamodule.shape)
    kind = str(cfg_classifier.get("kind", "auto"))
    if kind not in KINDS:
        raise ConfigError(f"unknown classifier.kind={kind!r}; valid: {', '.join(KINDS)}")
    if kind == "auto":
        kind = "mlp" if len(shape) == 1 else "conv"
    common = {
        "num_classes": int(datamodule.num_classes),
        "log_snr_scale": float(cfg_classifier.get("log_snr_scale", 10.0)),
    }
    if kind == "mlp":
        if len(shape) != 1:
            raise ConfigError(
                f"classifier.kind=mlp takes vectors; the data has shape {shape}. "
                "Use classifier.kind=conv (or auto) for images."
            )
        return {
            "_target_": _target(NoisyMLPClassifier),
            "dim": shape[0],
            "width": int(cfg_classifier.get("width", 256)),
            "depth": int(cfg_classifier.get("depth", 3)),
            **common,
        }
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(
            f"classifier.kind=conv takes square images [C, H, H]; the data has shape {shape}. "
            "Use classifier.kind=mlp (or auto) for vectors."
        )
    return {
        "_target_": _target(NoisyConvClassifier),
        "in_channels": shape[0],
        "image_size": shape[1],
        "base_channels": int(cfg_classifier.get("base_channels", 32)),
        **common,
    }


def check_labelled(datamodule: Any, data_name: str) -> None:
    """A ConfigError naming the labelled data sets when ``datamodule`` has no labels."""
    labelled = getattr(datamodule, "labelled", datamodule.num_classes > 0)
    if not labelled or datamodule.num_classes < 2:
        raise ConfigError(
            f"classifier guidance needs a labelled data set; data={data_name} has no labels "
            f"(num_classes={datamodule.num_classes}). Use one of data=" + ", ".join(LABELLED_DATA)
        )


def _data_name(cfg: DictConfig) -> str:
    """The data option's name: Hydra's choice, else the preset / toy name, else the target."""
    return hydra_choices().get("data") or str(
        cfg.data.get("preset") or cfg.data.get("name") or cfg.data.get("_target_")
    )


def build_classifier_module(cfg: DictConfig, datamodule: Any) -> NoisyClassifierModule:
    """The LightningModule for ``cfg`` on ``datamodule``, its config with the classifier spec."""
    check_labelled(datamodule, _data_name(cfg))
    spec = classifier_spec(cfg.classifier, datamodule)
    classifier = build_classifier_from_spec(spec)
    with torch.no_grad():
        try:
            classifier(torch.zeros(2, *datamodule.shape), torch.zeros(2))
        except (ValueError, RuntimeError) as err:
            raise ConfigError(
                f"the classifier cannot take data of shape {tuple(datamodule.shape)}: {err}"
            ) from err
    config = OmegaConf.to_container(cfg, resolve=True)
    config[NETWORK_KEY] = spec
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
