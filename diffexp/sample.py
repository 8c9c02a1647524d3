"""Draw samples: ``python -m diffexp.sample run=<folder> | ckpt=<file> | network=oracle``.

Writes ``samples.npz`` (``x``, ``nfe``, and ``y`` when labelled) and ``samples.png`` to its
output folder. ``sampler=...``, ``steps=...``, ``guidance=cfg guidance.scale=...``, ``label=k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffexp.build.checks import check_sample
from diffexp.build.grids import load_grid_times
from diffexp.build.runs import check_request
from diffexp.cli import CONF_DIR, refusing_bad_input, run_cli, task_overrides

# torch, Lightning and the samplers are imported in ``sample``: a refusal of the command line
# (build.checks, build.runs.check_request) comes before them, in about a second (a bad sampler
# setting, checked by building the sampler, which imports torch: a few seconds)


def sample(cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    """Sample from the model described by ``cfg``; returns the path of samples.npz.

    ``overrides``: the command line's (Hydra's task overrides); one of what the checkpoint defines
    that differs from its stored config is refused, before any compute.
    """
    from diffexp.build.runs import describe_guidance, guided_denoiser, load_model, sampling_labels

    out_dir = Path(cfg.paths.output_dir)
    model = load_model(cfg, device=cfg.device, overrides=overrides, seed=int(cfg.seed))
    import numpy as np
    import torch

    from diffexp.build.factory import build_sampler
    from diffexp.metrics.plots import plot_samples, save_image_grid
    from diffexp.training.loggers import log

    sampler = build_sampler(cfg.sampler, cfg.get("steps"), load_grid_times(cfg))
    denoiser = guided_denoiser(model, cfg)
    n = int(cfg.n_samples)
    y = sampling_labels(cfg, model, denoiser, n, cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed))
    with torch.no_grad():
        result = sampler.sample(
            denoiser, (n, *model.datamodule.shape), y=y, generator=gen, device=cfg.device
        )
    x = result.x.cpu()
    path = out_dir / "samples.npz"
    extra = {} if y is None else {"y": y.cpu().numpy()}
    np.savez(
        path,
        x=x.numpy(),
        nfe=result.nfe,
        sampler=repr(sampler),
        source=model.source,
        guidance=describe_guidance(denoiser, model.denoiser),
        **extra,
    )
    title = f"{sampler!r}, NFE {result.nfe}"
    if x.dim() == 4:
        save_image_grid(x[:64], out_dir / "samples.png", nrow=8)
    elif x.shape[1] <= 3:
        ref = model.datamodule.reference(x.shape[0], seed=10_000)
        plot_samples(x, ref, out_dir / "samples.png", title)
    log.info("wrote %s (%d samples, NFE %d)", path, x.shape[0], result.nfe)
    print(f"wrote {path} ({x.shape[0]} samples, {sampler!r}, NFE {result.nfe})")
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: the config's values checked first, then the sampling."""
    with refusing_bad_input():
        check_sample(cfg)
        check_request(cfg)
        load_grid_times(cfg)  # sampler.time_grid=optimized: its file, checked against the sampler
        sample(cfg, overrides=task_overrides())


def run() -> None:
    """Console script ``diffexp-sample``: ``main`` with the command line's exit codes."""
    run_cli(main)


if __name__ == "__main__":
    run()
