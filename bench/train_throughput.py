"""Training throughput: the framework (Lightning Trainer) against two loops in plain PyTorch.

- plain: the same Denoiser, objective (diffexp's loss), optimizer and EMA as the framework, its
  batches gathered by tensor indexing: framework / plain is Lightning's cost.
- minimal (``bench.minimal_loop``): a hand-written loop of the same sizes that computes only the
  mathematics of the default run (the network on the continuous-time ELBO's diffusion term,
  Adam, a fused EMA lerp): framework / minimal is everything's cost (printed for the default
  configuration, or with ``--minimal``).

Every loop is timed in chunks of ``--chunk`` steps (one logging step each, at the default
``trainer.log_every_n_steps=50``), the rounds alternate between the loops, and a loop's time per
step is the lower quartile of its chunks: this shared machine's interruptions (10 % between
rounds) fall in the other quartiles, and the ratios do not depend on how fast the machine is.

    python -m bench.train_throughput [--steps 1500] [--rounds 3] [--minimal] [overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.loggers import CSVLogger

from bench.minimal_loop import index_batches, train_minimal, training_images
from diffexp.build.factory import build_datamodule, build_module
from diffexp.cli import CONF_DIR
from diffexp.data.datamodules import split_batch


class _ChunkTimer(pl.Callback):
    """perf_counter marks every ``every`` training steps after ``warmup`` of them."""

    def __init__(self, warmup: int, every: int) -> None:
        self.warmup, self.every, self.marks = warmup, every, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step - self.warmup
        if step >= 0 and step % self.every == 0:
            self.marks.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.marks.append(time.perf_counter())


def _config(overrides: list[str], out_dir: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out_dir}", *overrides])


def _chunks(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=False)]


def framework_chunks(cfg, steps: int, warmup: int, every: int, out_dir: str) -> list[float]:
    """Trainer.fit with a CSV logger (logging every 50 steps), no validation or checkpoints."""
    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    timer = _ChunkTimer(warmup, every)
    trainer = pl.Trainer(
        max_steps=steps + warmup,
        logger=CSVLogger(out_dir, name="bench"),
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=50,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=dm)
    return _chunks(timer.marks)


def _batches(dm, n: int):
    """(x0, y) batches of the training set, gathered as the framework's loader gathers them
    (the data set indexed by a batch of indices) in a permutation per epoch."""
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    for batch in index_batches(dataset, dm.batch_size, n):
        yield split_batch(batch)


def plain_setup(cfg, device: str = "cpu"):
    """(datamodule, module on ``device``, optimizer, LR scheduler or None) of the plain loop."""
    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm).to(device)
    opt_cfg = module.configure_optimizers()
    optimizer = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    scheduler = opt_cfg["lr_scheduler"]["scheduler"] if isinstance(opt_cfg, dict) else None
    return dm, module, optimizer, scheduler


def plain_step(module, optimizer, scheduler, x0, y) -> None:
    """One plain training step: loss, backward, optimizer and LR schedule, EMA."""
    out = module.objective(
        module.denoiser, x0, y, T=module.T, reconstruction_nll=module.reconstruction_nll
    )
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if module.ema is not None:
        module.ema.update(module.denoiser)


def plain_chunks(cfg, steps: int, warmup: int, every: int) -> list[float]:
    """The same training in a plain loop: gather, loss, backward, step, EMA."""
    dm, module, optimizer, scheduler = plain_setup(cfg)
    marks = []
    for step, (x0, y) in enumerate(_batches(dm, steps + warmup)):
        if step >= warmup and (step - warmup) % every == 0:
            marks.append(time.perf_counter())
        plain_step(module, optimizer, scheduler, x0, y)
    marks.append(time.perf_counter())
    return _chunks(marks)


def minimal_chunks(cfg, steps: int, warmup: int, every: int) -> list[float]:
    """The default run's mathematics by hand (``bench.minimal_loop``)."""
    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data)
    net = build_module(cfg, dm).denoiser.network  # the configured network, freshly built
    marks: list[float] = []
    train_minimal(
        net,
        training_images(dm),
        steps,
        batch=int(cfg.data.batch_size),
        lr=float(cfg.model.optimizer.lr),
        ema_decay=float(cfg.model.ema_decay),
        log_snr_max=float(cfg.data.log_snr_max),
        log_snr_min=float(cfg.data.log_snr_min),
        warmup=warmup,
        marks=marks,
        every=every,
    )
    return _chunks(marks)


def ms_per_step(chunks: list[float], every: int) -> float:
    """The lower quartile of the chunks' times, per step, in ms."""
    return 1000 * statistics.quantiles(chunks, n=4)[0] / every


def main() -> None:
    """Alternate rounds of the loops, print ms/step and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument(
        "--minimal",
        action="store_true",
        help="time the minimal loop with overrides too (it is the default run's mathematics)",
    )
    args, overrides = parser.parse_known_args()
    every = args.chunk
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(overrides, tmp)
        loops = {"plain": plain_chunks, "framework": None}
        if args.minimal or not overrides:  # the default run's mathematics
            loops = {"minimal": minimal_chunks, **loops}
        chunks: dict[str, list[float]] = {name: [] for name in loops}
        for r in range(args.rounds):
            for name, fn in loops.items():
                if fn is None:
                    got = framework_chunks(cfg, args.steps, args.warmup, every, tmp)
                else:
                    got = fn(cfg, args.steps, args.warmup, every)
                chunks[name] += got
            print(
                f"round {r + 1}: "
                + ", ".join(f"{k} {ms_per_step(v, every):.2f} ms/step" for k, v in chunks.items()),
                flush=True,
            )
    ms = {name: ms_per_step(c, every) for name, c in chunks.items()}
    print()
    print(
        f"config: data={cfg.data.get('preset', cfg.data.get('name'))} batch={cfg.data.batch_size} "
        f"network={cfg.network._target_.rsplit('.', 1)[-1]}(width={cfg.network.get('width')}) "
        f"weighting={cfg.weighting._target_.rsplit('.', 1)[-1]} threads={torch.get_num_threads()}"
    )
    print(f"| loop | ms/step (lower quartile of {len(chunks['plain'])} chunks of {every}) |")
    print("|---|---|")
    labels = {
        "minimal": "minimal hand-written loop",
        "plain": "plain PyTorch, diffexp's loss",
        "framework": "diffexp (Lightning)",
    }
    for name, value in ms.items():
        print(f"| {labels[name]} | {value:.2f} |")
    print(f"ratio framework / plain (Lightning's cost): {ms['plain'] / ms['framework']:.3f}")
    if "minimal" in ms:
        ratio = ms["minimal"] / ms["framework"]
        print(f"ratio framework / minimal (everything's cost): {ratio:.3f}")


if __name__ == "__main__":
    main()
