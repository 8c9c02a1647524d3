"""Training throughput: the framework (Lightning Trainer) against two loops in plain PyTorch.

- plain: the same Denoiser, objective (diffexp's loss), optimizer and EMA as the framework, its
  batches gathered by tensor indexing: framework / plain is Lightning's cost.
- minimal: a hand-written loop of the same sizes that computes only the mathematics of the
  default run: the configured network on the eps parameterization, the continuous-time ELBO's
  diffusion term on the log-linear schedule (1/2 (lambda_max - lambda_min) ||eps - eps_hat||^2,
  t ~ U(0, 1)), Adam and an EMA by one fused lerp; no reconstruction network call.
  framework / minimal is everything's cost (printed for the default configuration only).

Rounds alternate between the loops and the medians are compared in the same run, so the ratios
do not depend on how fast this machine is.

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


def _index_batches(dm, n: int):
    """n batches (x0, y) of the in-memory training data, gathered by tensor indexing, a fresh
    permutation each epoch."""
    x_train, y_train, batch = dm.x_train, dm.y_train, dm.batch_size
    per_epoch = x_train.shape[0] // batch
    for step in range(n):
        i = step % per_epoch
        if i == 0:
            perm = torch.randperm(x_train.shape[0])
        idx = perm[i * batch : (i + 1) * batch]
        yield x_train[idx], (None if y_train is None else y_train[idx])


def plain_steps_per_second(cfg, steps: int, warmup: int) -> float:
    """The same training in a plain loop: gather, loss, backward, step, EMA."""
    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    opt_cfg = module.configure_optimizers()
    optimizer = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    scheduler = opt_cfg["lr_scheduler"]["scheduler"] if isinstance(opt_cfg, dict) else None
    start = None
    for step, (x0, y) in enumerate(_index_batches(dm, steps + warmup)):
        if step == warmup:
            start = time.perf_counter()
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


def minimal_steps_per_second(cfg, steps: int, warmup: int) -> float:
    """The default run's mathematics by hand (see the module docstring)."""
    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data)
    net = build_module(cfg, dm).denoiser.network  # the configured network, freshly built
    ema = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=float(cfg.model.optimizer.lr))
    lam_max, lam_min = float(cfg.data.log_snr_max), float(cfg.data.log_snr_min)
    start = None
    for step, (x0, _) in enumerate(_index_batches(dm, steps + warmup)):
        if step == warmup:
            start = time.perf_counter()
        lam = lam_max + (lam_min - lam_max) * torch.rand(x0.shape[0])
        eps = torch.randn_like(x0)
        x_t = torch.sigmoid(lam).sqrt()[:, None] * x0 + torch.sigmoid(-lam).sqrt()[:, None] * eps
        eps_hat = net(x_t, lam, None)
        loss = 0.5 * (lam_max - lam_min) * ((eps - eps_hat) ** 2).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(net.parameters()), 1 - float(cfg.model.ema_decay))
    return steps / (time.perf_counter() - start)


def main() -> None:
    """Alternate rounds of both, print steps/s and the ratio framework / plain."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--minimal",
        action="store_true",
        help="time the minimal loop with overrides too (it is the default run's mathematics)",
    )
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(overrides, tmp)
        minimal_too = args.minimal or not overrides  # the default run's mathematics
        plain, framework, minimal = [], [], []
        for r in range(args.rounds):
            if minimal_too:
                minimal.append(minimal_steps_per_second(cfg, args.steps, args.warmup))
            plain.append(plain_steps_per_second(cfg, args.steps, args.warmup))
            framework.append(framework_steps_per_second(cfg, args.steps, args.warmup, tmp))
            print(
                f"round {r + 1}: "
                + (f"minimal {minimal[-1]:.1f} steps/s, " if minimal_too else "")
                + f"plain {plain[-1]:.1f} steps/s, framework {framework[-1]:.1f} steps/s",
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
    if minimal_too:
        print(f"| minimal hand-written loop | {statistics.median(minimal):.1f} |")
    print(f"| plain PyTorch, diffexp's loss | {p:.1f} |")
    print(f"| diffexp (Lightning) | {f:.1f} |")
    print(f"ratio framework / plain (Lightning's cost): {f / p:.3f}")
    if minimal_too:
        m = statistics.median(minimal)
        print(f"ratio framework / minimal (everything's cost): {f / m:.3f}")


if __name__ == "__main__":
    main()
