"""How noisy the ELBO's Monte Carlo estimators are, on one model (``eval`` option ``estimators``).

Two comparisons, each of one-sample estimates of -ELBO (one time or step per example):

- ``forms``: at T steps, the denoising-matching form (``elbo.elbo_terms``) against the
  consistency form (``consistency.consistency_terms``, with z_i integrated out and with z_i
  drawn). Same model, same bound: the means agree, the spreads do not (MATH.md section 3).
- ``schedules``: the continuous-time ELBO of the model's denoiser under other schedules with the
  model's endpoints. VDM: the bound is the same for all (invariance); its estimator's variance is
  not, which is what a learned schedule can minimize.

Per estimator: the mean -ELBO (nats per example) with its standard error, and the standard
deviation of the one-sample estimate over examples, times and noise (``std``), for the whole
-ELBO and for its diffusion part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from diffexp.diffusion.consistency import consistency_terms
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.elbo import ELBOTerms, elbo_terms
from diffexp.diffusion.schedules import SCHEDULES, Learned

Batches = Iterable[tuple[Tensor, Tensor | None]]
Estimator = Callable[[Tensor, Tensor | None], ELBOTerms]


def spread(values: Tensor) -> dict[str, float]:
    """mean, standard error and standard deviation of per-example estimates."""
    v = values.double()
    std = v.std().item()
    return {"mean": v.mean().item(), "se": std / math.sqrt(v.numel()), "std": std}


@torch.no_grad()
def estimator_stats(estimator: Estimator, batches: Batches, n_repeats: int) -> dict[str, float]:
    """Spread of one estimator's -ELBO (``nll_*``) and diffusion part (``diffusion_*``)."""
    nll, diffusion = [], []
    for _ in range(n_repeats):
        for x0, y in batches:
            terms = estimator(x0, y)
            nll.append(terms.nll.double().cpu())
            diffusion.append(terms.diffusion.double().cpu())
    out = {f"nll_{k}": v for k, v in spread(torch.cat(nll)).items()}
    out.update({f"diffusion_{k}": v for k, v in spread(torch.cat(diffusion)).items()})
    return out


def forms_report(
    denoiser: Denoiser,
    batches: Batches,
    steps: list[int],
    reconstruction_nll: Any,
    generator: torch.Generator,
    n_repeats: int = 1,
) -> dict[str, dict[str, float]]:
    """{'T<steps>/<form>': stats} for the denoising and consistency forms at each T."""
    report = {}
    for T in steps:
        forms: dict[str, Estimator] = {
            "denoising": lambda x, y, T=T: elbo_terms(
                denoiser, x, y, T=T, reconstruction_nll=reconstruction_nll, generator=generator
            ),
            "consistency": lambda x, y, T=T: consistency_terms(
                denoiser, x, y, T=T, reconstruction_nll=reconstruction_nll, generator=generator
            ),
            "consistency_sampled_middle": lambda x, y, T=T: consistency_terms(
                denoiser,
                x,
                y,
                T=T,
                reconstruction_nll=reconstruction_nll,
                generator=generator,
                sample_middle=True,
            ),
        }
        for name, estimator in forms.items():
            report[f"T{T}/{name}"] = estimator_stats(estimator, batches, n_repeats)
    return report


def with_schedule(denoiser: Denoiser, name: str) -> Denoiser:
    """The same network and parameterization under schedule ``name`` with equal endpoints."""
    if name == "own":
        return denoiser
    if name not in SCHEDULES or SCHEDULES[name] is Learned:
        valid = ", ".join(["own", *(k for k, v in SCHEDULES.items() if v is not Learned)])
        raise ValueError(f"unknown schedule {name!r} for estimators.schedules; valid: {valid}")
    log_snr_max, log_snr_min = denoiser.schedule.endpoints
    schedule = SCHEDULES[name](log_snr_max=log_snr_max, log_snr_min=log_snr_min)
    return Denoiser(denoiser.network, denoiser.parameterization, schedule.to(_device(denoiser)))


def schedules_report(
    denoiser: Denoiser,
    batches: Batches,
    names: list[str],
    reconstruction_nll: Any,
    generator: torch.Generator,
    n_repeats: int = 1,
) -> dict[str, dict[str, float]]:
    """{'<schedule>': stats} of the continuous-time ELBO under each schedule ('own': the
    model's)."""
    report = {}
    for name in names:
        den = with_schedule(denoiser, name)
        report[name] = estimator_stats(
            lambda x, y, den=den: elbo_terms(
                den, x, y, reconstruction_nll=reconstruction_nll, generator=generator
            ),
            batches,
            n_repeats,
        )
    return report


def flatten(prefix: str, report: dict[str, dict[str, float]]) -> dict[str, float]:
    """{'a': {'b': 1}} -> {'<prefix>/a/b': 1}, the keys of metrics.json."""
    return {f"{prefix}/{k}/{s}": v for k, stats in report.items() for s, v in stats.items()}


def _device(module: torch.nn.Module) -> torch.device:
    for p in list(module.parameters()) + list(module.buffers()):
        return p.device
    return torch.device("cpu")
