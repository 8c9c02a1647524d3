"""FID and KID of image sets through a feature extractor (torchmetrics), one-shot and running.

Feature extractors must never end up in model checkpoints: do not register a metric that holds
one (a torchmetrics ``Metric`` is an ``nn.Module``) as a submodule of a LightningModule. Keep it
in a callback (``FIDMetric`` is a plain object, so assigning it anywhere registers nothing) and
let that callback's ``state_dict`` leave it out.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from diffexp.diffusion.tensors import device_of

__all__ = ["FIDMetric", "extract_features", "fid_kid"]


def _name_of(extractor: nn.Module) -> str:
    """The extractor's ``name`` attribute, or its class name."""
    return str(getattr(extractor, "name", type(extractor).__name__))


@torch.no_grad()
def extract_features(images: Tensor, extractor: nn.Module, batch_size: int = 500) -> Tensor:
    """Features ``[N, F]`` of ``images [N, C, H, W]``, in batches, on the extractor's device."""
    device = device_of(extractor)
    was_training = extractor.training
    extractor.eval()
    try:
        out = [extractor(x.to(device)) for x in images.split(batch_size)]
    finally:
        extractor.train(was_training)
    return torch.cat(out).reshape(len(images), -1)


class _Precomputed(nn.Module):
    """Identity 'extractor' so that torchmetrics can be fed features computed once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        """The features themselves."""
        return features


def fid_kid(
    real: Tensor,
    fake: Tensor,
    extractor: nn.Module,
    batch_size: int = 500,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """FID and KID (mean, std over ``kid_subsets`` random subsets) between two image sets.

    Images are ``[N, C, H, W]`` in [-1, 1]. Each set passes through ``extractor`` once; the
    features then feed torchmetrics' ``FrechetInceptionDistance`` and
    ``KernelInceptionDistance`` (an identity module stands in for the extractor there, so no
    dummy forward pass at 299 x 299 happens). The KID subset size is
    ``min(kid_subset_size, n_real, n_fake)``; its subsets are drawn from a generator seeded with
    ``seed`` (the global RNG is left untouched).
    """
    n_real, n_fake = len(real), len(fake)
    if n_real < 2 or n_fake < 2:
        raise ValueError(f"FID/KID need at least 2 real and 2 fake images; got {n_real}, {n_fake}")
    f_real = extract_features(real, extractor, batch_size)
    f_fake = extract_features(fake, extractor, batch_size)
    ident = _Precomputed(f_real.shape[1])
    subset = min(kid_subset_size, n_real, n_fake)
    fid = FrechetInceptionDistance(feature=ident).to(f_real.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=ident, subsets=kid_subsets, subset_size=subset)
    kid = kid.to(f_real.device)
    for metric in (fid, kid):
        metric.update(f_real, real=True)
        metric.update(f_fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
        "n_real": n_real,
        "n_fake": n_fake,
        "extractor": _name_of(extractor),
    }


class _FID(FrechetInceptionDistance):
    """torchmetrics FID whose ``compute`` also returns the (synced) sample counts."""

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """FID with the real and fake sample counts it is based on."""
        return {
            "fid": super().compute(),
            "n_real": self.real_features_num_samples.clone(),
            "n_fake": self.fake_features_num_samples.clone(),
        }


def _dist_rank_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without torch.distributed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FIDMetric:
    """Running FID of generated batches against real images whose statistics are kept.

    DDP-safe: every state of torchmetrics' ``FrechetInceptionDistance`` (feature sums, sums of
    outer products, sample counts) is a sum, synced across ranks with ``all_reduce(sum)`` when
    ``compute`` runs (and restored to the local values afterwards). So

    * ``set_real(images)`` is called on every rank with the *same* full real set; each rank
      keeps only its stride-shard ``images[rank::world_size]``, so the synced real statistics
      are exactly those of the full set (and the feature work is split between ranks);
    * ``update(fake)`` is called on each rank with that rank's samples;
    * ``compute()`` is a collective: call it on every rank (it returns the same numbers
      everywhere), log from rank 0. With few samples per epoch, log it as a small-sample
      estimate (FID is biased upwards for small n; compare runs only at equal ``n_fake``).
    * ``reset_fake()`` clears the generated statistics and keeps the real ones.

    ``rank`` / ``world_size`` override torch.distributed's (to simulate ranks in tests).

    A plain object on purpose (not an ``nn.Module``): keep it in a callback, never register it
    in a LightningModule, so the extractor's weights stay out of checkpoints.
    """

    def __init__(
        self,
        extractor: nn.Module,
        real: Tensor | None = None,
        batch_size: int = 500,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.extractor = extractor
        self.name = _name_of(extractor)
        self.batch_size = batch_size
        self._rank_world = (rank, world_size)
        # torchmetrics runs a dummy forward pass only for extractors without `num_features`
        size = tuple(real.shape[1:]) if real is not None else (3, 299, 299)
        self.metric = _FID(feature=extractor, reset_real_features=False, input_img_size=size)
        self.metric.to(device_of(extractor))
        if real is not None:
            self.set_real(real)

    @property
    def device(self) -> torch.device:
        """Where the metric's states and extractor live."""
        return self.metric.device

    def to(self, device: str | torch.device) -> FIDMetric:
        """Move states and extractor to ``device``; returns self."""
        self.metric.to(device)
        return self

    def _shard(self) -> tuple[int, int]:
        """This rank and the world size (explicit ones win over torch.distributed's)."""
        rank, world = _dist_rank_world()
        r, w = self._rank_world
        return (rank if r is None else r), (world if w is None else w)

    @torch.no_grad()
    def _add(self, images: Tensor, real: bool) -> None:
        """Add ``images`` to the real or fake statistics, in batches."""
        for x in images.split(self.batch_size):
            self.metric.update(x.to(self.device), real=real)

    def set_real(self, images: Tensor) -> None:
        """Replace the real statistics by those of ``images`` (this rank's shard); clears fakes."""
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        rank, world = self._shard()
        self._add(images[rank::world], real=True)

    def update(self, fake: Tensor) -> None:
        """Add this rank's generated images ``[B, C, H, W]`` in [-1, 1]."""
        self._add(fake, real=False)

    def reset_fake(self) -> None:
        """Forget the generated images (the real statistics stay)."""
        self.metric.reset()

    def merge(self, other: FIDMetric) -> None:
        """Add ``other``'s states into this one (what a DDP sync does across ranks)."""
        self.metric.merge_state(other.metric)
        self.metric._computed = None  # merge_state leaves a cached compute() result in place

    def compute(self) -> dict[str, Any]:
        """{"fid", "n_real", "n_fake", "extractor"} over all ranks (a collective under DDP)."""
        out = self.metric.compute()
        return {
            "fid": float(out["fid"]),
            "n_real": int(out["n_real"]),
            "n_fake": int(out["n_fake"]),
            "extractor": self.name,
        }
