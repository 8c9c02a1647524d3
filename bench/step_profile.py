"""Where a default training step's milliseconds go: the plain loop (diffexp's loss, optimizer,
LR schedule and EMA, no Lightning) and the minimal hand-written loop, part by part.

Each part is timed by ``time.perf_counter`` around it, the two loops alternating step by step
(so this shared machine's slow spells hit both), and the median over the steps is reported.
Lightning's own share is framework - plain in ``bench.train_throughput``.

    python -m bench.step_profile [--steps 1500] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench.minimal_loop import default_setup, index_batches, minimal_loss
from bench.train_throughput import _config
from diffexp.build.factory import build_datamodule, build_module

PARTS = ("batch", "loss forward", "zero_grad", "backward", "Adam step", "LR schedule", "EMA")


def main() -> None:
    """Alternate a step of each loop, print the median of every part."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=100)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(overrides, tmp)
    torch.manual_seed(0)
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    gen = torch.Generator().manual_seed(0)
    minimal = default_setup(overrides)
    net, x_train = minimal["net"], minimal["x_train"]
    params = list(net.parameters())
    ema = [p.detach().clone() for p in params]
    adam = torch.optim.Adam(params, lr=minimal["lr"])
    lam_max, lam_min = minimal["log_snr_max"], minimal["log_snr_min"]
    dm.setup("fit")
    plain_batches = index_batches(
        dm.train_dataloader().dataset, dm.batch_size, args.steps + args.warmup
    )
    minimal_batches = index_batches(x_train, minimal["batch"], args.steps + args.warmup)
    times: dict[str, dict[str, list[float]]] = {"plain": {}, "minimal": {}}
    for step in range(args.steps + args.warmup):
        t = [time.perf_counter()]
        x0 = next(plain_batches)[0]
        t.append(time.perf_counter())
        out = module.objective(
            module.denoiser,
            x0,
            None,
            T=module.T,
            reconstruction_nll=module.reconstruction_nll,
            generator=gen,
        )
        t.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        out.loss.backward()
        t.append(time.perf_counter())
        optimizer.step()
        t.append(time.perf_counter())
        scheduler.step()
        t.append(time.perf_counter())
        module.ema.update(module.denoiser)
        t.append(time.perf_counter())
        if step >= args.warmup:
            for part, a, b in zip(PARTS, t[:-1], t[1:], strict=True):
                times["plain"].setdefault(part, []).append(b - a)

        t = [time.perf_counter()]
        x0 = next(minimal_batches)
        t.append(time.perf_counter())
        loss = minimal_loss(net, x0, lam_max, lam_min)
        t.append(time.perf_counter())
        adam.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        adam.step()
        t.append(time.perf_counter())
        t.append(time.perf_counter())  # no LR schedule
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - minimal["ema_decay"])
        t.append(time.perf_counter())
        if step >= args.warmup:
            for part, a, b in zip(PARTS, t[:-1], t[1:], strict=True):
                times["minimal"].setdefault(part, []).append(b - a)

    print(f"median ms per part over {args.steps} steps, threads={torch.get_num_threads()}")
    print("| part | plain (diffexp's loss, optimizer, EMA) | minimal |")
    print("|---|---|---|")
    totals = {"plain": 0.0, "minimal": 0.0}
    for part in PARTS:
        row = []
        for loop in ("plain", "minimal"):
            ms = 1000 * statistics.median(times[loop][part])
            totals[loop] += ms
            row.append(f"{ms:.3f}")
        print(f"| {part} | {' | '.join(row)} |")
    print(f"| sum | {totals['plain']:.3f} | {totals['minimal']:.3f} |")


if __name__ == "__main__":
    main()
