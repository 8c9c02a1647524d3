"""The minimal hand-written training loop of the default run, the reference of ``make bench``.

Plain PyTorch, the mathematics of ``python -m diffexp.train`` and nothing else: the configured
network (the residual MLP) on the eps parameterization, the continuous-time ELBO's diffusion term
on the log-linear schedule, 1/2 (lambda_max - lambda_min) ||eps - eps_hat||^2 with
t ~ U(0, 1), batches gathered from the in-memory training set by tensor indexing, Adam and an
EMA by one fused lerp; no reconstruction network call, no validation, no logging. With overrides
(``experiment=digits``: the small UNet on digits, unit weighting) the same loop runs the
configured network and data unconditionally; the unit weighting's loss differs from this one by a
constant factor only.

    python -m bench.minimal_loop --steps 3000 [hydra overrides ...]

As a process it is timed by ``bench.step_time`` (start-up cancelled by differencing two step
counts); ``bench.train_throughput`` runs it in-process.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


def index_batches(dataset: Any, batch: int, n: int) -> Iterator[Any]:
    """n batches ``dataset[indices]`` (a tensor, or a data set indexed by a tensor of indices, as
    diffexp's in-memory data sets are), a fresh permutation each epoch."""
    per_epoch = len(dataset) // batch
    for step in range(n):
        i = step % per_epoch
        if i == 0:
            perm = torch.randperm(len(dataset))
        yield dataset[perm[i * batch : (i + 1) * batch]]


def training_images(datamodule: Any) -> Tensor:
    """The training set's x (vectors or images) in memory."""
    datamodule.setup("fit")
    dataset = datamodule.train_dataloader().dataset
    return dataset[torch.arange(len(dataset))][0]


def minimal_loss(net: nn.Module, x0: Tensor, log_snr_max: float, log_snr_min: float) -> Tensor:
    """1/2 (lambda_max - lambda_min) ||eps - eps_hat||^2 at x_t = a x0 + s eps, lambda uniform on
    the range (the log-linear schedule's t ~ U(0, 1)), averaged over the batch."""
    lam = log_snr_max + (log_snr_min - log_snr_max) * torch.rand(x0.shape[0])
    eps = torch.randn_like(x0)
    view = (-1,) + (1,) * (x0.dim() - 1)
    x_t = torch.sigmoid(lam).sqrt().view(view) * x0 + torch.sigmoid(-lam).sqrt().view(view) * eps
    squared = ((eps - net(x_t, lam, None)) ** 2).flatten(1).sum(dim=1)
    return 0.5 * (log_snr_max - log_snr_min) * squared.mean()


def train_minimal(
    net: nn.Module,
    x_train: Tensor,
    steps: int,
    batch: int,
    lr: float,
    ema_decay: float,
    log_snr_max: float,
    log_snr_min: float,
    warmup: int = 0,
    marks: list[float] | None = None,
    every: int = 50,
) -> float:
    """Train ``net`` for warmup + steps steps; return the seconds the last ``steps`` took (and
    append ``time.perf_counter()`` to ``marks`` every ``every`` steps after the warm-up)."""
    ema = [p.detach().clone() for p in net.parameters()]
    params = list(net.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    for step, x0 in enumerate(index_batches(x_train, batch, warmup + steps)):
        if step == warmup:
            start = time.perf_counter()
        if marks is not None and step >= warmup and (step - warmup) % every == 0:
            marks.append(time.perf_counter())
        loss = minimal_loss(net, x0, log_snr_max, log_snr_min)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - ema_decay)
    if marks is not None:
        marks.append(time.perf_counter())
    return time.perf_counter() - start


def default_setup(overrides: list[str]) -> dict:
    """The network (freshly built), the training points and the sizes of the configured run."""
    import tempfile

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffexp.build.factory import build_datamodule, build_network
    from diffexp.cli import CONF_DIR

    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp}", *overrides])
    torch.manual_seed(int(cfg.seed))
    dm = build_datamodule(cfg.data)
    net = build_network(cfg.network, dm, instantiate(cfg.parameterization))
    return {
        "net": net,
        "x_train": training_images(dm),
        "batch": int(cfg.data.batch_size),
        "lr": float(cfg.model.optimizer.lr),
        "ema_decay": float(cfg.model.ema_decay),
        "log_snr_max": float(cfg.data.log_snr_max),
        "log_snr_min": float(cfg.data.log_snr_min),
    }


def main() -> None:
    """Build the default run's network and data, train ``--steps`` steps, print the time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    args, overrides = parser.parse_known_args()
    seconds = train_minimal(**default_setup(overrides), steps=args.steps)
    print(f"minimal loop: {args.steps} steps in {seconds:.2f} s")


if __name__ == "__main__":
    main()
