"""Small-sample FID during training, on every DDP rank, logged from rank 0.

The feature extractor lives in this callback (never in the LightningModule), so it is never
saved in model checkpoints. Values are labelled ``val/fid_small_sample``: FID is biased upwards
at small n, so compare runs only at equal protocol, which is logged as hyperparameters
(``fid_protocol``: extractor, n, sampler and steps, EMA) and written to ``fid_protocol.json``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytorch_lightning as pl
import torch

from diffexp.data.datamodules import split_batch
from diffexp.diffusion.samplers import Sampler
from diffexp.metrics.features import build_feature_extractor
from diffexp.metrics.fid import FIDMetric
from diffexp.training.loggers import write_json


class FIDMonitor(pl.Callback):
    """FID of ``n_samples`` samples (split across ranks) against the validation images.

    ``steps`` overrides the sampler's number of steps (in-training FID is a cheap estimate).
    """

    def __init__(
        self,
        sampler: Sampler,
        extractor: str,
        features_path: str | None = None,
        n_samples: int = 500,
        every_n_epochs: int = 50,
        batch_size: int = 250,
        seed: int = 0,
        dirpath: str | None = None,
        steps: int | None = None,
    ):
        if steps:  # a cheaper run of the configured sampler
            sampler = copy.copy(sampler)
            sampler.steps = int(steps)
        self.sampler, self.kind, self.features_path = sampler, extractor, features_path
        self.n_samples, self.every_n_epochs = int(n_samples), int(every_n_epochs)
        self.batch_size, self.seed, self.dirpath = int(batch_size), int(seed), dirpath
        self.metric: FIDMetric | None = None

    def protocol(self, pl_module: pl.LightningModule) -> dict:
        """What every logged value means: extractor, sample count, sampler, EMA."""
        return {
            "extractor": self.metric.name if self.metric else self.kind,
            "features_path": self.features_path,
            "n_samples": self.n_samples,
            "sampler": repr(self.sampler),
            "ema": pl_module.ema is not None,
            "real": "validation split",
            "estimate": "small-sample (biased upwards; compare only at equal protocol)",
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs <= 0:
            return
        extractor = build_feature_extractor(self.kind, self.features_path).to(pl_module.device)
        trainer.datamodule.setup("validate")
        real = torch.cat([split_batch(b)[0] for b in trainer.datamodule.val_dataloader()])
        self.metric = FIDMetric(
            extractor,
            real,
            batch_size=self.batch_size,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )
        protocol = self.protocol(pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams({"fid_protocol": protocol})
        if self.dirpath and trainer.is_global_zero:
            write_json(Path(self.dirpath) / "fid_protocol.json", protocol)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.metric is None or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        n_local = -(-self.n_samples // trainer.world_size)  # ceil: every rank samples
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed + trainer.global_rank)
        self.metric.reset_fake()
        for start in range(0, n_local, self.batch_size):
            n = min(self.batch_size, n_local - start)
            x = self.sampler.sample(
                pl_module.eval_denoiser,
                (n, *trainer.datamodule.shape),
                generator=gen,
                device=pl_module.device,
            ).x
            self.metric.update(x)
        result = self.metric.compute()  # a collective: every rank computes
        pl_module.log("val/fid_small_sample", result["fid"], rank_zero_only=True)
