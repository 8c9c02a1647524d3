"""Callbacks: the ELBO's terms on validation, sample plots and image grids, FID."""

from diffexp.callbacks.elbo import ELBOMonitor
from diffexp.callbacks.fid import FIDMonitor
from diffexp.callbacks.samples import SamplePlot

__all__ = ["ELBOMonitor", "FIDMonitor", "SamplePlot"]
