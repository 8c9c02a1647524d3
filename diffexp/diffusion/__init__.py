"""The paper, in plain PyTorch: schedules, parameterizations, the Denoiser, the ELBO, samplers."""

from diffexp.diffusion import consistency, elbo, parameterizations, samplers, schedules, weighting
from diffexp.diffusion.consistency import consistency_terms
from diffexp.diffusion.denoiser import Denoiser, DenoiserOutput
from diffexp.diffusion.elbo import ELBOTerms, elbo_terms
from diffexp.diffusion.parameterizations import EDM, X0, Eps, Flow, Score, V
from diffexp.diffusion.samplers import Ancestral
from diffexp.diffusion.schedules import Cosine, Learned, Linear, LogLinear

__all__ = [
    "Ancestral",
    "Cosine",
    "Denoiser",
    "DenoiserOutput",
    "EDM",
    "ELBOTerms",
    "Eps",
    "Flow",
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
    "parameterizations",
    "samplers",
    "schedules",
    "weighting",
]
