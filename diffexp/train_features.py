"""Train the digits feature classifier for FID: ``python -m diffexp.train_features``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from diffexp.cli import CONF_DIR, refusing_bad_input, run_cli
from diffexp.metrics.features import save_classifier, train_classifier

__all__ = ["load_digits_images", "train_features", "upsample_nearest"]


def upsample_nearest(x: Tensor, image_size: int) -> Tensor:
    """Nearest-neighbour upsampling of square images ``[N, C, S, S]`` by pixel repetition."""
    factor, rest = divmod(image_size, x.shape[-1])
    if rest or factor < 1:
        raise ValueError(f"image_size {image_size} is not a multiple of {x.shape[-1]}")
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def load_digits_images(
    image_size: int = 8, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's digits as ``[N, 1, S, S]`` images in [-1, 1]: a stratified train / val split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] * (2.0 / 16.0) - 1.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    x = upsample_nearest(x, image_size)
    idx_train, idx_val = train_test_split(
        torch.arange(len(y)).numpy(),
        test_size=val_fraction,
        random_state=seed,
        stratify=y.numpy(),
    )
    idx_train, idx_val = torch.as_tensor(idx_train), torch.as_tensor(idx_val)
    return x[idx_train], y[idx_train], x[idx_val], y[idx_val]


def train_features(cfg: DictConfig) -> dict[str, Any]:
    """Train the classifier that ``cfg`` describes, save it; returns its path and val accuracy."""
    size = int(cfg.image_size)
    x, y, xv, yv = load_digits_images(size, float(cfg.val_fraction), int(cfg.seed))
    model, acc = train_classifier(
        x,
        y,
        xv,
        yv,
        epochs=int(cfg.epochs),
        lr=float(cfg.lr),
        seed=int(cfg.seed),
        batch_size=int(cfg.batch_size),
        width=int(cfg.width),
        hidden=int(cfg.hidden),
    )
    meta = {
        "dataset": "digits",
        "image_size": size,
        "val_accuracy": acc,
        "n_train": len(x),
        "n_val": len(xv),
        "epochs": int(cfg.epochs),
        "seed": int(cfg.seed),
    }
    path = save_classifier(model, Path(str(cfg.output)), meta)
    print(f"saved the digits{size} feature classifier to {path} (val accuracy {acc:.4f})")
    return {"path": str(path), "val_accuracy": acc}


@hydra.main(config_path=CONF_DIR, config_name="train_features", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with refusing_bad_input():
        train_features(cfg)


def run() -> None:
    """Console script ``diffexp-train-features``: ``main`` with the command line's exit codes."""
    run_cli(main)


if __name__ == "__main__":
    run()
