"""The paper, in plain PyTorch: schedules, parameterizations, the Denoiser, the ELBO, samplers."""

from diffexp.diffusion import consistency, elbo, parameterizations, samplers, schedules, weighting
from diffexp.diffusion.consistency import consistency_terms
from diffexp.diffusion.denoiser import Denoiser, DenoiserOutput
from diffexp.diffusion.elbo import ELBOTerms, elbo_terms
from diffexp.diffusion.parameterizations import X0, Eps, Score, V, get_parameterization
from diffexp.diffusion.samplers import Ancestral
from diffexp.diffusion.schedules import Cosine, Learned, Linear, LogLinear

__all__ = [
    "Ancestral",
    "Cosine",
    "Denoiser",
    "DenoiserOutput",
    "ELBOTerms",
    "Eps",
    "Learned",
    "Linear",
    "LogLinear",
    "Score",
    "V",
    "X0",
    "consistency",
    "consistency_terms",
    "elbo",
    "elbo_terms",
    "get_parameterization",
    "parameterizations",
    "samplers",
    "schedules",
    "weighting",
]
