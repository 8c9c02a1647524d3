"""Samples during training: a scatter plot against data (vectors) or an image grid (images).

The noise comes from a generator re-seeded with the same seed each time, so successive plots
show the same noise decoded by a model that keeps training.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor

from diffexp.diffusion.samplers import Sampler
from diffexp.metrics.plots import plot_samples, save_image_grid


class SamplePlot(pl.Callback):
    """Every ``every_n_epochs`` validation epochs and at the end of training: a PNG of samples.

    Vector data: ``n`` samples against as many held-out data points (scatter, or histograms in
    1-D). Images: a ``nrow`` x ``nrow`` grid; with a conditional network the labels cycle
    through the classes. The PNG goes to ``dirpath`` (in the run folder) and to W&B
    (``samples``). Rank 0 draws and writes.
    """

    def __init__(
        self,
        sampler: Sampler,
        dirpath: str,
        n: int = 2000,
        every_n_epochs: int = 10,
        seed: int = 0,
        nrow: int = 8,
    ):
        self.sampler, self.dirpath = sampler, Path(dirpath)
        self.n, self.every_n_epochs, self.seed = int(n), int(every_n_epochs), int(seed)
        self.nrow = int(nrow)
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.draw(trainer, pl_module, f"epoch_{trainer.current_epoch:04d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module, "final")

    @staticmethod
    def _labels(pl_module: pl.LightningModule, n: int) -> Tensor | None:
        num_classes = getattr(pl_module.denoiser.network, "num_classes", 0)
        if not num_classes:
            return None
        return torch.arange(n, device=pl_module.device) % num_classes

    @torch.no_grad()
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path | None:
        """Sample with fixed noise, save the PNG and log it; returns its path (rank 0)."""
        if not trainer.is_global_zero:
            return None
        datamodule = trainer.datamodule
        images = len(datamodule.shape) == 3
        n = self.nrow * self.nrow if images else self.n
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        result = self.sampler.sample(
            pl_module.eval_denoiser,
            (n, *datamodule.shape),
            y=self._labels(pl_module, n),
            generator=gen,
            device=pl_module.device,
        )
        pl_module.train(was_training)
        path = self.dirpath / f"{name}.png"
        title = f"step {trainer.global_step}, {self.sampler!r}, NFE {result.nfe}"
        if images:
            save_image_grid(result.x, path, nrow=self.nrow)
        else:
            plot_samples(result.x, datamodule.reference(n, seed=self.seed + 1), path, title)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="samples", images=[str(path)], step=trainer.global_step, caption=[title]
                )
        self.last_path = path
        return path
