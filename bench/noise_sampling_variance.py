"""The adaptive p(lambda) against the schedule's and EDM's log-normal (issue 13, part 1).

For each weighting (the ELBO, sigmoid) and each density (``schedule``, ``lognormal``,
``adaptive``): a default ring run of ``--steps`` steps with that density (its validation ELBO
and standard error from ``summary.json``), then, at one trained model (the adaptive run's EMA
weights, with its learned histogram), the loss estimate of ``--batches`` training batches of 512
under each density: the mean over batches with its standard error (the same expectation) and the
standard deviation of the per-batch estimate (what the density is for).

    python -m bench.noise_sampling_variance [--steps 6000] [--batches 400] [--seeds 1]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffexp.build.factory import build_datamodule, build_module
from diffexp.diffusion.loss import WeightedLoss
from diffexp.training.checkpoint_io import load_checkpoint

WEIGHTINGS = ("elbo", "sigmoid")
DENSITIES = ("schedule", "lognormal", "adaptive")


def train(weighting: str, density: str, steps: int, seed: int, run_dir: Path) -> dict:
    """One ``python -m diffexp.train`` run; its summary.json."""
    cmd = [
        sys.executable,
        "-m",
        "diffexp.train",
        f"weighting={weighting}",
        f"noise_sampling={density}",
        f"trainer.max_steps={steps}",
        f"seed={seed}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run_dir / "summary.json").read_text())


@torch.no_grad()
def per_batch_losses(run_dir: Path, batches: int) -> dict[str, torch.Tensor]:
    """The loss estimate of ``batches`` training batches under each density, at the run's EMA
    weights (the adaptive density with the run's learned state)."""
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt", key="ckpt")
    cfg = OmegaConf.create(state["diffexp_config"])
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    module.load_state_dict(state["state_dict"])
    from hydra.utils import instantiate

    from diffexp.cli import CONF_DIR

    densities = {
        name: module.adaptive
        if name == "adaptive"
        else instantiate(OmegaConf.load(Path(CONF_DIR) / "noise_sampling" / f"{name}.yaml"))
        for name in DENSITIES
    }
    x = dm.x_train
    out = {}
    for name, density in densities.items():
        loss = WeightedLoss(module.weighting, density, reconstruction=cfg.model.reconstruction)
        gen = torch.Generator().manual_seed(0)
        values = []
        for _ in range(batches):
            idx = torch.randint(x.shape[0], (512,), generator=gen)
            values.append(loss(module.eval_denoiser, x[idx], generator=gen).loss)
        out[name] = torch.stack(values).double()
    return out


def main() -> None:
    """Train the six runs (per seed), measure, print the two tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for weighting in WEIGHTINGS:
            print(f"\nweighting={weighting}, {args.steps} steps, {args.seeds} seed(s)")
            print("| noise_sampling | validation ELBO (nats) |")
            print("|---|---|")
            for density in DENSITIES:
                cells = []
                for seed in range(args.seeds):
                    s = train(
                        weighting,
                        density,
                        args.steps,
                        seed,
                        Path(tmp, weighting, density, str(seed)),
                    )
                    cells.append(f"{s['val/elbo_nats']:.4f} +- {s['val/elbo_nats_se']:.4f}")
                print(f"| {density} | {'; '.join(cells)} |", flush=True)
            losses = per_batch_losses(Path(tmp, weighting, "adaptive", "0"), args.batches)
            print(f"\nat the adaptive run's weights, {args.batches} batches of 512:")
            print("| noise_sampling | mean loss +- s.e. | std of the per-batch estimate |")
            print("|---|---|---|")
            for density, v in losses.items():
                se = v.std().item() / math.sqrt(len(v))
                print(f"| {density} | {v.mean().item():.4f} +- {se:.4f} | {v.std().item():.4f} |")


if __name__ == "__main__":
    main()
