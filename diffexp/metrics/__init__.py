"""Numbers from samples and models: sliced Wasserstein, sample KL, FID/KID and their feature
extractors, the spread of ELBO estimators, plots. Imports no framework (only ``diffusion``)."""

from __future__ import annotations

from diffexp.metrics.sliced_wasserstein import sliced_wasserstein, wasserstein2_1d

__all__ = ["sliced_wasserstein", "wasserstein2_1d"]
