"""Logs the true ELBO's terms on validation, whatever the training objective was."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from diffexp.data.datamodules import split_batch
from diffexp.diffusion.elbo import elbo_terms
from diffexp.metrics.elbo import elbo_metrics


class ELBOMonitor(pl.Callback):
    """On each validation batch: the ELBO terms (nats), bits/dim and log-SNR bands, as val/*.

    Also val/elbo_nats_se and val/elbo_gap_nats_se, the standard errors over the validation
    examples (the estimator's Monte Carlo error included). The diffusion term uses ``n_t``
    stratified times per example (or the exact T-step loop with
    ``exact_loop`` for discrete models). When the data set knows its density, also logs
    val/true_log_likelihood_nats and val/elbo_gap_nats = true log-likelihood - ELBO.
    ``max_elements`` groups the noise levels into network calls (``elbo.elbo_terms``; null: the
    device's default).
    """

    def __init__(
        self,
        n_t: int = 16,
        band_edges: list[float] = (5.0, 0.0, -5.0),
        exact_loop: bool = False,
        max_elements: int | None = None,
    ):
        self.n_t, self.band_edges, self.exact_loop = int(n_t), list(band_edges), bool(exact_loop)
        if max_elements is not None and int(max_elements) < 0:
            raise ValueError(
                f"callbacks.elbo.max_elements={max_elements}: the numbers of x per network call "
                "must be >= 0 (0: one call per noise level) or null (the device's default)"
            )
        self.max_elements = None if max_elements is None else int(max_elements)
        self._stats: dict[str, torch.Tensor] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stats = {}

    def _accumulate(self, name: str, values: torch.Tensor) -> None:
        """Running [count, sum, sum of squares] of per-example values, for standard errors."""
        v = values.detach().double()
        stats = torch.stack(
            [torch.tensor(float(v.numel()), dtype=v.dtype, device=v.device), v.sum(), (v**2).sum()]
        )
        self._stats[name] = self._stats.get(name, torch.zeros_like(stats)) + stats

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the standard errors of the ELBO and the gap over all ranks' examples."""
        for name, stats in self._stats.items():
            if trainer.world_size > 1:
                stats = pl_module.all_gather(stats).reshape(-1, 3).sum(dim=0)
            n, s, ss = stats.tolist()
            var = max(ss / n - (s / n) ** 2, 0.0) * n / max(n - 1, 1)
            pl_module.log(f"val/{name}_se", (var / n) ** 0.5, rank_zero_only=True)

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        x0, y = split_batch(batch)
        terms = elbo_terms(
            pl_module.eval_denoiser,
            x0,
            y,
            T=pl_module.T,
            n_t=self.n_t,
            exact=self.exact_loop and pl_module.T > 0,
            reconstruction_nll=pl_module.reconstruction_nll,
            generator=getattr(pl_module, "validation_generator", None),
            max_elements=self.max_elements,
        )
        metrics = elbo_metrics(terms, x0[0].numel(), self.band_edges)
        datamodule = getattr(trainer, "datamodule", None)
        true_lp = datamodule.true_log_prob(x0) if hasattr(datamodule, "true_log_prob") else None
        if true_lp is not None:
            metrics["true_log_likelihood_nats"] = true_lp
            metrics["elbo_gap_nats"] = true_lp - terms.elbo
        for name in ("elbo_nats", "elbo_gap_nats"):
            if name in metrics:
                self._accumulate(name, metrics[name])
        for name, value in metrics.items():
            pl_module.log(
                f"val/{name}",
                value.mean(),
                batch_size=x0.shape[0],
                sync_dist=True,
                prog_bar=name in ("elbo_nats", "elbo_gap_nats"),
            )
