"""The adaptive p(lambda) as it is learned: a plot next to the objective's implied w(lambda)."""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from diffexp.diffusion.weighting import implied_log_weight
from diffexp.metrics.plots import plot_weightings


class NoiseDensityPlot(pl.Callback):
    """On every validation of a run with ``noise_sampling=adaptive`` (rank 0): a PNG of the
    current p(lambda) (dashed) over the implied w(lambda) of the objective, each divided by its
    maximum, to ``dirpath/step_<step>.png`` and to W&B (``noise_sampling/density``); a no-op for
    every other density (they do not change)."""

    def __init__(self, dirpath: str, n_points: int = 401) -> None:
        self.dirpath, self.n_points = Path(dirpath), int(n_points)
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        adaptive = getattr(pl_module, "adaptive", None)
        if adaptive is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.last_path = self.draw(pl_module, trainer.global_step, trainer.datamodule)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="noise_sampling/density",
                    images=[str(self.last_path)],
                    step=trainer.global_step,
                )

    @torch.no_grad()
    def draw(self, pl_module: pl.LightningModule, step: int, datamodule) -> Path:
        """The plot of p(lambda) and w(lambda) at training step ``step``; returns its path."""
        schedule, adaptive = pl_module.schedule, pl_module.adaptive
        lam_0, lam_1 = schedule.endpoints
        lam = torch.linspace(lam_1, lam_0, self.n_points, dtype=torch.float64)
        p = torch.exp(adaptive.log_density(schedule, lam.to(adaptive.moments.device))).cpu()
        log_w = (
            implied_log_weight(
                pl_module.weighting,
                pl_module.denoiser.parameterization,
                schedule,
                lam.to(torch.get_default_dtype()).to(pl_module.device),
                dim=math.prod(datamodule.shape),
            )
            .cpu()
            .double()
        )
        w = torch.exp(log_w - log_w.max())
        path = self.dirpath / f"step_{step:06d}.png"
        title = f"adaptive p(lambda) at step {step} ({adaptive!r}) and the implied w(lambda)"
        return plot_weightings([(pl_module.weighting.name, lam, w, p)], path, title=title)
