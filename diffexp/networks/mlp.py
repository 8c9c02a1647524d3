"""An MLP for vector data, conditioned on scaled log-SNR (and optionally a class label)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LogSNREmbedding(nn.Module):
    """Fourier features of the scaled log-SNR, c = lambda / scale, followed by a small MLP."""

    def __init__(self, dim: int, scale: float = 10.0, n_frequencies: int = 16) -> None:
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("freqs", math.pi * torch.arange(1, n_frequencies + 1).float())
        self.proj = nn.Sequential(
            nn.Linear(2 * n_frequencies + 1, dim), nn.SiLU(), nn.Linear(dim, dim)
        )

    def forward(self, log_snr: Tensor) -> Tensor:
        """[sin(pi k c), cos(pi k c), c] -> MLP, with c = lambda / scale."""
        c = (log_snr / self.scale).to(self.freqs.dtype)[:, None]
        feats = torch.cat([torch.sin(self.freqs * c), torch.cos(self.freqs * c), c], dim=1)
        return self.proj(feats)


class _Block(nn.Module):
    """h + W2 silu(W1 silu(h) + E emb): a residual block with the embedding added inside."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.drop(self.act(self.fc1(self.act(h)) + self.emb(emb))))


class MLP(nn.Module):
    """Residual MLP on x_t in R^dim, conditioned on scaled log-SNR and an optional label.

    With ``num_classes`` > 0 a label embedding is added to the noise embedding; index
    ``num_classes`` is the null token that classifier-free guidance drops labels to (and what
    ``y=None`` means).
    """

    def __init__(
        self,
        dim: int,
        width: int = 256,
        depth: int = 3,
        log_snr_scale: float = 10.0,
        num_classes: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.num_classes = int(dim), int(num_classes)
        self.embed = LogSNREmbedding(width, scale=log_snr_scale)
        self.label_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.inp = nn.Linear(self.dim, width)
        self.blocks = nn.ModuleList(_Block(width, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, self.dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x_t: Tensor, log_snr: Tensor, y: Tensor | None = None) -> Tensor:
        """The network output (interpreted by the parameterization) for x_t at log_snr."""
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(
                f"MLP(dim={self.dim}) takes vectors of shape [batch, {self.dim}], got "
                f"{tuple(x_t.shape)}; set network.dim to the data's dimension "
                "(network=unet is for images)"
            )
        emb = self.embed(log_snr)
        if self.label_embed is not None:
            if y is None:  # unconditional: the null token
                y = torch.full((x_t.shape[0],), self.num_classes, device=x_t.device)
            emb = emb + self.label_embed(y)
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
