"""Named per-example ELBO metrics: each term and the total in nats, bits/dim, log-SNR bands."""

from __future__ import annotations

import math

from torch import Tensor

from diffexp.diffusion.elbo import ELBOTerms


def band_name(lo: float, hi: float) -> str:
    """A metric-safe name for the log-SNR band (lo, hi]."""
    return f"diffusion_nats_band/{lo:g}_to_{hi:g}"


def elbo_metrics(terms: ELBOTerms, dim: int, band_edges: list[float] = ()) -> dict[str, Tensor]:
    """Per-example metrics: elbo_nats, bpd = -ELBO / (d ln 2), each term's nats, and the bands.

    Terms are what they cost: elbo_nats = -(reconstruction_nats + prior_nats + diffusion_nats).
    ``band_edges`` are the inner edges of the log-SNR bands, in any order.
    """
    out = {
        "elbo_nats": terms.elbo,
        "bpd": terms.bits_per_dim(dim),
        "reconstruction_nats": terms.reconstruction,
        "prior_nats": terms.prior,
        "diffusion_nats": terms.diffusion,
    }
    if band_edges:
        edges = [math.inf, *sorted(band_edges, reverse=True), -math.inf]
        for (hi, lo), part in zip(
            zip(edges[:-1], edges[1:], strict=True), terms.diffusion_in_bands(edges), strict=True
        ):
            out[band_name(lo, hi)] = part
    return out
