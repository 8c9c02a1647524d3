"""Classifiers of noisy inputs for classifier guidance: logits of p_phi(y | x_t, log-SNR).

Both networks take ``(x_t, log_snr) -> logits [B, num_classes]`` and are conditioned on the
scaled log-SNR through ``LogSNREmbedding``, added inside every block, so one classifier serves
every noise level. Activations are smooth (SiLU): guidance differentiates log_softmax w.r.t. x_t.
``auto_noisy_classifier`` picks one from the data's shape (``classifier=auto``); ``classifier_spec``
gives what a checkpoint stores to rebuild a classifier.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffexp.networks.mlp import LogSNREmbedding

__all__ = [
    "NoisyConvClassifier",
    "NoisyMLPClassifier",
    "auto_noisy_classifier",
    "log_snr_per_example",
]


def log_snr_per_example(log_snr: Tensor | float, x_t: Tensor) -> Tensor:
    """log_snr as a [B] tensor on x_t's device and dtype (a scalar is repeated for the batch)."""
    lam = torch.as_tensor(log_snr, dtype=x_t.dtype, device=x_t.device)
    n = x_t.shape[0]
    if lam.dim() == 0:
        return lam.expand(n)
    if lam.numel() != n:
        raise ValueError(
            f"log_snr must be a scalar or have one entry per example ({n}); "
            f"got shape {tuple(lam.shape)}"
        )
    return lam.reshape(n)


def classifier_spec(classifier: nn.Module) -> dict[str, Any]:
    """``{"_target_": <its class>, **its constructor arguments}``: every argument of the class's
    ``__init__`` is kept as an attribute of the same name (plain numbers)."""
    names = [n for n in inspect.signature(type(classifier).__init__).parameters if n != "self"]
    target = f"{type(classifier).__module__}.{type(classifier).__qualname__}"
    return {"_target_": target, **{n: getattr(classifier, n) for n in names}}


def _check_classes(num_classes: int) -> int:
    """num_classes as an int, at least 2."""
    if int(num_classes) < 2:
        raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
    return int(num_classes)


class _MLPBlock(nn.Module):
    """h + W2 silu(W1 silu(h) + E emb): a residual block with the log-SNR embedding inside."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """The block's output for features h [B, width] and embedding emb [B, width]."""
        return h + self.fc2(F.silu(self.fc1(F.silu(h)) + self.emb(emb)))


class NoisyMLPClassifier(nn.Module):
    """Residual SiLU MLP on x_t in R^dim, conditioned on scaled log-SNR: logits [B, classes]."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        width: int = 256,
        depth: int = 3,
        log_snr_scale: float = 10.0,
    ) -> None:
        super().__init__()
        self.dim, self.num_classes = int(dim), _check_classes(num_classes)
        self.width, self.depth, self.log_snr_scale = int(width), int(depth), float(log_snr_scale)
        self.embed = LogSNREmbedding(width, scale=log_snr_scale)
        self.inp = nn.Linear(self.dim, width)
        self.blocks = nn.ModuleList(_MLPBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, self.num_classes))

    def forward(self, x_t: Tensor, log_snr: Tensor) -> Tensor:
        """Unnormalized log p_phi(y | x_t) for every class, shape [B, num_classes]."""
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(
                f"NoisyMLPClassifier(dim={self.dim}) takes vectors of shape [batch, {self.dim}], "
                f"got {tuple(x_t.shape)}; for images use NoisyConvClassifier (classifier=conv)"
            )
        emb = self.embed(log_snr_per_example(log_snr, x_t))
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


def _groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: 8 when they divide evenly, else the largest that does."""
    return math.gcd(channels, 8)


class _ConvBlock(nn.Module):
    """skip(x) + conv(silu(norm(conv(silu(norm(x))) + E emb))): the embedding added per block."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """The block's output for features x [B, in, H, W] and embedding emb [B, emb_dim]."""
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class NoisyConvClassifier(nn.Module):
    """A small conv net for square images (8..32 px): one residual block per resolution, halved
    by stride-2 convolutions down to 4x4 or less, then GroupNorm, SiLU, mean pooling, linear.

    Channels are ``base_channels * min(2^level, 4)``; the log-SNR embedding (``4 *
    base_channels`` wide) is added inside every block.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        base_channels: int = 32,
        log_snr_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if int(image_size) < 4:
            raise ValueError(f"NoisyConvClassifier needs image_size >= 4, got {image_size}")
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.num_classes = _check_classes(num_classes)
        self.base_channels, self.log_snr_scale = int(base_channels), float(log_snr_scale)
        emb_dim = 4 * base_channels
        self.embed = LogSNREmbedding(emb_dim, scale=log_snr_scale)
        self.stem = nn.Conv2d(self.in_channels, base_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch, size, level = base_channels, self.image_size, 0
        while True:
            out_ch = base_channels * min(2**level, 4)
            self.blocks.append(_ConvBlock(ch, out_ch, emb_dim))
            ch = out_ch
            if size <= 4:
                break
            self.downs.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            size, level = (size + 1) // 2, level + 1
        self.head_norm = nn.GroupNorm(_groups(ch), ch)
        self.head = nn.Linear(ch, self.num_classes)

    def forward(self, x_t: Tensor, log_snr: Tensor) -> Tensor:
        """Unnormalized log p_phi(y | x_t) for every class, shape [B, num_classes]."""
        c, size = self.in_channels, self.image_size
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != (c, size, size):
            raise ValueError(
                f"NoisyConvClassifier takes images of shape [batch, {c}, {size}, {size}], got "
                f"{tuple(x_t.shape)}; for vectors use NoisyMLPClassifier (classifier=mlp)"
            )
        emb = self.embed(log_snr_per_example(log_snr, x_t))
        h = self.stem(x_t)
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = F.silu(self.head_norm(h)).mean(dim=(2, 3))
        return self.head(h)


def auto_noisy_classifier(
    shape: Sequence[int],
    num_classes: int,
    width: int = 256,
    depth: int = 3,
    base_channels: int = 32,
    log_snr_scale: float = 10.0,
) -> NoisyMLPClassifier | NoisyConvClassifier:
    """The classifier for data of ``shape``: ``NoisyMLPClassifier(width, depth)`` for vectors
    ``(d,)``, ``NoisyConvClassifier(base_channels)`` for square images ``(C, H, H)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return NoisyMLPClassifier(
            shape[0], num_classes, width=width, depth=depth, log_snr_scale=log_snr_scale
        )
    if len(shape) == 3 and shape[1] == shape[2]:
        return NoisyConvClassifier(
            shape[0],
            shape[1],
            num_classes,
            base_channels=base_channels,
            log_snr_scale=log_snr_scale,
        )
    raise ValueError(
        f"no noisy classifier takes data of shape {shape}: NoisyMLPClassifier takes vectors (d,), "
        "NoisyConvClassifier square images (C, H, H)"
    )
