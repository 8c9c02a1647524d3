"""Image-scale training throughput: the framework (Lightning Trainer) against the plain loop.

Two cases, each run with the loops of ``bench.train_throughput`` (the same model, data, loss,
optimizer, LR schedule and EMA; framework / plain is Lightning's cost):

- digits: the small UNet on scikit-learn's digits (``experiment=digits``, batch 128, 8x8);
- cifar: the CIFAR-size UNet (``network=unet``, about 38M parameters) on CIFAR-shaped synthetic
  images (3x32x32, 256 levels, 10 classes; ``SyntheticCIFAR10``, made in memory) at a small
  batch (default 4): a CPU step of this network takes about a second.

As in ``bench.train_throughput`` every loop is timed in chunks of ``--*-chunk`` steps after a
warm-up of one chunk, the rounds alternate between the loops, and a loop's time per step is the
lower quartile of its chunks; only ratios measured in the same run are compared.

With ``--compile`` the framework runs once more with ``model.compile=true`` (the network
compiled by inductor; its compile time falls in the warm-up chunk) and the table adds the
compiled / eager ratio.

    python -m bench.image_throughput [--cases digits,cifar] [--rounds 3] [--minimal] [--compile]
        [--tiny]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch

from bench.train_throughput import (
    _config,
    framework_chunks,
    minimal_chunks,
    ms_per_step,
    plain_chunks,
)
from diffexp.build.factory import build_datamodule, build_module
from diffexp.data.datamodules import derive_seed
from diffexp.data.images import ImageDataModule, Splits

SYNTHETIC_TARGET = "bench.image_throughput.SyntheticCIFAR10"
# a narrow UNet of the CIFAR architecture, for tests (about 0.6M parameters)
TINY_UNET = ["network.base_channels=16", "network.num_groups=8"]


class SyntheticCIFAR10(ImageDataModule):
    """CIFAR-10's shape, levels and classes (3x32x32, 256 levels, 10 labels), with uniformly
    random images generated in memory: the network's and the loader's work without the files.

    Takes the keys of ``conf/data/cifar10.yaml`` (``data_dir`` and ``download`` are ignored) plus
    ``n_train`` (the training images) and ``image_size``; val and test hold ``min(val_size, 256)``
    images each.
    """

    def __init__(
        self,
        data_dir: str = "",
        download: bool = False,
        val_size: int = 64,
        n_train: int = 512,
        image_size: int = 32,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        seed: int = 0,
        split_seed: int = 0,
        **description: Any,
    ) -> None:
        """The data module's sizes; the images are made in ``setup``."""
        super().__init__(
            shape=(3, int(image_size), int(image_size)),
            num_levels=256,
            num_classes=10,
            name="synthetic_cifar10",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            split_seed=split_seed,
            **description,
        )
        self.n_train, self.n_eval = int(n_train), max(1, min(int(val_size), 256))

    def _load(self) -> Splits:
        """Uniform random levels and labels for train, val and test (seeded by split_seed)."""
        gen = torch.Generator().manual_seed(derive_seed(self.split_seed, 17))

        def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            """n random images (uint8 levels) and labels."""
            levels = torch.randint(0, 256, (n, *self.shape), generator=gen, dtype=torch.uint8)
            return levels, torch.randint(0, 10, (n,), generator=gen)

        return (*part(self.n_train), *part(self.n_eval), *part(self.n_eval))


def cifar_overrides(batch: int, n_train: int = 256, tiny: bool = False) -> list[str]:
    """Hydra overrides for the CIFAR UNet on ``SyntheticCIFAR10`` at ``batch`` (tiny: a narrow
    UNet of the same architecture, for tests)."""
    overrides = [
        "network=unet",
        "data=cifar10",
        f"data._target_={SYNTHETIC_TARGET}",
        f"data.batch_size={batch}",
        f"+data.n_train={n_train}",
    ]
    if tiny:
        overrides += TINY_UNET
    return overrides


def network_parameters(cfg: Any) -> int:
    """The number of parameters of the configured network (built once, on this data)."""
    torch.manual_seed(0)
    module = build_module(cfg, build_datamodule(cfg.data))
    return sum(p.numel() for p in module.denoiser.network.parameters())


def time_case(
    overrides: list[str],
    steps: int,
    chunk: int,
    rounds: int,
    minimal: bool,
    label: str,
    compiled: bool = False,
) -> dict[str, Any]:
    """Alternate ``rounds`` rounds of the loops on one configuration; ms/step of each loop."""
    loops = {"plain": plain_chunks, "framework": None}
    if minimal:
        loops = {"minimal": minimal_chunks, **loops}
    if compiled:
        loops["compiled"] = None
    chunks: dict[str, list[float]] = {name: [] for name in loops}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(overrides, tmp)
        cfgs = {"framework": cfg}
        if compiled:
            cfgs["compiled"] = _config([*overrides, "model.compile=true"], tmp)
        params = network_parameters(cfg)
        for r in range(rounds):
            for name, fn in loops.items():
                if fn is None:
                    chunks[name] += framework_chunks(cfgs[name], steps, chunk, chunk, tmp)
                else:
                    chunks[name] += fn(cfg, steps, chunk, chunk)
            shown = ", ".join(f"{k} {ms_per_step(v, chunk):.1f} ms/step" for k, v in chunks.items())
            print(f"{label} round {r + 1}: {shown}", flush=True)
    ms = {name: ms_per_step(c, chunk) for name, c in chunks.items()}
    return {
        "label": label,
        "batch": int(cfg.data.batch_size),
        "params": params,
        "chunks": len(chunks["plain"]),
        "chunk": chunk,
        "ms": ms,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    """The cases' ms/step, images/s and ratios, as a Markdown table."""
    minimal = any("minimal" in r["ms"] for r in results)
    compiled = any("compiled" in r["ms"] for r in results)
    head = "| case | params | batch | chunks | plain ms/step | framework ms/step | framework img/s "
    head += "| framework / plain |"
    if minimal:
        head += " minimal ms/step | framework / minimal |"
    if compiled:
        head += " compiled ms/step | eager / compiled |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in results:
        ms = r["ms"]
        row = (
            f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['chunks']} x "
            f"{r['chunk']} | {ms['plain']:.1f} | {ms['framework']:.1f} | "
            f"{1000 * r['batch'] / ms['framework']:.1f} | {ms['plain'] / ms['framework']:.3f} |"
        )
        if minimal:
            if "minimal" in ms:
                row += f" {ms['minimal']:.1f} | {ms['minimal'] / ms['framework']:.3f} |"
            else:
                row += " - | - |"
        if compiled:
            if "compiled" in ms:
                row += f" {ms['compiled']:.1f} | {ms['framework'] / ms['compiled']:.3f} |"
            else:
                row += " - | - |"
        print(row)


def main() -> None:
    """Time the chosen cases and print ms/step and the framework / plain ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="digits,cifar", help="comma-separated: digits, cifar")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--digits-steps", type=int, default=200)
    parser.add_argument("--digits-chunk", type=int, default=20)
    parser.add_argument("--cifar-steps", type=int, default=12)
    parser.add_argument("--cifar-chunk", type=int, default=2)
    parser.add_argument("--cifar-batch", type=int, default=4)
    parser.add_argument(
        "--minimal", action="store_true", help="time the minimal hand-written loop too"
    )
    parser.add_argument(
        "--compile", action="store_true", help="time the framework with model.compile=true too"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a few steps and a narrow CIFAR UNet (tests)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.digits_steps, args.digits_chunk, args.cifar_steps, args.cifar_chunk = 4, 2, 2, 1
        args.rounds = 1
    cases = {
        "digits": (["experiment=digits"], args.digits_steps, args.digits_chunk),
        "cifar": (
            cifar_overrides(args.cifar_batch, tiny=args.tiny),
            args.cifar_steps,
            args.cifar_chunk,
        ),
    }
    labels = {
        "digits": "digits, small UNet (`experiment=digits`)",
        "cifar": "CIFAR UNet (`network=unet data=cifar10`), synthetic 3x32x32",
    }
    results = []
    for name in args.cases.split(","):
        overrides, steps, chunk = cases[name.strip()]
        results.append(
            time_case(
                overrides, steps, chunk, args.rounds, args.minimal, labels[name], args.compile
            )
        )
    print()
    print(f"threads={torch.get_num_threads()}, rounds={args.rounds}, lower quartile of the chunks")
    print_table(results)
    for r in results:
        print(
            f"ratio framework / plain, {r['label']}: {r['ms']['plain'] / r['ms']['framework']:.3f}"
        )


if __name__ == "__main__":
    main()
