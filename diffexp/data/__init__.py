"""Data: Gaussian-mixture ground truth and in-memory vector LightningDataModules.

The data modules are imported lazily, so ``diffexp.data.mixtures`` does not pay for importing
pytorch_lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffexp.data.mixtures import PRESETS, GaussianMixture, grid25, make_mixture, mixture1d, ring8

# the data configs that carry labels (needed by guidance and by the noisy classifier)
LABELLED_DATA = ("ring8", "grid25", "mixture1d", "moons", "digits", "digits16", "mnist", "cifar10")

if TYPE_CHECKING:
    from diffexp.data.datamodules import (
        MIXTURE_PRESETS,
        TOY_DATASETS,
        MixtureDataModule,
        TensorBatchDataset,
        ToyDataModule,
        VectorDataModule,
    )

_LAZY = {
    "MIXTURE_PRESETS",
    "TOY_DATASETS",
    "MixtureDataModule",
    "TensorBatchDataset",
    "ToyDataModule",
    "VectorDataModule",
}

__all__ = [
    "LABELLED_DATA",
    "MIXTURE_PRESETS",
    "PRESETS",
    "TOY_DATASETS",
    "GaussianMixture",
    "MixtureDataModule",
    "TensorBatchDataset",
    "ToyDataModule",
    "VectorDataModule",
    "grid25",
    "make_mixture",
    "mixture1d",
    "ring8",
]


def __getattr__(name: str) -> Any:
    """Import the data-module names on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module("diffexp.data.datamodules"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
