"""How noisy the ELBO's Monte Carlo estimators are, on one model (``eval`` option ``estimators``).

Two comparisons, each of one-sample estimates of -ELBO (one time or step per example):

- ``forms``: at T steps, the denoising-matching form (``elbo.elbo_terms``) against the
  consistency form (``consistency.consistency_terms``, with z_i integrated out and with z_i
  drawn). Same model, same bound: the means agree, the spreads do not (MATH.md section 3).
- ``schedules``: the continuous-time ELBO of the model's denoiser under other schedules with the
  model's endpoints. VDM: the bound is the same for all (invariance); its estimator's variance is
  not, which is what a learned schedule can minimize.

Per estimator, from ``n_repeats`` passes over the same examples (one-sample estimates
e[r, n]): the mean -ELBO (nats per example) and its standard error over examples
(``nll_mean``, ``nll_se``); the standard deviation of a one-sample estimate over examples, times
and noise (``nll_std``, what a training batch sees); the estimator's own noise for a fixed
example, sqrt(mean_n Var_r e[r, n]) (``nll_noise_std``, n_repeats >= 2); and the paired
difference to the first estimator of its group on the same examples (``nll_diff_mean`` +-
``nll_diff_se``), which tests "the same bound" far more tightly than two unpaired means. The
same for the diffusion (or consistency) part (``diffusion_*``).
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
from diffexp.diffusion.schedules import Schedule
from diffexp.diffusion.tensors import device_of

Batches = Iterable[tuple[Tensor, Tensor | None]]
Estimator = Callable[[Tensor, Tensor | None], ELBOTerms]


@torch.no_grad()
def estimates(estimator: Estimator, batches: Batches, n_repeats: int) -> tuple[Tensor, Tensor]:
    """One-sample estimates [n_repeats, n_examples] of -ELBO and of its diffusion part."""
    nll, diffusion = [], []
    for _ in range(max(1, n_repeats)):
        rows = [estimator(x0, y) for x0, y in batches]
        nll.append(torch.cat([t.nll.double().cpu() for t in rows]))
        diffusion.append(torch.cat([t.diffusion.double().cpu() for t in rows]))
    return torch.stack(nll), torch.stack(diffusion)


def spread(values: Tensor, reference: Tensor | None = None) -> dict[str, float]:
    """mean, se, std, noise_std (and diff_mean, diff_se against ``reference``) of e[r, n]."""
    per_example = values.mean(dim=0)
    n = per_example.numel()
    out = {
        "mean": per_example.mean().item(),
        "se": per_example.std().item() / math.sqrt(n),
        "std": values.std().item(),
    }
    if values.shape[0] > 1:
        out["noise_std"] = values.var(dim=0).mean().sqrt().item()
    if reference is not None:
        diff = per_example - reference.mean(dim=0)
        out["diff_mean"] = diff.mean().item()
        out["diff_se"] = diff.std().item() / math.sqrt(n)
    return out


def compare_estimators(
    estimators: dict[str, Estimator], batches: Batches, n_repeats: int
) -> dict[str, dict[str, float]]:
    """{name: stats}, each paired with the first estimator (same examples, own noise)."""
    report, reference = {}, None
    for name, estimator in estimators.items():
        nll, diffusion = estimates(estimator, batches, n_repeats)
        ref_nll, ref_diffusion = reference if reference is not None else (None, None)
        stats = {f"nll_{k}": v for k, v in spread(nll, ref_nll).items()}
        stats.update({f"diffusion_{k}": v for k, v in spread(diffusion, ref_diffusion).items()})
        report[name] = stats
        reference = reference if reference is not None else (nll, diffusion)
    return report


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
        for name, stats in compare_estimators(forms, batches, n_repeats).items():
            report[f"T{T}/{name}"] = stats
    return report


def schedules_report(
    denoiser: Denoiser,
    batches: Batches,
    schedules: dict[str, Schedule],
    reconstruction_nll: Any,
    generator: torch.Generator,
    n_repeats: int = 1,
) -> dict[str, dict[str, float]]:
    """{'<name>': stats} of the continuous-time ELBO of the same network and parameterization
    under each of ``schedules`` (the model's own among them, or others with equal endpoints)."""
    estimators: dict[str, Estimator] = {}
    for name, schedule in schedules.items():
        den = Denoiser(
            denoiser.network, denoiser.parameterization, schedule.to(device_of(denoiser))
        )
        estimators[name] = lambda x, y, den=den: elbo_terms(
            den, x, y, reconstruction_nll=reconstruction_nll, generator=generator
        )
    return compare_estimators(estimators, batches, n_repeats)


def flatten(prefix: str, report: dict[str, dict[str, float]]) -> dict[str, float]:
    """{'a': {'b': 1}} -> {'<prefix>/a/b': 1}, the keys of metrics.json."""
    return {f"{prefix}/{k}/{s}": v for k, stats in report.items() for s, v in stats.items()}
