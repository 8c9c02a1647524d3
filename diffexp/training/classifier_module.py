"""Training a classifier of noisy inputs p_phi(y | x_t) for classifier guidance, and loading it.

``NoisyClassifierModule`` draws t ~ U(0, 1) (stratified over the batch), noises the batch with
the schedule, x_t = a x0 + s eps, and minimizes the cross-entropy of the labels. The schedule
only decides which noise levels are trained on: the classifier is conditioned on the log-SNR, so
it serves any sampler's time grid. A learned schedule is held fixed here.

``load_noisy_classifier`` rebuilds the trained classifier from a checkpoint of
``python -m diffexp.train_classifier``, reading it with ``torch.load(weights_only=True)`` and
building only the classifier classes of ``diffexp.networks.classifier`` (never an arbitrary
``_target_`` from the file), so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffexp.cli import TRAIN_CLASSIFIER
from diffexp.data.datamodules import split_batch
from diffexp.diffusion.elbo import diffuse, stratified_times
from diffexp.diffusion.schedules import Schedule
from diffexp.networks.classifier import NoisyConvClassifier, NoisyMLPClassifier
from diffexp.training.checkpoint_io import load_checkpoint
from diffexp.training.optim import optimizers_with_schedule

__all__ = [
    "CLASSIFIER_CLASSES",
    "NETWORK_KEY",
    "NoisyClassifierModule",
    "accuracy_band_name",
    "load_noisy_classifier",
]

# the key of the stored config that holds the classifier's class and constructor arguments
NETWORK_KEY = "classifier_network"
# the classes a checkpoint may name (by ``_target_``); nothing else is built from a file
CLASSIFIER_CLASSES: dict[str, type[nn.Module]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls for cls in (NoisyMLPClassifier, NoisyConvClassifier)
}


def accuracy_band_name(lo: float, hi: float) -> str:
    """The metric name of the accuracy in the log-SNR band (lo, hi]."""
    return f"val/accuracy_band/{lo:g}_to_{hi:g}"


def _needs_labels(y: Tensor | None) -> Tensor:
    """y, or a clear error for an unlabelled batch."""
    if y is None:
        raise ValueError(
            "classifier guidance needs a labelled data set: the batch has no labels y. Use a "
            "data set whose data module has num_classes > 0 (e.g. data=ring8 or data=digits)"
        )
    return y.long()


class NoisyClassifierModule(pl.LightningModule):
    """Trains ``classifier(x_t, log_snr) -> logits`` by cross-entropy on noised labelled data.

    Validation logs val/loss, val/accuracy and the accuracy in log-SNR bands (``band_edges`` are
    the inner edges; bands outside the schedule's range are skipped), all with sync_dist.
    """

    def __init__(
        self,
        classifier: nn.Module,
        schedule: Schedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        config: dict | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        band_edges: Sequence[float] = (5.0, 0.0, -5.0),
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.schedule = schedule.requires_grad_(False)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.config = config or {}
        self.band_edges = sorted((float(e) for e in band_edges), reverse=True)

    @property
    def num_classes(self) -> int:
        """The classifier's number of classes."""
        return int(self.classifier.num_classes)

    def forward(self, x_t: Tensor, log_snr: Tensor) -> Tensor:
        """The classifier's logits for x_t at log_snr."""
        return self.classifier(x_t, log_snr)

    def noisy_batch(
        self, x0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(x_t, log_snr): stratified t ~ U(0, 1), x_t = diffuse(x0, lambda(t), eps)."""
        device = x0.device if generator is None else torch.device("cpu")
        t = stratified_times(x0.shape[0], generator=generator, device=device, dtype=x0.dtype)[:, 0]
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        t, eps = t.to(x0.device), eps.to(x0.device)
        with torch.no_grad():
            log_snr = self.schedule.log_snr(t).to(x0.dtype)
        return diffuse(x0, log_snr, eps), log_snr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, y = split_batch(batch)
        y = _needs_labels(y)
        x_t, log_snr = self.noisy_batch(x0)
        loss = F.cross_entropy(self.classifier(x_t, log_snr), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite classifier loss {float(loss)} at step {self.global_step}; lower "
                "optimizer.lr or check the data for NaN/inf"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0, y = split_batch(batch)
        y = _needs_labels(y)
        # the same noise every validation, so epochs compare; different per rank and batch
        generator = torch.Generator().manual_seed(1_000_003 * self.global_rank + batch_idx)
        x_t, log_snr = self.noisy_batch(x0, generator)
        logits = self.classifier(x_t, log_snr)
        n = x0.shape[0]
        correct = (logits.argmax(dim=1) == y).to(logits.dtype)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=n, sync_dist=True)
        self.log("val/accuracy", correct.mean(), batch_size=n, sync_dist=True, prog_bar=True)
        for lo, hi in self.accuracy_bands():
            in_band = (log_snr > lo) & (log_snr <= hi)
            count = int(in_band.sum())
            # a weighted mean with weight = count pools the bands over batches and ranks
            value = (correct * in_band).sum() / max(count, 1)
            self.log(accuracy_band_name(lo, hi), value, batch_size=count, sync_dist=True)

    def accuracy_bands(self) -> list[tuple[float, float]]:
        """The log-SNR bands (lo, hi] that overlap the schedule's range, from high to low SNR."""
        edges = [math.inf, *self.band_edges, -math.inf]
        lam_max, lam_min = self.schedule.endpoints
        return [
            (lo, hi)
            for hi, lo in zip(edges[:-1], edges[1:], strict=True)
            if max(lo, lam_min) < min(hi, lam_max)
        ]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.classifier.parameters() if p.requires_grad]
        return optimizers_with_schedule(self.optimizer_factory(params), self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diffexp_config"] = self.config


def resolve_classifier_checkpoint(path: str | Path) -> Path:
    """The checkpoint file: ``path``, or ``<path>/checkpoints/last.ckpt`` for a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"noisy classifier checkpoint {path} does not exist; make one with "
            f"`{TRAIN_CLASSIFIER}` (it writes <run folder>/checkpoints/last.ckpt) and pass that "
            "file or the run folder"
        )
    return path


def build_classifier_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The classifier that ``{"_target_": <class>, **kwargs}`` names (an allowed class only)."""
    spec = dict(spec)
    target = spec.pop("_target_", None)
    cls = CLASSIFIER_CLASSES.get(str(target))
    if cls is None:
        raise ValueError(
            f"unknown noisy classifier class {target!r}; valid: {sorted(CLASSIFIER_CLASSES)}"
        )
    bad = {k: v for k, v in spec.items() if not isinstance(v, (int, float, str, bool))}
    if bad:
        raise ValueError(f"noisy classifier arguments must be plain numbers or strings: {bad}")
    return cls(**spec)


def load_noisy_classifier(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained classifier of a ``diffexp.train_classifier`` checkpoint (or run folder), in
    eval mode with requires_grad False."""
    path = resolve_classifier_checkpoint(path)
    state = load_checkpoint(path)
    spec = state["diffexp_config"].get(NETWORK_KEY)
    if not isinstance(spec, dict):
        raise ValueError(
            f"{path} is not a noisy-classifier checkpoint (its config has no {NETWORK_KEY!r}); "
            f"make one with `{TRAIN_CLASSIFIER}`"
        )
    classifier = build_classifier_from_spec(spec)
    prefix = "classifier."
    weights = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    classifier.load_state_dict(weights)
    classifier.requires_grad_(False)
    return classifier.eval().to(device)
