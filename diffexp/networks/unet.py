"""A DDPM/VDM-style UNet for images, conditioned on scaled log-SNR (and optionally a label)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffexp.networks.mlp import LogSNREmbedding


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))) * (1 + scale) + shift)), scale/shift from emb."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """The block's output for features x [B, in, H, W] and embedding emb [B, emb_dim]."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """x + proj(multi-head self-attention over the H*W positions of norm(x))."""

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention of x [B, C, H, W] with itself, added back to x."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each [B, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """A stride-2 3x3 convolution: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x at half the resolution."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling then a 3x3 convolution: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x at twice the resolution."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """A residual block optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """attn(res(x, emb))."""
        return self.attn(self.res(x, emb))


def _check_config(
    image_size: int,
    base_channels: int,
    channel_mults: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    num_groups: int,
    num_heads: int,
) -> list[int]:
    """The resolutions the UNet's levels run at, after checking the configuration is buildable."""
    n_levels = len(channel_mults)
    if n_levels < 1:
        raise ValueError("UNet needs at least one entry in channel_mults, e.g. (1, 2, 2)")
    if num_res_blocks < 1:
        raise ValueError(f"UNet needs num_res_blocks >= 1, got {num_res_blocks}")
    factor = 2 ** (n_levels - 1)
    if image_size < 1 or image_size % factor != 0:
        max_levels = 1
        while image_size > 0 and image_size % (2**max_levels) == 0:
            max_levels += 1
        raise ValueError(
            f"UNet with channel_mults={tuple(channel_mults)} ({n_levels} levels) halves the image "
            f"{n_levels - 1} times, so image_size must be a multiple of {factor} "
            f"(e.g. {factor * 2}, {factor * 4}, {factor * 8}); got image_size={image_size}. "
            f"Fix: use channel_mults with at most {max_levels} entries for {image_size}x"
            f"{image_size} images, or resize the data to a multiple of {factor}."
        )
    resolutions = [image_size // 2**i for i in range(n_levels)]
    bad = [r for r in attention_resolutions if r not in resolutions]
    if bad:
        raise ValueError(
            f"UNet attention_resolutions={list(attention_resolutions)} contains {bad}, which "
            f"never occurs: with image_size={image_size} and channel_mults="
            f"{tuple(channel_mults)} the feature maps are {resolutions} pixels wide. Choose "
            f"attention resolutions from {resolutions} (or [] for attention only in the middle)."
        )
    widths = [base_channels] + [base_channels * m for m in channel_mults]
    if any(m < 1 for m in channel_mults) or any(w % num_groups != 0 for w in widths):
        raise ValueError(
            f"UNet channel widths base_channels*mult = {widths} (base_channels={base_channels}, "
            f"channel_mults={tuple(channel_mults)}) must all be positive multiples of "
            f"num_groups={num_groups}; change base_channels or num_groups."
        )
    attn_widths = [
        base_channels * channel_mults[resolutions.index(r)] for r in attention_resolutions
    ]
    attn_widths.append(base_channels * channel_mults[-1])  # the middle block
    if num_heads < 1 or any(w % num_heads != 0 for w in attn_widths):
        raise ValueError(
            f"UNet num_heads={num_heads} must divide the channel widths {sorted(set(attn_widths))} "
            "of the attention blocks."
        )
    return resolutions


class UNet(nn.Module):
    """UNet on images x_t [B, C, H, W], conditioned on scaled log-SNR and an optional label.

    Residual blocks (GroupNorm + SiLU) get the noise (+ label) embedding as a scale-shift;
    self-attention runs at ``attention_resolutions`` (in pixels) and in the middle block. With
    ``num_classes`` > 0, index ``num_classes`` is the null token used by classifier-free guidance,
    and ``y=None`` means the null token. The output conv is zero-initialised.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_classes: int = 0,
        log_snr_scale: float = 10.0,
        num_groups: int = 8,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        if in_channels is None or image_size is None:
            raise ValueError(
                "UNet needs in_channels and image_size; set network.in_channels and "
                "network.image_size, or leave them null for the factory to take from the data"
            )
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.num_classes = int(num_classes)
        channel_mults = [int(m) for m in channel_mults]
        attention_resolutions = [int(r) for r in attention_resolutions]
        resolutions = _check_config(
            self.image_size,
            base_channels,
            channel_mults,
            num_res_blocks,
            attention_resolutions,
            num_groups,
            num_heads,
        )

        emb_dim = 4 * base_channels
        self.embed = LogSNREmbedding(emb_dim, scale=log_snr_scale)
        self.label_embed = (
            nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes > 0 else None
        )

        def level(in_ch: int, out_ch: int, res: int) -> Level:
            attn = (
                AttentionBlock(out_ch, num_heads, num_groups)
                if res in attention_resolutions
                else None
            )
            return Level(ResBlock(in_ch, out_ch, emb_dim, dropout, num_groups), attn)

        self.inp = nn.Conv2d(self.in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, ch = [base_channels], base_channels
        for i, (mult, res) in enumerate(zip(channel_mults, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                self.down.append(level(ch, base_channels * mult, res))
                ch = base_channels * mult
                skip_chs.append(ch)
            if i < len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, dropout, num_groups)
        self.mid_attn = AttentionBlock(ch, num_heads, num_groups)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout, num_groups)

        self.up = nn.ModuleList()
        for i in reversed(range(len(channel_mults))):
            out_ch = base_channels * channel_mults[i]
            for _ in range(num_res_blocks + 1):
                self.up.append(level(ch + skip_chs.pop(), out_ch, resolutions[i]))
                ch = out_ch
            if i > 0:
                self.up.append(Upsample(ch))

        self.out_norm = nn.GroupNorm(num_groups, ch)
        self.out = nn.Conv2d(ch, self.in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: Tensor, log_snr: Tensor, y: Tensor | None = None) -> Tensor:
        """The network output (interpreted by the parameterization) for x_t at log_snr."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != expected:
            raise ValueError(
                f"UNet(in_channels={self.in_channels}, image_size={self.image_size}) takes images "
                f"of shape [batch, {', '.join(map(str, expected))}], got {tuple(x_t.shape)}; set "
                "network.in_channels and network.image_size to the data's (network=mlp is for "
                "vectors)"
            )
        emb = self.embed(log_snr)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((x_t.shape[0],), self.num_classes, device=x_t.device)
            emb = emb + self.label_embed(y.long())

        h = self.inp(x_t)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))
