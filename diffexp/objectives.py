"""The implied weighting w(lambda) of configured objectives: ``python -m diffexp.objectives``.

    python -m diffexp.objectives                                   # the default objective
    python -m diffexp.objectives experiment=edm
    python -m diffexp.objectives -m experiment=edm,rectified_flow,sigmoid parameterization=eps
    python -m diffexp.objectives --out docs schedule=cosine weighting=unit
    python -m diffexp.objectives experiment=edm,sigmoid --also parameterization=v weighting=unit

Every objective is a weighted ELBO, 1/2 int w(lambda) E||eps_hat - eps||^2 dlambda (MATH.md
section 9). For each configuration (the train config with these overrides; comma lists sweep, as
with ``python -m diffexp.train -m``) this prints w(lambda) normalized to its maximum on the
schedule's log-SNR range, says whether it is monotone (w never increasing with lambda: then the
objective is the ELBO of Gaussian-noise-augmented data), and writes one PNG that overlays them
(``implied_weighting.png``, with each p(lambda) dashed) and the curves as JSON to ``--out``.
``--also`` starts another set of overrides, so configurations that are not one sweep overlay too.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor

from diffexp.cli import CONF_DIR
from diffexp.diffusion.loss import HEAVY_TAILED_SPREAD, WeightedLoss
from diffexp.diffusion.noise_sampling import NoiseSampling, ScheduleTimes
from diffexp.diffusion.parameterizations import Parameterization
from diffexp.diffusion.schedules import Schedule
from diffexp.diffusion.weighting import Weighting, implied_log_weight, is_monotone
from diffexp.metrics.plots import plot_weightings
from diffexp.training.loggers import hydra_choices, log, write_json


@dataclass
class ImpliedWeighting:
    """w(lambda) / max w and p(lambda) of one objective on a grid of its schedule's log-SNRs."""

    label: str
    description: str
    log_snr: Tensor
    weight: Tensor
    density: Tensor
    monotone: bool
    spread: float

    def as_dict(self) -> dict:
        """Plain lists, for JSON."""
        return {
            "label": self.label,
            "description": self.description,
            "monotone": self.monotone,
            "importance_weight_spread": self.spread,
            "log_snr": self.log_snr.tolist(),
            "weight": self.weight.tolist(),
            "density": self.density.tolist(),
        }


def implied_weighting(
    label: str,
    weighting: Weighting,
    parameterization: Parameterization,
    schedule: Schedule,
    noise_sampling: NoiseSampling | None = None,
    dim: int = 1,
    n_points: int = 401,
) -> ImpliedWeighting:
    """w(lambda) normalized to max 1 (constants such as 1/d cancel) and p(lambda), on
    ``n_points`` log-SNRs spanning the schedule's range."""
    sampling = noise_sampling if noise_sampling is not None else ScheduleTimes()
    lam_0, lam_1 = schedule.endpoints
    lam = torch.linspace(lam_0, lam_1, n_points, dtype=torch.float64)
    schedule = copy.deepcopy(schedule).double()  # float64, without touching the caller's
    log_w = implied_log_weight(weighting, parameterization, schedule, lam, dim)
    with torch.no_grad():
        log_p = sampling.log_density(schedule, lam).detach()
    return ImpliedWeighting(
        label=label,
        description=(
            f"{parameterization!r}, {weighting!r}, {sampling!r}, {type(schedule).__name__}"
            f"({lam_0:g} to {lam_1:g})"
        ),
        log_snr=lam,
        weight=torch.exp(log_w - log_w.max()),
        density=torch.exp(log_p),
        monotone=is_monotone(lam, log_w),
        spread=WeightedLoss(weighting, sampling).importance_weight_spread(
            parameterization, schedule
        ),
    )


def compose_train_config(overrides: list[str]) -> DictConfig:
    """The train config with ``overrides`` (Hydra's compose API, in-process)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def implied_weighting_of_config(
    cfg: DictConfig, label: str, n_points: int = 401
) -> ImpliedWeighting:
    """The implied weighting of the objective a composed train config describes."""
    sampling = cfg.get("noise_sampling")
    return implied_weighting(
        label,
        instantiate(cfg.weighting),
        instantiate(cfg.parameterization),
        instantiate(cfg.schedule),
        instantiate(sampling) if sampling else None,
        n_points=n_points,
    )


def implied_weightings(
    override_sets: list[list[str]], n_points: int = 401
) -> list[ImpliedWeighting]:
    """One implied weighting per set of train overrides (the Python form of the command)."""
    return [
        implied_weighting_of_config(compose_train_config(o), " ".join(o) or "default", n_points)
        for o in override_sets
    ]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's sweep syntax (a=x,y b=z) -> one override list per combination."""
    # Hydra's own sweep expansion (no public API expands a -m command line without running it)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [combo for batch in BasicSweeper.split_arguments(parsed, None) for combo in batch]


def write_report(curves: list[ImpliedWeighting], out_dir: Path) -> tuple[Path, Path]:
    """implied_weighting.png (overlay) and implied_weighting.json (the curves) in ``out_dir``."""
    png = plot_weightings(
        [(c.label, c.log_snr, c.weight, c.density) for c in curves],
        out_dir / "implied_weighting.png",
    )
    data = {"objectives": [c.as_dict() for c in curves]}
    return png, write_json(out_dir / "implied_weighting.json", data)


def table(curves: list[ImpliedWeighting], columns: int = 7) -> str:
    """w(lambda) / max w at a few log-SNRs of each objective's range, and monotonicity."""
    lines = []
    for c in curves:
        idx = torch.linspace(0, len(c.log_snr) - 1, columns).round().long()
        cells = "  ".join(f"{c.log_snr[i]:+6.1f}: {c.weight[i]:.3g}" for i in idx)
        mono = "monotone (an ELBO of noise-augmented data)" if c.monotone else "not monotone"
        lines += [
            f"{c.label}: {mono}",
            f"    {c.description}",
            f"    w/max w at lambda {cells}",
            f"    largest term of the loss estimate / its mean: {c.spread:.3g}"
            + ("  (heavy-tailed: a noisy loss)" if c.spread > HEAVY_TAILED_SPREAD else ""),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, write the PNG and JSON; exit 2 on a bad override."""
    parser = argparse.ArgumentParser(
        prog="python -m diffexp.objectives", description=__doc__.splitlines()[0]
    )
    parser.add_argument("-m", "--multirun", action="store_true", help="accepted; sweeps expand")
    parser.add_argument("--out", default="outputs/objectives", help="folder for PNG and JSON")
    parser.add_argument("--points", type=int, default=401, help="log-SNR grid points")
    parser.add_argument("overrides", nargs="*", help="train config overrides (Hydra syntax)")
    parser.add_argument(
        "--also",
        nargs="*",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="another set of overrides, overlaid too (repeatable)",
    )
    args = parser.parse_args(argv)
    sets = [args.overrides, *args.also]
    try:
        curves = implied_weightings([c for o in sets for c in expand_sweep(o)], args.points)
    except (HydraException, ValueError, TypeError) as err:
        print(f"diffexp.objectives: cannot build the objective: {err}", file=sys.stderr)
        return 2
    print(table(curves))
    png, js = write_report(curves, Path(args.out))
    print(f"wrote {png} and {js}")
    return 0


def log_implied_weighting(module: Any, dim: int, trainer: Any, out_dir: Path) -> Path:
    """At the start of training: the run's implied w(lambda) as a PNG (and JSON) in its output
    folder, and the PNG as an image on its W&B run."""
    choices = hydra_choices()
    label = "/".join(
        choices.get(g, "?") for g in ("parameterization", "weighting", "noise_sampling", "schedule")
    )
    curve = implied_weighting(
        label,
        module.weighting,
        module.denoiser.parameterization,
        module.schedule,
        module.objective.noise_sampling,
        dim=dim,
    )
    png, _ = write_report([curve], out_dir)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key="objective/implied_weighting", images=[str(png)])
    log.info("implied weighting (%s): %s", "monotone" if curve.monotone else "not monotone", png)
    return png


if __name__ == "__main__":
    sys.exit(main())
