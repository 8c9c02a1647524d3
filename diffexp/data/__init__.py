"""Data: Gaussian-mixture ground truth and in-memory vector LightningDataModules.

The data modules are imported lazily, so ``diffexp.data.mixtures`` does not pay for importing
pytorch_lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffexp.data.mixtures import PRESETS, GaussianMixture, grid25, make_mixture, mixture1d, ring8

if TYPE_CHECKING:
    from diffexp.data.datamodules import (
        MIXTURE_PRESETS,
        TOY_DATASETS,
        DataDescription,
        DescribedDataModule,
        MixtureDataModule,
        TensorBatchDataset,
        ToyDataModule,
        VectorDataModule,
    )

_LAZY = {
    "MIXTURE_PRESETS",
    "TOY_DATASETS",
    "DataDescription",
    "DescribedDataModule",
    "MixtureDataModule",
    "TensorBatchDataset",
    "ToyDataModule",
    "VectorDataModule",
}

__all__ = [
    "MIXTURE_PRESETS",
    "PRESETS",
    "TOY_DATASETS",
    "DataDescription",
    "DescribedDataModule",
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
