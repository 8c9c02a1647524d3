"""Sample and likelihood metrics."""

from __future__ import annotations

from diffexp.metrics.sliced_wasserstein import sliced_wasserstein, wasserstein2_1d

__all__ = ["sliced_wasserstein", "wasserstein2_1d"]
