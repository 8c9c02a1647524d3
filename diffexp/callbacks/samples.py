"""Draws samples with the configured sampler, plots them against data, logs the plot."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from diffexp.diffusion.samplers import Sampler
from diffexp.metrics.plots import plot_samples


class SamplePlot(pl.Callback):
    """Every ``every_n_epochs`` validation epochs and at the end of training: samples vs data.

    The PNG goes to ``dirpath`` (in the run folder) and to W&B as ``samples``. Noise is seeded
    with ``seed`` + rank so each DDP rank draws different samples; rank 0 writes.
    """

    def __init__(
        self, sampler: Sampler, dirpath: str, n: int = 2000, every_n_epochs: int = 10, seed: int = 0
    ):
        self.sampler, self.dirpath = sampler, Path(dirpath)
        self.n, self.every_n_epochs, self.seed = int(n), int(every_n_epochs), int(seed)
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.draw(trainer, pl_module, f"epoch_{trainer.current_epoch:04d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module, "final")

    @torch.no_grad()
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path | None:
        """Sample, plot against the validation data, save and log; returns the PNG's path."""
        datamodule = trainer.datamodule
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed + trainer.global_rank)
        was_training = pl_module.training
        pl_module.eval()
        result = self.sampler.sample(
            pl_module.eval_denoiser,
            (self.n, *datamodule.shape),
            generator=gen,
            device=pl_module.device,
        )
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return None
        reference = datamodule.reference(self.n, seed=self.seed + 1)
        title = f"step {trainer.global_step}, {self.sampler!r}, NFE {result.nfe}"
        path = plot_samples(result.x, reference, self.dirpath / f"{name}.png", title)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
        self.last_path = path
        return path
