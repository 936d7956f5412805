"""Layers of the EDM-family U-Nets ("Elucidating the Design Space of Diffusion-Based Generative
Models", NVlabs ``training/networks.py``), with PhysicsNeMo 2.2 parameter names and numerics.

Written for export: no branching on tensor values, resampling kernels are buffers, every shape
comes from the input, and the eval-mode GroupNorm is a single native ``group_norm``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .legacy import adopt_apex_group_norm, rename_attention_keys

__all__ = [
    "weight_init",
    "check_resolution",
    "activation",
    "drop_labels",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "Attention",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "elu": F.elu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name`` (case-insensitive); ``ValueError`` if unknown."""
    if name.lower() not in _ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name.lower()]


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """EDM weight initialisation: ``xavier_uniform|xavier_normal|kaiming_uniform|kaiming_normal``."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"init_mode must be xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal, got {mode!r}")


def drop_labels(labels: Tensor | None, p: float, training: bool) -> Tensor:
    """Zero whole label vectors with probability ``p`` in training (classifier-free guidance);
    ``ValueError`` when a model with ``label_dim > 0`` gets no labels."""
    if labels is None:
        raise ValueError("class_labels: the model has label_dim > 0 and needs labels of shape (B, label_dim), got None")
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def check_resolution(name: str, shape: Sequence[int], num_levels: int) -> None:
    """``ValueError`` unless every size in ``shape`` divides by ``2^(num_levels-1)`` (the decoder
    cannot re-join skips of odd size)."""
    mult = 2 ** (num_levels - 1)
    if any(s <= 0 or s % mult != 0 for s in shape):
        raise ValueError(
            f"{name}: spatial size {tuple(int(s) for s in shape)} must be a positive multiple of "
            f"2**(levels-1) = {mult} for a U-Net with {num_levels} levels"
        )


def check_unet_args(channel_mult: Sequence[int], **positive: int) -> None:
    """``ValueError`` naming the first U-Net size argument out of range: ``channel_mult`` must be a
    non-empty list of ints >= 1, each of ``positive`` (e.g. ``in_channels=3``) an int >= 1."""
    if not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult: must be a non-empty list of ints >= 1, got {list(channel_mult)}")
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")


def _like(t: Tensor | None, x: Tensor) -> Tensor | None:
    """``t`` in ``x``'s dtype (weights follow the activations, as PhysicsNeMo does without AMP)."""
    return None if t is None else t.to(x.dtype)


# ----------------------------------------------------------------------------
# Fully connected and convolutional layers.


class Linear(torch.nn.Module):
    """Fully connected layer ``y = x W^T + b`` with EDM initialisation."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _like(self.weight, x), _like(self.bias, x))


class Conv2d(torch.nn.Module):
    """2-D convolution with optional FIR up/down-sampling by 2 (``kernel=0``: resampling only).

    The separable filter ``f fᵀ / (Σf)²`` is a persistent buffer ``resample_filter`` of shape
    ``[1, 1, k, k]`` (as in PhysicsNeMo's state dict), expanded per channel at run time.
    ``fused_resample`` convolves before down-sampling / after up-sampling (NCSN++ aux path).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[int] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be True")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel
            else None
        )
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def _fir(self, x: Tensor, f: Tensor, channels: int, pad: int) -> Tensor:
        """Depthwise FIR filtering with stride 2: transposed (up) or strided (down)."""
        f = f.expand(channels, 1, *f.shape[2:])
        if self.up:
            return F.conv_transpose2d(x, f * 4, groups=channels, stride=2, padding=pad)
        return F.conv2d(x, f, groups=channels, stride=2, padding=pad)

    def forward(self, x: Tensor) -> Tensor:
        w, b, f = _like(self.weight, x), _like(self.bias, x), _like(self.resample_filter, x)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = self._fir(x, f, self.in_channels, max(f_pad - w_pad, 0))
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        if self.fused_resample and self.down and w is not None:
            x = self._fir(F.conv2d(x, w, padding=w_pad + f_pad), f, self.out_channels, 0)
            return x if b is None else x + b.reshape(1, -1, 1, 1)
        if f is not None:
            x = self._fir(x, f, self.in_channels, f_pad)
        return F.conv2d(x, w, b, padding=w_pad) if w is not None else x


# ----------------------------------------------------------------------------
# Normalisation and attention.


def num_groups_for(num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """PhysicsNeMo 2.x group count: at most ``num_groups``, at least ``min_channels_per_group``
    channels per group (rounded up); ``ValueError`` if that does not divide ``num_channels``."""
    groups = min(num_groups, -(-num_channels // min_channels_per_group))
    if num_channels % groups:
        raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible into {groups} groups")
    return groups


class GroupNorm(torch.nn.Module):
    """Group normalisation matching PhysicsNeMo: biased variance in training (``F.group_norm``),
    **unbiased** variance in eval mode, optionally followed by an activation ``act``.

    Eval mode stays one native ``group_norm`` op: with ``n = (C/G)·H·W`` and ``c = (n-1)/n``,
    ``(x-μ)/sqrt(var_unbiased+ε) = sqrt(c)·(x-μ)/sqrt(var_biased + ε·c)``, so the unbiased form is
    ``F.group_norm(x, G, weight·sqrt(c), bias, ε·c)`` exactly.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
        act: str | None = None,
    ):
        super().__init__()
        self.num_groups = num_groups_for(num_channels, num_groups, min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))
        self.act = act
        self.act_fn = activation(act) if act else None
        self.register_load_state_dict_pre_hook(_adopt_apex_weights)  # 1.x ``use_apex_gn=True`` checkpoints

    def forward(self, x: Tensor) -> Tensor:
        w, b = _like(self.weight, x), _like(self.bias, x)
        if self.training:
            x = F.group_norm(x, self.num_groups, w, b, self.eps)
        else:
            n = x.shape[1] // self.num_groups * x.shape[2] * x.shape[3]
            c = (n - 1) / n
            x = F.group_norm(x, self.num_groups, w * c**0.5, b, self.eps * c)
        return self.act_fn(x) if self.act_fn is not None else x


def _adopt_apex_weights(module: GroupNorm, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
    adopt_apex_group_norm(state_dict, prefix)


class Attention(torch.nn.Module):
    """Multi-head self-attention over pixels with a residual connection (``attn.{norm,qkv,proj}``).

    ``qkv`` channels are interleaved per channel as in EDM: head ``h``, channel ``c`` and
    q/k/v index ``j`` live at output channel ``(h·C/heads + c)·3 + j``.
    """

    def __init__(
        self,
        out_channels: int,
        num_heads: int,
        eps: float = 1e-5,
        init_attn: dict[str, Any] | None = None,
        init_zero: dict[str, Any] | None = None,
    ):
        super().__init__()
        if num_heads <= 0 or out_channels % num_heads:
            raise ValueError(f"Attention: num_heads={num_heads} must be positive and divide out_channels={out_channels}")
        self.num_heads = num_heads
        self.norm = GroupNorm(out_channels, eps=eps)
        self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn or {}))
        self.proj = Conv2d(out_channels, out_channels, kernel=1, **(init_zero or {}))

    def forward(self, x: Tensor) -> Tensor:
        C, H, W = x.shape[1:]
        q, k, v = self.qkv(self.norm(x)).reshape(-1, C // self.num_heads, 3, H * W).unbind(2)  # [B·heads, c, HW]
        w = torch.softmax(q.transpose(1, 2) @ (k / math.sqrt(k.shape[1])), dim=2)  # [B·heads, HWq, HWk]
        a = v @ w.transpose(1, 2)  # [B·heads, c, HWq]
        return self.proj(a.reshape(x.shape)) + x


class UNetBlock(torch.nn.Module):
    """U-Net residual block of DDPM++ / NCSN++ / ADM with optional up/down-sampling and attention.

    ``adaptive_scale`` (ADM) modulates ``norm1`` by ``(1 + scale, shift)`` from the embedding;
    otherwise (DDPM++) the embedding is added before ``norm1``. Legacy checkpoints that store the
    attention layers on the block itself (``norm2``, ``qkv``, ``proj``) load through a pre-hook.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[int] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict[str, Any] | None = None,
        init_zero: dict[str, Any] | None = None,
        init_attn: dict[str, Any] | None = None,
        act: str = "silu",
    ):
        if attention and num_heads is None and out_channels < channels_per_head:
            raise ValueError(f"attn_resolutions: attention on {out_channels} channels has no head of {channels_per_head} "
                             "channels (ADM's width); widen model_channels / channel_mult there or drop that resolution")
        super().__init__()
        init = init or {}
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.num_heads = (num_heads or out_channels // channels_per_head) if attention else 0

        self.norm0 = GroupNorm(in_channels, eps=eps, act=act)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps, act=None if adaptive_scale else act)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        self.attn = (
            Attention(out_channels, self.num_heads, eps=eps, init_attn=init_attn or init, init_zero=init_zero)
            if attention
            else None
        )
        self.register_load_state_dict_pre_hook(_rename_legacy_attention)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(self.norm0(x))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = self.norm1(x + params)
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.attn is not None:
            x = self.attn(x) * self.skip_scale
        return x


def _rename_legacy_attention(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
    rename_attention_keys(state_dict, prefix)


# ----------------------------------------------------------------------------
# Noise-level embeddings.


class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding of the noise level: ``[cos(σ·ω), sin(σ·ω)]`` with
    ``ω_i = max_positions^(-i / (N/2 - endpoint))``. ``freqs`` is a persistent buffer (as in
    PhysicsNeMo 2.x); checkpoints without it (1.x, EDM) get it filled in on load."""

    #: buffers computed from the constructor's arguments alone (a checkpoint may lack them)
    derived_buffers = ("freqs",)

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint
        half = num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32) / (half - (1 if endpoint else 0))
        self.register_buffer("freqs", (1 / max_positions) ** freqs)
        self.register_load_state_dict_pre_hook(_fill_missing_freqs)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, self.freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _fill_missing_freqs(module: PositionalEmbedding, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
    state_dict.setdefault(prefix + "freqs", module.freqs.detach().clone())


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of the noise level (NCSN++): ``[cos(2π σ f), sin(2π σ f)]``,
    ``f ~ N(0, scale²)`` a persistent buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
