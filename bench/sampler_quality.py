"""Sample quality against NFE for every sampler, with the exact denoiser of the 8-Gaussian ring.

The oracle (``diffexp.networks.Oracle``: the mixture's exact posterior mean, eps-parameterized,
log-linear schedule with log-SNR from 10 to -8, float32) removes the network from the comparison:
what is left is the sampler's discretization. Quality of n samples, against held-out data:

- SW ratio: sliced Wasserstein distance to a held-out set over the noise floor, the distance
  between two held-out sets of the same size (about 1 is as good as data; the floor itself
  varies by about +-25% from one pair of held-out sets to another at n = 4000);
- gap: mean log q(x) of the samples under the true density minus the data's (nats, the data's
  from 200,000 draws); negative is too spread or off the modes, positive too concentrated.

Each sampler's settings are chosen so its NFE is at most the column's (Heun: 2 per step; PC:
predictor + corrector; "last_step": the last interval is the final denoise, no extra NFE); the
cell shows the NFE it used where it differs. Adaptive solvers are listed by tolerance.

    python -m bench.sampler_quality [--n 4000] [--nfe 10 20 50 100 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from diffexp.data.mixtures import make_mixture
from diffexp.diffusion.denoiser import Denoiser
from diffexp.diffusion.parameterizations import get_parameterization
from diffexp.diffusion.samplers import (
    DDIM,
    Ancestral,
    AnnealedLangevin,
    PredictorCorrector,
    ProbabilityFlowODE,
    ReverseSDE,
    Sampler,
)
from diffexp.diffusion.schedules import LogLinear
from diffexp.metrics.sliced_wasserstein import sliced_wasserstein
from diffexp.networks import Oracle

LAST = "last_step"

# label -> (target NFE -> sampler with NFE <= target)
ROWS: dict[str, Callable[[int], Sampler]] = {
    "ancestral (uniform, +denoise)": lambda n: Ancestral(n - 1, "uniform", True),
    "ancestral (log_snr, last_step)": lambda n: Ancestral(n, "log_snr", LAST),
    "ddim eta=0 (log_snr, last_step)": lambda n: DDIM(n, 0.0, "log_snr", LAST),
    "sde euler-maruyama (log_snr, last_step)": lambda n: ReverseSDE(n, "log_snr", LAST),
    "ode heun (karras, last_step)": lambda n: ProbabilityFlowODE(
        (n + 1) // 2, "heun", time_grid="karras", final_denoise=LAST
    ),
    "ode dpm++2m (log_snr, last_step)": lambda n: ProbabilityFlowODE(
        n, "dpmpp_2m", time_grid="log_snr", final_denoise=LAST
    ),
    "langevin step_scale=0.5 (log_snr, last_step)": lambda n: AnnealedLangevin(
        max(1, n // 100), (n - 1) // max(1, n // 100) + 1, 0.5, "log_snr", LAST
    ),
    "pc ancestral+1 corrector snr=0.16 (log_snr, last_step)": lambda n: PredictorCorrector(
        "ancestral", (n - 1) // 2 + 1, 1, 0.16, "log_snr", LAST
    ),
}
ADAPTIVE = [("dopri5", tol) for tol in (1e-2, 1e-3, 1e-4, 1e-5)] + [("bosh3", 1e-3)]


def oracle(dtype: torch.dtype = torch.float32) -> Denoiser:
    """The ring's exact denoiser: Oracle + eps parameterization + LogLinear(10, -8)."""
    mixture = make_mixture("ring8").to(dtype=torch.float64)
    param = get_parameterization("eps")
    schedule = LogLinear(log_snr_max=10.0, log_snr_min=-8.0)
    return Denoiser(Oracle(mixture, param), param, schedule).to(dtype)


class Judge:
    """SW ratio and log-density gap of sample sets against held-out ring data."""

    def __init__(self, n: int, seed: int) -> None:
        self.mixture = make_mixture("ring8")
        ref, ref2 = (self.mixture.sample(n, generator=_gen(seed + k))[0] for k in (1, 2))
        self.ref, self.floor = ref, sliced_wasserstein(ref2, ref, n_projections=512)
        big = self.mixture.sample(200_000, generator=_gen(seed + 3))[0]
        self.data_log_density = self.mixture.log_prob(big).mean().item()

    def __call__(self, x: torch.Tensor) -> tuple[float, float]:
        """(SW(x, held-out) / floor, mean log q(x) - the data's mean log q)."""
        x = x.to(self.ref.dtype)
        ratio = sliced_wasserstein(x, self.ref, n_projections=512) / self.floor
        return ratio, self.mixture.log_prob(x).mean().item() - self.data_log_density


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cell(ratio: float, gap: float, nfe: int, target: int | None) -> str:
    shown = f"{ratio:.2f} / {gap:+.3f}"
    return shown if nfe == target else f"{shown} ({nfe})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="samples per run")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    den, judge = oracle(), Judge(args.n, args.seed)

    def run(sampler: Sampler) -> tuple[float, float, int]:
        out = sampler.sample(den, (args.n, 2), generator=_gen(args.seed))
        return (*judge(out.x), out.nfe)

    print(f"Ring of 8 Gaussians, oracle denoiser (float32), n = {args.n}, seed {args.seed}; ")
    print(f"noise floor SW = {judge.floor:.4f}, data mean log q = {judge.data_log_density:.3f}")
    print("cells: SW ratio / log-density gap in nats (NFE used, where not the column's)\n")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |")
    print("|---|" + "---|" * len(args.nfe))
    for label, make in ROWS.items():
        cells = []
        for target in args.nfe:
            ratio, gap, nfe = run(make(target))
            cells.append(_cell(ratio, gap, nfe, target))
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print("\n| adaptive PF-ODE (over log-SNR) | rtol = atol | NFE | SW ratio | gap (nats) |")
    print("|---|---|---|---|---|")
    for solver, tol in ADAPTIVE:
        sampler = ProbabilityFlowODE(solver=solver, rtol=tol, atol=tol, final_denoise=True)
        ratio, gap, nfe = run(sampler)
        print(f"| {solver} (+denoise) | {tol:g} | {nfe} | {ratio:.2f} | {gap:+.3f} |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s, {torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
