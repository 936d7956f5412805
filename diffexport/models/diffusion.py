"""The seed model: a plain DDPM noise-prediction U-Net ``DiffusionModel(x, t) -> eps``.

Layout for ``hidden_dims=[32, 64, 128]`` and an ``S x S`` image::

    init_conv        C  -> 32                      S
    down_blocks[i]   ResBlock, 4x4/2 conv          S -> S/2 -> S/4 -> S/8   (skips at S, S/2, S/4)
    bottleneck       ResBlock, SelfAttention, ResBlock at S/8, 128 channels
    up_blocks[i]     4x4/2 transposed conv, concat skip, ResBlock   128 -> 64 -> 32 -> 32
    out_norm, SiLU, out_conv   32 -> C

Export-friendly: no Python branching on tensor values, shapes only read to reshape, so
``torch.export.export(..., strict=False)`` works with a dynamic batch dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffexport.models.base import Module

GROUPS = 8  # GroupNorm groups everywhere; channel counts must be divisible by it


class TimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of integer timesteps: ``[sin(t f), cos(t f)]``.

    Frequencies ``f_k = 10000^(-k / (dim/2))``, ``k = 0 .. dim/2 - 1``; a non-persistent buffer,
    so it is a constant in exported graphs and absent from checkpoints.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, + Linear(time embedding), GroupNorm, SiLU, 3x3 conv; residual
    through a 1x1 conv when the channel count changes."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(GROUPS, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(t_emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """GroupNorm then multi-head self-attention over the ``H*W`` positions; residual."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, 3C, H, W] -> 3 x [B, heads, HW, C/heads]
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class DownBlock(nn.Module):
    """ResBlock then a 4x4 stride-2 conv; returns ``(downsampled, skip)``."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, time_dim)
        self.down = nn.Conv2d(out_ch, out_ch, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.res(x, t_emb)
        return self.down(skip), skip


class UpBlock(nn.Module):
    """4x4 stride-2 transposed conv, concatenate the skip channel-wise, ResBlock."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, time_dim: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch, 4, stride=2, padding=1)
        self.res = ResBlock(in_ch + skip_ch, out_ch, time_dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self.res(torch.cat([self.up(x), skip], dim=1), t_emb)


class BottleneckBlock(nn.Module):
    """ResBlock, SelfAttention(num_heads=4), ResBlock at the lowest resolution."""

    def __init__(self, channels: int, time_dim: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, time_dim)
        self.attn = SelfAttention(channels, num_heads=4)
        self.res2 = ResBlock(channels, channels, time_dim)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, t_emb)), t_emb)


class DiffusionModel(Module):
    """DDPM noise-prediction U-Net: ``forward(x [B,C,H,W], t int64 [B]) -> eps [B,C,H,W]``.

    ``image_size`` (and any input's H, W) must be divisible by ``2**len(hidden_dims)``; every
    hidden dim by 8 (GroupNorm groups); ``time_dim`` even. As in DDPM, the time MLP is
    ``TimeEmbedding(time_dim), Linear(time_dim, 4*time_dim), SiLU, Linear(4*time_dim, time_dim)``.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        hidden_dims: Sequence[int] = (32, 64, 128),
        time_dim: int = 128,
    ):
        super().__init__()
        hidden_dims = list(hidden_dims)
        _validate(image_size, channels, hidden_dims, time_dim)
        self.image_size, self.channels, self.hidden_dims = image_size, channels, hidden_dims

        self.time_mlp = nn.Sequential(
            TimeEmbedding(time_dim),
            nn.Linear(time_dim, 4 * time_dim),
            nn.SiLU(),
            nn.Linear(4 * time_dim, time_dim),
        )
        self.init_conv = nn.Conv2d(channels, hidden_dims[0], 3, padding=1)
        ins = [hidden_dims[0], *hidden_dims[:-1]]  # input channels of each level
        self.down_blocks = nn.ModuleList(
            DownBlock(i, o, time_dim) for i, o in zip(ins, hidden_dims)
        )
        self.bottleneck = BottleneckBlock(hidden_dims[-1], time_dim)
        self.up_blocks = nn.ModuleList(
            UpBlock(o, o, i, time_dim) for i, o in zip(reversed(ins), reversed(hidden_dims))
        )
        self.out_norm = nn.GroupNorm(GROUPS, hidden_dims[0])
        self.out_conv = nn.Conv2d(hidden_dims[0], channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_emb = self.time_mlp(t)
        h = self.init_conv(x)
        skips = []
        for block in self.down_blocks:
            h, skip = block(h, t_emb)
            skips.append(skip)
        h = self.bottleneck(h, t_emb)
        for block in self.up_blocks:
            h = block(h, skips.pop(), t_emb)
        return self.out_conv(F.silu(self.out_norm(h)))


def _validate(image_size: int, channels: int, hidden_dims: list[int], time_dim: int) -> None:
    """``ValueError`` naming the first bad constructor argument."""
    if not hidden_dims:
        raise ValueError("hidden_dims must name at least one level")
    if any(d <= 0 or d % GROUPS for d in hidden_dims):
        raise ValueError(f"hidden_dims must be positive multiples of {GROUPS}, got {hidden_dims}")
    factor = 2 ** len(hidden_dims)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"image_size must be a positive multiple of 2**len(hidden_dims) = {factor}, "
            f"got {image_size}"
        )
    if channels <= 0:
        raise ValueError(f"channels must be positive, got {channels}")
    if time_dim <= 0 or time_dim % 2:
        raise ValueError(f"time_dim must be a positive even number, got {time_dim}")
