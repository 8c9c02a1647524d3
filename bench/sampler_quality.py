"""Sample quality against NFE for every sampler, with the exact denoiser of the 8-Gaussian ring.

The oracle (``diffexp.networks.Oracle``: the mixture's exact posterior mean, eps-parameterized,
log-linear schedule with log-SNR from 10 to -8, float32) removes the network from the comparison:
what is left is the sampler's discretization. Quality of n samples against the true density q:

- KL (the headline, MATH.md s10): ``KL(p_hat || q) = -H_kNN(samples) - mean log q(samples)`` in
  nats, with the Kozachenko-Leonenko k-NN entropy (k = 5). Its floor, printed at the top, is the
  same estimate on n exact samples of q (mean +- std over a few exact sets): a sampler is as good
  as exact sampling when its KL is within the floor's spread (0.011 +- 0.004 at n = 20000);
- gap: mean log q(x) of the samples minus the data's (nats, the data's from 200,000 draws);
  negative is too spread or off the modes, positive too concentrated. Secondary: the signed gap
  rewards over-concentrated samples, the KL does not.

Each sampler's settings are chosen so its NFE is at most the column's (Heun: 2 per step; PC:
predictor + corrector; "last_step": the last interval is the final denoise, no extra NFE); the
cell shows the NFE it used where it differs. Adaptive solvers are listed by tolerance.

    python -m bench.sampler_quality [--n 20000] [--nfe 5 10 20 50 100] [--seed 0] [--floor-sets 5]
        [--rows SUBSTRING ...] [--run RUN_FOLDER] [--optimized-nfe 5 10 20] [--fit-n 2000]

Rows marked "optimized grid" run on a grid fitted to the denoiser for that budget
(``diffexp.diffusion.grid_search.fit_time_grid``, as ``python -m diffexp.optimize_grid`` does:
energy distance of ``--fit-n`` samples to the same sampler with 200 steps, noise seeds apart
from the table's), at the budgets of ``--optimized-nfe`` ("-" elsewhere). The last table names
each budget's best row.

``--run`` replaces the oracle by a model trained on the ring (its EMA weights), e.g. one run of
``experiment=ablation_objectives_vdmpp``: the same table for a trained denoiser, whose own error
now adds to the sampler's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable

import torch

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.grid_search import fit_time_grid
from diffexp.diffusion.parameterizations import Eps
from diffexp.diffusion.samplers import (
    DDIM,
    DEIS,
    Ancestral,
    AnnealedLangevin,
    DPMSolverPP2M,
    DPMSolverPP2MSDE,
    DPMSolverPP3M,
    EDMStochastic,
    PredictorCorrector,
    ProbabilityFlowODE,
    ReverseSDE,
    Sampler,
    UniPC,
)
from diffexp.diffusion.schedules import LogLinear
from diffexp.metrics.sample_kl import sample_kl, sample_kl_floor
from diffexp.networks import Oracle

LAST = "last_step"

# label -> (target NFE -> sampler with NFE <= target)
ROWS: dict[str, Callable[[int], Sampler]] = {
    "ancestral (uniform, +denoise)": lambda n: Ancestral(
        steps=n - 1, time_grid="uniform", final_denoise=True
    ),
    "ancestral (log_snr, last_step)": lambda n: Ancestral(
        steps=n, time_grid="log_snr", final_denoise=LAST
    ),
    "ddim eta=0 (log_snr, last_step)": lambda n: DDIM(
        steps=n, eta=0.0, time_grid="log_snr", final_denoise=LAST
    ),
    "sde euler-maruyama (log_snr, last_step)": lambda n: ReverseSDE(
        steps=n, time_grid="log_snr", final_denoise=LAST
    ),
    "ode heun (karras, last_step)": lambda n: ProbabilityFlowODE(
        steps=(n + 1) // 2, solver="heun", time_grid="karras", final_denoise=LAST
    ),
    "dpmpp_2m (log_snr, last_step)": lambda n: DPMSolverPP2M(
        steps=n, time_grid="log_snr", final_denoise=LAST
    ),
    "dpmpp_2m_sde eta=1 (log_snr, last_step)": lambda n: DPMSolverPP2MSDE(
        steps=n, eta=1.0, time_grid="log_snr", final_denoise=LAST
    ),
    "dpmpp_2m_sde eta=0.5 (log_snr, last_step)": lambda n: DPMSolverPP2MSDE(
        steps=n, eta=0.5, time_grid="log_snr", final_denoise=LAST
    ),
    "dpmpp_3m (log_snr, last_step)": lambda n: DPMSolverPP3M(
        steps=n, time_grid="log_snr", final_denoise=LAST
    ),
    "unipc order=2 bh2 (log_snr, last_step)": lambda n: UniPC(
        steps=n, order=2, variant="bh2", time_grid="log_snr", final_denoise=LAST
    ),
    "unipc order=1 bh1 (log_snr, last_step)": lambda n: UniPC(
        steps=n, order=1, variant="bh1", time_grid="log_snr", final_denoise=LAST
    ),
    "deis order=3 (log_snr, last_step)": lambda n: DEIS(
        steps=n, order=3, time_grid="log_snr", final_denoise=LAST
    ),
    "edm churn=10 (karras, last_step)": lambda n: EDMStochastic(
        steps=(n + 1) // 2, churn=10.0, time_grid="karras", final_denoise=LAST
    ),
    "langevin step_scale=0.5 (log_snr, last_step)": lambda n: AnnealedLangevin(
        steps_per_level=max(1, n // 100),
        levels=(n - 1) // max(1, n // 100) + 1,
        step_scale=0.5,
        time_grid="log_snr",
        final_denoise=LAST,
    ),
    "pc ancestral+1 corrector snr=0.16 (log_snr, last_step)": lambda n: PredictorCorrector(
        predictor="ancestral",
        steps=(n - 1) // 2 + 1,
        corrector_steps=1,
        snr=0.16,
        time_grid="log_snr",
        final_denoise=LAST,
    ),
}
ADAPTIVE = [("dopri5", tol) for tol in (1e-2, 1e-3, 1e-4, 1e-5)] + [("bosh3", 1e-3)]
# the rows whose sampler also runs on a fitted grid (label -> target NFE -> sampler); one NFE per
# step (the grid is fitted for the sampler's steps)
OPTIMIZED = (
    "ancestral (log_snr, last_step)",
    "ddim eta=0 (log_snr, last_step)",
    "sde euler-maruyama (log_snr, last_step)",
    "dpmpp_2m (log_snr, last_step)",
    "dpmpp_2m_sde eta=0.5 (log_snr, last_step)",
    "dpmpp_3m (log_snr, last_step)",
    "unipc order=2 bh2 (log_snr, last_step)",
    "unipc order=1 bh1 (log_snr, last_step)",
    "deis order=3 (log_snr, last_step)",
)
FIT_REFERENCE_STEPS = 200


def optimized_row(label: str) -> str:
    """The label of a row's sampler on its fitted grid."""
    return label.replace("(log_snr,", "(optimized grid,")


def oracle(dtype: torch.dtype = torch.float32) -> Denoiser:
    """The ring's exact denoiser: Oracle + eps parameterization + LogLinear(10, -8)."""
    mixture = make_mixture("ring8").to(dtype=torch.float64)
    param = Eps()
    schedule = LogLinear(log_snr_max=10.0, log_snr_min=-8.0)
    return Denoiser(Oracle(mixture, param), param, schedule).to(dtype)


def trained(run: str) -> Denoiser:
    """The EMA denoiser of a training run on the ring (refused for other data)."""
    from hydra import compose, initialize_config_dir

    from diffexp.build.runs import load_model
    from diffexp.cli import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"run={run}"])
    model = load_model(cfg)
    data = model.config.data.get("preset", model.config.data.get("name"))
    if str(data) != "ring8":
        raise SystemExit(f"--run {run}: trained on {data}, not ring8; the KL needs ring8's density")
    return model.denoiser.float()


class Judge:
    """KL (k-NN entropy, MATH.md s10) and log-density gap of sample sets against the ring's q."""

    def __init__(self, n: int, seed: int, floor_sets: int = 5) -> None:
        self.mixture = make_mixture("ring8").to(dtype=torch.float64)
        self.floor, self.floor_std = sample_kl_floor(
            lambda size, g: self.mixture.sample(size, generator=g)[0],
            self.mixture.log_prob,
            n,
            repeats=floor_sets,
            seed=seed + 1000,
        )
        big = self.mixture.sample(200_000, generator=_gen(seed + 3))[0]
        self.data_log_density = self.mixture.log_prob(big).mean().item()

    def __call__(self, x: torch.Tensor) -> tuple[float, float]:
        """(KL(samples || q) in nats, mean log q(x) - the data's); nan for non-finite samples."""
        x = x.to(torch.float64)
        if not torch.isfinite(x).all():
            return math.nan, math.nan
        kl = sample_kl(x, self.mixture.log_prob)
        return kl, self.mixture.log_prob(x).mean().item() - self.data_log_density


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cell(kl: float, gap: float, nfe: int, target: int | None) -> str:
    shown = f"{kl:.3f} / {gap:+.3f}"
    return shown if nfe == target else f"{shown} ({nfe})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="samples per run")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor-sets", type=int, default=5, help="exact sets for the KL floor")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[""],
        help="only the samplers whose label contains one of these (all tables)",
    )
    parser.add_argument("--run", default=None, help="a ring8 training run instead of the oracle")
    parser.add_argument(
        "--optimized-nfe",
        type=int,
        nargs="*",
        default=[5, 10, 20],
        help="budgets at which the fitted-grid rows run (none: no such rows)",
    )
    parser.add_argument("--fit-n", type=int, default=2000, help="samples per candidate grid")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    den = oracle() if args.run is None else trained(args.run)
    judge = Judge(args.n, args.seed, args.floor_sets)

    def run(sampler: Sampler) -> tuple[float, float, int]:
        out = sampler.sample(den, (args.n, 2), generator=_gen(args.seed))
        return (*judge(out.x), out.nfe)

    source = "oracle denoiser" if args.run is None else f"trained denoiser of {args.run}"
    print(f"Ring of 8 Gaussians, {source} (float32), n = {args.n}, seed {args.seed}")
    print(
        f"KL floor (exact samples, {args.floor_sets} sets of {args.n}): "
        f"{judge.floor:.4f} +- {judge.floor_std:.4f} nats; "
        f"data mean log q = {judge.data_log_density:.3f}"
    )
    print("cells: KL(samples || q) / log-density gap, nats (NFE used, where not the column's)\n")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |")
    print("|---|" + "---|" * len(args.nfe))
    best: dict[int, tuple[float, str]] = {}

    def row(label: str, samplers: dict[int, Sampler | None]) -> None:
        cells = []
        for target in args.nfe:
            sampler = samplers.get(target)
            if sampler is None:
                cells.append("-")
                continue
            kl, gap, nfe = run(sampler)
            cells.append(_cell(kl, gap, nfe, target))
            if nfe <= target and kl < best.get(target, (math.inf, ""))[0]:
                best[target] = (kl, label)
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

    def wanted(label: str) -> bool:
        return any(part in label for part in args.rows)

    for label, make in ROWS.items():
        if wanted(label):
            row(label, {target: make(target) for target in args.nfe})
    for label in OPTIMIZED:
        if not wanted(optimized_row(label)) or not args.optimized_nfe:
            continue
        fitted: dict[int, Sampler | None] = {}
        for target in args.nfe:
            if target in args.optimized_nfe:
                fitted[target] = fit(ROWS[label](target), den, args)
        row(optimized_row(label), fitted)
    print("\n| adaptive PF-ODE (over log-SNR) | rtol = atol | NFE | KL (nats) | gap (nats) |")
    print("|---|---|---|---|---|")
    for solver, tol in ADAPTIVE:
        if not wanted(solver):
            continue
        sampler = ProbabilityFlowODE(solver=solver, rtol=tol, atol=tol, final_denoise=True)
        kl, gap, nfe = run(sampler)
        print(f"| {solver} (+denoise) | {tol:g} | {nfe} | {kl:.3f} | {gap:+.3f} |", flush=True)
    print("\n| NFE | best sampler | KL (nats) |")
    print("|---|---|---|")
    for target in args.nfe:
        if target in best:
            kl, label = best[target]
            print(f"| {target} | {label} | {kl:.3f} |")
    print(f"\n({time.perf_counter() - start:.0f} s, {torch.get_num_threads()} thread(s))")


def fit(sampler: Sampler, den: Denoiser, args: argparse.Namespace) -> Sampler:
    """``sampler`` on the grid fitted to ``den`` (noise seeds 7919 + the table's seed, apart from
    the table's)."""
    seed = args.seed + 7919
    shape = (args.fit_n, 2)
    reference = dataclasses.replace(sampler, steps=FIT_REFERENCE_STEPS)
    ref = reference.sample(den, shape, generator=_gen(seed + 1)).x
    heldout = (seed + 2, seed + 3)
    return fit_time_grid(sampler, den, shape, ref, seed=seed, heldout_seeds=heldout)[1]


if __name__ == "__main__":
    main()
