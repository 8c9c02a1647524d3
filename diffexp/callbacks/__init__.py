"""Callbacks: the ELBO's terms on validation and sample plots."""

from diffexp.callbacks.elbo import ELBOMonitor
from diffexp.callbacks.samples import SamplePlot

__all__ = ["ELBOMonitor", "SamplePlot"]
