"""Fit a sampler's time grid to a model: ``python -m diffexp.optimize_grid run=<folder>
sampler=<name> steps=<N>`` (or ``ckpt=<file>``, or ``network=oracle grid=<file>``).

Scores candidate log-SNR grids by the energy distance of the sampler's samples to a reference
(the same sampler with ``reference_steps`` steps on its configured grid), with the same noise for
every candidate (``diffexp.diffusion.grid_search``), and writes the best next to the checkpoint,
``<checkpoint folder>/grids/<Sampler>-<steps>.json``, or to ``grid=<file>``.
``eval``/``sample`` ``sampler=<name> steps=<N> sampler.time_grid=optimized`` use it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffexp.build.checks import check_optimize_grid
from diffexp.build.runs import check_request
from diffexp.cli import CONF_DIR, refusing_bad_input, run_cli, task_overrides


def optimize_grid(cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    """Fit the grid, write its record, return the file's path."""
    import torch

    from diffexp.build.factory import build_sampler
    from diffexp.build.grids import grid_path, identifying_settings, sampler_name, save_grid
    from diffexp.build.runs import describe_guidance, guided_denoiser, load_model, sampling_labels
    from diffexp.diffusion.grid_search import fit_time_grid
    from diffexp.training.loggers import log

    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("grid") or cfg.get("run") or cfg.get("ckpt"):
        path = grid_path(cfg)
    else:
        path = out_dir / f"{sampler_name(cfg.sampler)}-{cfg.get('steps') or cfg.sampler.steps}.json"
    model = load_model(cfg, device=cfg.device, overrides=overrides, seed=int(cfg.seed))
    sampler = build_sampler(cfg.sampler, cfg.get("steps"))
    steps = int(sampler.steps)
    denoiser = guided_denoiser(model, cfg)
    n, device = int(cfg.n_samples), cfg.device
    y = sampling_labels(cfg, model, denoiser, n, device)
    shape = (n, *model.datamodule.shape)
    seed = int(cfg.seed)

    def draw(s: Any, generator_seed: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(generator_seed)
        return s.sample(denoiser, shape, y=y, generator=gen, device=device).x

    start = time.perf_counter()
    reference = draw(dataclasses.replace(sampler, steps=int(cfg.reference_steps)), seed + 1)
    search = cfg.search
    result, optimized = fit_time_grid(
        sampler,
        denoiser,
        shape,
        reference,
        seed=seed,
        y=y,
        device=device,
        fractions=tuple(search.fractions),
        rhos=tuple(search.rhos),
        sweeps=int(search.sweeps),
        heldout_seeds=(seed + 2, seed + 3),
    )
    seconds = time.perf_counter() - start
    times = optimized.times
    record = {
        "sampler": sampler_name(cfg.sampler),
        "settings": identifying_settings(sampler),
        "steps": steps,
        "times": times,
        "log_snr": [float(v) for v in result.log_snr],
        "score": "energy distance to the reference (same sampler, reference_steps steps)",
        "energy_distance": result.score,
        "fixed_grids": result.fixed,
        "heldout_seeds": [seed + 2, seed + 3],
        "heldout": result.heldout,
        "chosen": result.chosen,
        "evaluations": result.evaluations,
        "n_samples": n,
        "reference_steps": int(cfg.reference_steps),
        "reference_grid": sampler.time_grid,
        "source": model.source,
        "guidance": describe_guidance(denoiser, model.denoiser),
        "seconds": seconds,
        "config": OmegaConf.to_container(cfg.search),
    }
    save_grid(path, record)
    if path.parent != out_dir:
        save_grid(out_dir / "grid.json", record)
    log.info("wrote %s", path)
    fixed_list = ", ".join(f"{k} {v:.4g}" for k, v in result.fixed.items())
    lam_list = ", ".join(f"{v:.2f}" for v in result.log_snr)
    heldout_list = ", ".join(f"{k} {v:.4g}" for k, v in result.heldout.items())
    print(
        f"wrote {path}\n"
        f"{sampler_name(cfg.sampler)}, {steps} steps: energy distance {result.score:.4g} "
        f"(fixed grids: {fixed_list}); on fresh noise: {heldout_list}, kept: {result.chosen}; "
        f"{result.evaluations} grids in {seconds:.0f} s\nlog-SNR grid: [{lam_list}]"
    )
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="optimize_grid")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: the config's values checked first, then the fit."""
    with refusing_bad_input():
        check_optimize_grid(cfg)
        check_request(cfg)
        optimize_grid(cfg, overrides=task_overrides())


def run() -> None:
    """Console script ``diffexp-optimize-grid``: ``main`` with the command line's exit codes."""
    run_cli(main)


if __name__ == "__main__":
    run()
