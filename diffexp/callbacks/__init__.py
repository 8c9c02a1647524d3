"""Callbacks: last.ckpt for resuming, the ELBO on validation, sample plots and grids, FID."""

from diffexp.callbacks.checkpoint import LastCheckpoint
from diffexp.callbacks.elbo import ELBOMonitor
from diffexp.callbacks.fid import FIDMonitor
from diffexp.callbacks.samples import SamplePlot

__all__ = ["ELBOMonitor", "FIDMonitor", "LastCheckpoint", "SamplePlot"]
