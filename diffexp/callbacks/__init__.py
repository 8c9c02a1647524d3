"""Callbacks: the ELBO's terms on validation, sample plots and image grids."""

from diffexp.callbacks.elbo import ELBOMonitor
from diffexp.callbacks.samples import SamplePlot

__all__ = ["ELBOMonitor", "SamplePlot"]
