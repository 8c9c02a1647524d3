"""Plots of samples against data (scatter for 2-D and more, histograms for 1-D) and of the
implied weightings of objectives."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8, min_side: int = 32) -> Path:
    """Save images in [-1, 1] ([N, C, H, W]) as one PNG grid, atomically; returns the path.

    Images smaller than ``min_side`` pixels are enlarged by an integer factor (no smoothing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    scale = max(1, min_side // images.shape[-1])  # small images enlarged by pixel repetition
    images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(images, nrow=nrow, padding=scale)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    if array.shape[2] == 1:
        array = array[:, :, 0]
    tmp = path.with_suffix(".tmp.png")
    plt.imsave(tmp, array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=255)
    tmp.replace(path)
    return path


def plot_samples(samples: Tensor, reference: Tensor, path: str | Path, title: str = "") -> Path:
    """Save a PNG comparing model samples with reference data; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples, reference = samples.detach().float().cpu(), reference.detach().float().cpu()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    if samples.shape[1] == 1:
        lo = float(torch.minimum(samples.min(), reference.min()))
        hi = float(torch.maximum(samples.max(), reference.max()))
        for ax, data, name in ((axes[0], reference, "data"), (axes[1], samples, "samples")):
            ax.hist(data[:, 0].numpy(), bins=80, range=(lo, hi), density=True, color="C0")
            ax.set_title(name)
    else:
        for ax, data, name, c in (
            (axes[0], reference, "data", "C7"),
            (axes[1], samples, "samples", "C0"),
        ):
            ax.scatter(data[:, 0].numpy(), data[:, 1].numpy(), s=2, alpha=0.5, c=c, linewidths=0)
            ax.set_title(name)
            ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=100)


def plot_weightings(
    curves: list[tuple[str, Tensor, Tensor, Tensor | None]], path: str | Path, title: str = ""
) -> Path:
    """Overlay normalized w(lambda) (and p(lambda), dashed, where given) of several objectives.

    ``curves``: (label, lambda, w / max w, p or None) per objective; saved atomically as PNG.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (label, lam, w, p) in enumerate(curves):
        color = f"C{k % 10}"
        ax.plot(lam.cpu(), w.cpu(), color=color, label=label)
        if p is not None:
            ax.plot(lam.cpu(), (p / p.max()).cpu(), color=color, ls="--", lw=0.8, alpha=0.7)
    ax.set_xlabel("log-SNR lambda")
    ax.set_ylabel("w(lambda) / max w   (dashed: p(lambda) / max p)")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 2.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or "implied weighting of each objective (MATH.md section 9)", fontsize=9)
    return save_figure(fig, path, dpi=120)


def save_figure(fig: plt.Figure, path: Path, dpi: int = 100) -> Path:
    """Lay out, save as PNG atomically (a temporary file, then a rename) and close ``fig``."""
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
