"""Callbacks: last.ckpt for resuming, the ELBO on validation, sample plots and grids, FID, the
adaptive noise density, snapshots for post-hoc EMA."""

from diffexp.training.callbacks.checkpoint import LastCheckpoint
from diffexp.training.callbacks.elbo import ELBOMonitor
from diffexp.training.callbacks.fid import FIDMonitor
from diffexp.training.callbacks.noise_density import NoiseDensityPlot
from diffexp.training.callbacks.posthoc_ema import PostHocEMASnapshots
from diffexp.training.callbacks.samples import SamplePlot

__all__ = [
    "ELBOMonitor",
    "FIDMonitor",
    "LastCheckpoint",
    "NoiseDensityPlot",
    "PostHocEMASnapshots",
    "SamplePlot",
]
