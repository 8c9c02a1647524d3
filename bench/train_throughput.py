"""Training throughput: the framework (Lightning Trainer) against a plain PyTorch loop.

Both train the same Denoiser (the configured network, parameterization and schedule) on the
same in-memory data with the same batch size, objective, optimizer and EMA; the plain loop
gathers its batches by tensor indexing. Rounds alternate between the two and the medians are
compared in the same run, so the ratio does not depend on how fast this machine is.

    python -m bench.train_throughput [--steps 1500] [--rounds 3] [hydra overrides ...]
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

from diffexp.build.factory import build_datamodule, build_module
from diffexp.cli import CONF_DIR


class _StepTimer(pl.Callback):
    """Times training batches after ``warmup`` of them."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.steps += 1
            self.end = time.perf_counter()


def _config(overrides: list[str], out_dir: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out_dir}", *overrides])


def framework_steps_per_second(cfg, steps: int, warmup: int, out_dir: str) -> float:
    """Trainer.fit with a CSV logger (logging every 50 steps), no validation or checkpoints."""
    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    timer = _StepTimer(warmup)
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
    return timer.steps / (timer.end - timer.start)


def plain_steps_per_second(cfg, steps: int, warmup: int) -> float:
    """The same training in a plain loop: gather, loss, backward, step, EMA."""
    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    opt_cfg = module.configure_optimizers()
    optimizer = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    scheduler = opt_cfg["lr_scheduler"]["scheduler"] if isinstance(opt_cfg, dict) else None
    x_train = dm.x_train
    y_train = dm.y_train
    batch = dm.batch_size
    per_epoch = x_train.shape[0] // batch
    perm = torch.randperm(x_train.shape[0])
    start = None
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        i = step % per_epoch
        if i == 0:
            perm = torch.randperm(x_train.shape[0])
        idx = perm[i * batch : (i + 1) * batch]
        x0, y = x_train[idx], (None if y_train is None else y_train[idx])
        out = module.objective(
            module.denoiser, x0, y, T=module.T, reconstruction_nll=module.reconstruction_nll
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if module.ema is not None:
            module.ema.update_parameters(module.denoiser)
    return steps / (time.perf_counter() - start)


def main() -> None:
    """Alternate rounds of both, print steps/s and the ratio framework / plain."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(overrides, tmp)
        plain, framework = [], []
        for r in range(args.rounds):
            plain.append(plain_steps_per_second(cfg, args.steps, args.warmup))
            framework.append(framework_steps_per_second(cfg, args.steps, args.warmup, tmp))
            print(
                f"round {r + 1}: plain {plain[-1]:.1f} steps/s, "
                f"framework {framework[-1]:.1f} steps/s",
                flush=True,
            )
    p, f = statistics.median(plain), statistics.median(framework)
    print()
    print(
        f"config: data={cfg.data.get('preset', cfg.data.get('name'))} batch={cfg.data.batch_size} "
        f"network={cfg.network._target_.rsplit('.', 1)[-1]}(width={cfg.network.get('width')}) "
        f"weighting={cfg.weighting._target_.rsplit('.', 1)[-1]} threads={torch.get_num_threads()}"
    )
    print(f"| loop | steps/s (median of {args.rounds}) |")
    print("|---|---|")
    print(f"| plain PyTorch | {p:.1f} |")
    print(f"| diffexp (Lightning) | {f:.1f} |")
    print(f"ratio framework / plain: {f / p:.3f}")


if __name__ == "__main__":
    main()
