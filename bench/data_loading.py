"""CIFAR-10 data loading against the UNet's training step: is the loader the bottleneck?

Writes ``--n-images`` training images (and a small test batch) as CIFAR-10 python batches in the
real on-disk format (the generator of tests/data/test_image_data.py), loads them with
``CIFAR10DataModule`` (``data=cifar10``) and times its train loader (one gather of the uint8
images and a float conversion per batch) with ``num_workers`` 0 and 2 and ``pin_memory`` off and
on. The reference, measured in the same run, is the training step of the CIFAR UNet
(``network=unet``, about 38M parameters) at the same batch: the plain loop of
``bench.train_throughput`` (diffexp's loss, backward, Adam, LR schedule, EMA) on the same data.

Each loader variant runs a warm-up epoch (workers started), then ``--epochs`` timed epochs per
round; the rounds alternate between the variants and a variant's time per batch is the lower
quartile of its epochs' times per batch. ``pin_memory`` pins nothing without an accelerator.

    python -m bench.data_loading [--n-images 2000] [--batch 32] [--epochs 3] [--rounds 3] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from bench.image_throughput import TINY_UNET
from bench.train_throughput import _config, plain_chunks
from diffexp.build.factory import build_datamodule
from tests.data.test_image_data import _fake_cifar


def write_cifar(root: Path, n_images: int, n_test: int = 100) -> None:
    """CIFAR-10 files in the real format under root: n_images training images in five batches."""
    _fake_cifar(root, per_batch=n_images // 5, n_test=n_test)


def train_loader(datamodule: Any, num_workers: int, pin_memory: bool) -> DataLoader:
    """The data module's train loader (same data set, sampler and collate) with these options."""
    base = datamodule.train_dataloader()
    return DataLoader(
        base.dataset,
        sampler=base.sampler,
        batch_size=None,
        collate_fn=base.collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def epoch_seconds(loader: DataLoader, epochs: int) -> tuple[list[float], float]:
    """Seconds per batch of each of ``epochs`` timed epochs after a warm-up epoch, and the
    seconds to the first batch of the warm-up epoch (the workers' start)."""
    start = time.perf_counter()
    first = None
    per_batch = []
    for epoch in range(epochs + 1):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        for x, _y in loader:
            if first is None:
                first = time.perf_counter() - start
            x.sum()  # touch the batch, as the step would
            n += 1
        if epoch > 0:
            per_batch.append((time.perf_counter() - t0) / n)
    return per_batch, first


def step_seconds(cfg: Any, steps: int) -> list[float]:
    """Seconds of each of ``steps`` training steps of the configured UNet (plain loop, one warm-up
    step), on the configured data."""
    return plain_chunks(cfg, steps, 1, 1)


def lower_quartile(values: list[float]) -> float:
    """The lower quartile of values (the value itself for one)."""
    return statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0]


def main() -> None:
    """Time the loader variants and the UNet's step, print batches/s and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="UNet training steps timed")
    parser.add_argument("--workers", default="0,2", help="comma-separated num_workers values")
    parser.add_argument("--tiny", action="store_true", help="few images and a narrow UNet (tests)")
    args = parser.parse_args()
    if args.tiny:
        args.n_images, args.batch, args.epochs, args.rounds, args.steps = 100, 8, 1, 1, 2
    variants = [(int(w), pin) for w in args.workers.split(",") for pin in (False, True)]
    accelerator = torch.cuda.is_available()
    if not accelerator:  # DataLoader warns once per loader that nothing is pinned
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
    n_val = max(1, args.n_images // 10)
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), args.n_images)
        overrides = [
            "network=unet",
            "data=cifar10",
            f"data.data_dir={tmp}",
            f"data.val_size={n_val}",
            f"data.batch_size={args.batch}",
        ]
        if args.tiny:
            overrides += TINY_UNET
        cfg = _config(overrides, tmp)
        dm = build_datamodule(cfg.data, require_files=True)
        t0 = time.perf_counter()
        dm.setup("fit")
        setup_s = time.perf_counter() - t0
        n_train = dm.sizes[0]
        times: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
        firsts: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
        steps: list[float] = []
        for r in range(args.rounds):
            for variant in variants:
                loader = train_loader(dm, *variant)
                per_batch, first = epoch_seconds(loader, args.epochs)
                del loader  # stops its workers
                times[variant] += per_batch
                firsts[variant].append(first)
            steps += step_seconds(cfg, args.steps)
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"workers={w} pin={int(p)} {1000 * lower_quartile(t):.3f} ms/batch"
                    for (w, p), t in times.items()
                )
                + f"; UNet step {1000 * statistics.median(steps):.0f} ms",
                flush=True,
            )
    step_ms = 1000 * statistics.median(steps)
    print()
    print(
        f"CIFAR10DataModule: {n_train} training images on disk (read in {setup_s:.2f} s), "
        f"batch {args.batch} ({n_train // args.batch} batches an epoch), "
        f"threads={torch.get_num_threads()}, {args.rounds} rounds of {args.epochs} epochs"
    )
    if not accelerator:
        print("(no accelerator: pin_memory pins nothing here)")
    print(
        f"reference: the CIFAR UNet's training step at batch {args.batch} (plain loop, median of "
        f"{len(steps)} steps): {step_ms:.1f} ms = {1000 / step_ms:.2f} steps/s"
    )
    print("| num_workers | pin_memory | ms/batch | batches/s | first batch (s) | batches / steps |")
    print("|---|---|---|---|---|---|")
    for (w, p), t in times.items():
        ms = 1000 * lower_quartile(t)
        first = statistics.median(firsts[(w, p)])
        print(f"| {w} | {p} | {ms:.3f} | {1000 / ms:.0f} | {first:.3f} | {step_ms / ms:.0f} |")
    worst = max(1000 * lower_quartile(t) for t in times.values())
    print(f"loader share of a step, slowest variant: {worst / step_ms:.5f}")


if __name__ == "__main__":
    main()
