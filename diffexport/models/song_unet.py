"""DDPM++ / NCSN++ U-Net (Song et al. 2021) as in EDM and PhysicsNeMo 2.2 ``SongUNet``, plus the
CorrDiff variants with global positional grids (``SongUNetPosEmbd``) and lead-time embeddings
(``SongUNetPosLtEmbd``). Same constructor arguments, state-dict keys and numerics as PhysicsNeMo.
"""

from __future__ import annotations

import math
from typing import Callable, List, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .base import Module
from .layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    activation,
    check_resolution,
    check_unet_args,
    drop_labels,
)

__all__ = ["SongUNet", "SongUNetPosEmbd", "SongUNetPosLtEmbd", "positional_grid", "GRID_TYPES"]

GRID_TYPES = ("learnable", "linear", "sinusoidal", "test")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _shape_yx(img_resolution: Union[int, List[int]]) -> tuple[int, int]:
    if isinstance(img_resolution, int):
        return img_resolution, img_resolution
    height, width = img_resolution
    return int(height), int(width)


class SongUNet(Module):
    """DDPM++ (``embedding_type="positional"``, ``encoder_type="standard"``) or NCSN++
    (``"fourier"``, ``"residual"``, ``decoder_type="skip"``, ``resample_filter=[1, 3, 3, 1]``) U-Net.

    ``forward(x, noise_labels, class_labels, augment_labels=None)`` maps ``x`` of shape
    ``(B, in_channels, H, W)`` to ``(B, out_channels, H, W)``; ``H`` and ``W`` must be multiples
    of ``2^(len(channel_mult)-1)``. ``class_labels`` may be ``None`` when ``label_dim == 0``.

    ``act`` is the activation inside the U-Net blocks (``None`` is taken as ``"silu"`` and recorded
    so: PhysicsNeMo 2.x builds blocks without activation from ``act=None``). ``checkpoint_level``
    recomputes large-resolution blocks in the backward pass (training only). ``profile_mode`` and
    ``amp_mode`` are accepted for compatibility and do nothing here: weights always follow the
    input dtype, which also works under ``torch.autocast``. ``use_apex_gn=True`` is refused
    (NVIDIA apex is not available).
    """

    _global_grid: bool = False  # True where img_resolution sizes a global grid, not the input

    def __init__(
        self,
        img_resolution: Union[int, List[int]],
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: List[int] = [1, 2, 2, 2],
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: List[int] = [16],
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: List[int] = [1, 1],
        checkpoint_level: int = 0,
        additive_pos_embed: bool = False,
        bottleneck_attention: bool = True,
        use_apex_gn: bool = False,
        act: str | None = "silu",
        profile_mode: bool = False,
        amp_mode: bool = False,
    ):
        check_unet_args(channel_mult, in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                        channel_mult_emb=channel_mult_emb, channel_mult_noise=channel_mult_noise)
        _check_choice("embedding_type", embedding_type, ("fourier", "positional", "zero"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        if use_apex_gn:
            raise ValueError("use_apex_gn=True needs NVIDIA apex GroupNorm, which is not available; use use_apex_gn=False")
        act = act or "silu"
        activation(act)  # validates the name
        super().__init__()
        self._init_args["act"] = act  # what save_model writes to args.json
        self.img_resolution = img_resolution
        self.img_shape_y, self.img_shape_x = _shape_yx(img_resolution)
        self._num_levels = len(channel_mult)
        if not self._global_grid:
            check_resolution("img_resolution", (self.img_shape_y, self.img_shape_x), self._num_levels)
        self.label_dropout, self.embedding_type = label_dropout, embedding_type
        self.additive_pos_embed, self.use_apex_gn, self.act = additive_pos_embed, use_apex_gn, act
        self.checkpoint_level, self.profile_mode, self.amp_mode = checkpoint_level, profile_mode, amp_mode
        self.checkpoint_threshold = (math.isqrt(self.img_shape_y * self.img_shape_x) >> checkpoint_level) + 1

        emb_channels = self.emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn, act=act,
        )  # fmt: skip

        if additive_pos_embed:  # StormCast: learned per-pixel embedding added after the first conv
            self.spatial_emb = torch.nn.Parameter(torch.empty(1, model_channels, self.img_shape_y, self.img_shape_x))
            torch.nn.init.trunc_normal_(self.spatial_emb, std=0.02)

        # Mapping.
        self.map_noise = self.map_label = self.map_augment = None
        if embedding_type != "zero":
            self.map_noise = (
                PositionalEmbedding(noise_channels, endpoint=True)
                if embedding_type == "positional"
                else FourierEmbedding(noise_channels)
            )
            self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
            self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
            self.map_layer0 = Linear(noise_channels, emb_channels, **init)
            self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = self.img_shape_y >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_shape_y >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=bottleneck_attention, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must be a 4-D tensor (B, C, H, W); got shape {tuple(x.shape)}")
        check_resolution("x", x.shape[-2:], self._num_levels)
        if self.additive_pos_embed and tuple(x.shape[-2:]) != (self.img_shape_y, self.img_shape_x):
            raise ValueError(
                f"additive_pos_embed=True needs x at img_resolution {(self.img_shape_y, self.img_shape_x)}; "
                f"got {tuple(x.shape[-2:])}"
            )

    def _embedding(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None
    ) -> Tensor:
        """Conditioning vector ``(B, emb_channels)`` from noise level, class and augment labels."""
        if self.map_noise is None:
            return torch.zeros(noise_labels.shape[0], self.emb_channels, device=x.device, dtype=x.dtype)
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)  # DDPM++ / NCSN++ order
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def _block(self, block: UNetBlock, x: Tensor, emb: Tensor, threshold: float) -> Tensor:
        """``block(x, emb)``, gradient-checkpointed in training when the resolution exceeds ``threshold``."""
        if self.training and torch.is_grad_enabled() and math.isqrt(x.shape[-2] * x.shape[-1]) > threshold:
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)

    def forward(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None = None
    ) -> Tensor:
        self._check_input(x)
        emb = self._embedding(x, noise_labels, class_labels, augment_labels)

        # Encoder.
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            elif "_conv" in name:
                x = block(x)
                if self.additive_pos_embed:
                    x = x + self.spatial_emb.to(x.dtype)
                skips.append(x)
            else:
                x = self._block(block, x, emb, self.checkpoint_threshold)
                skips.append(x)

        # Decoder.
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                t = self.checkpoint_threshold
                x = self._block(block, x, emb, t / 2 if "_up" in name else t if "_block" in name else math.inf)
        return aux


# ----------------------------------------------------------------------------
# CorrDiff variants: global positional grid and lead-time embeddings.


def positional_grid(gridtype: str, channels: int, height: int, width: int) -> Tensor | None:
    """The ``(channels, height, width)`` positional grid of PhysicsNeMo's ``SongUNetPosEmbd``.

    * ``learnable``: ``N(0, 1)`` values (a parameter of the model);
    * ``linear`` (2 channels): x and y coordinates on ``[-1, 1]``;
    * ``sinusoidal`` (multiple of 4): ``sin/cos`` of x and y on ``[0, 2π]`` at frequencies
      ``2^linspace(0, N/4, N/4)``, ordered ``[sin x, sin y, cos x, cos y]`` per frequency;
    * ``test`` (2 channels): integer row and column indices.

    ``None`` when ``channels == 0``.
    """
    _check_choice("gridtype", gridtype, GRID_TYPES)
    if channels == 0:
        return None
    if gridtype == "learnable":
        return torch.randn(channels, height, width)
    if gridtype in ("linear", "test") and channels != 2:
        raise ValueError(f"N_grid_channels must be 2 for gridtype {gridtype!r}; got {channels}")
    if gridtype == "sinusoidal" and channels % 4:
        raise ValueError(f"N_grid_channels must be a multiple of 4 for gridtype 'sinusoidal'; got {channels}")
    if gridtype == "test":
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        return torch.stack([rows, cols]).float()
    if gridtype == "linear":
        gx, gy = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
        return torch.from_numpy(np.stack([gx, gy])).float()
    gx, gy = np.meshgrid(np.linspace(0, 2 * np.pi, width), np.linspace(0, 2 * np.pi, height))
    bands = 2.0 ** np.linspace(0.0, channels // 4, num=channels // 4)
    return torch.from_numpy(np.stack([fn(g * f) for f in bands for fn in (np.sin, np.cos) for g in (gx, gy)])).float()


class SongUNetPosEmbd(SongUNet):
    """``SongUNet`` whose input is concatenated with a global positional grid (``gridtype``,
    ``N_grid_channels``), and with learned lead-time embeddings in ``lead_time_mode``.

    ``in_channels`` counts the image channels plus ``N_grid_channels`` (plus
    ``lead_time_channels``). ``img_resolution`` is the global grid; ``x`` may be a patch of it,
    located by ``global_index`` ``(P, 2, h, w)`` of (row, column) indices (see
    :meth:`positional_embedding_indexing`) or by ``embedding_selector`` (see
    :meth:`positional_embedding_selector`). Without either, ``x`` covers the whole grid.

    ``lead_time_mode`` and its arguments are accepted for PhysicsNeMo compatibility; use
    :class:`SongUNetPosLtEmbd` for a lead-time model.
    """

    _global_grid = True
    _lead_time_class = False

    def __init__(
        self,
        img_resolution: Union[int, List[int]],
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: List[int] = [1, 2, 2, 2, 2],
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: List[int] = [28],
        dropout: float = 0.13,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: List[int] = [1, 1],
        gridtype: str = "sinusoidal",
        N_grid_channels: int = 4,
        checkpoint_level: int = 0,
        additive_pos_embed: bool = False,
        bottleneck_attention: bool = True,
        use_apex_gn: bool = False,
        act: str | None = "silu",
        profile_mode: bool = False,
        amp_mode: bool = False,
        lead_time_mode: bool = False,
        lead_time_channels: int | None = None,
        lead_time_steps: int = 9,
        prob_channels: List[int] = [],
    ):
        if (lead_time_mode or lead_time_channels) and not self._lead_time_class:
            raise ValueError("lead_time_mode / lead_time_channels: use SongUNetPosLtEmbd for a lead-time model")
        if lead_time_mode and (lead_time_channels is None or lead_time_channels <= 0):
            raise ValueError(f"lead_time_channels must be >= 1 for a lead-time model; got {lead_time_channels}")
        grid = positional_grid(gridtype, N_grid_channels, *_shape_yx(img_resolution))
        super().__init__(
            img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels, channel_mult,
            channel_mult_emb, num_blocks, attn_resolutions, dropout, label_dropout, embedding_type,
            channel_mult_noise, encoder_type, decoder_type, resample_filter, checkpoint_level,
            additive_pos_embed, bottleneck_attention, use_apex_gn, act, profile_mode, amp_mode,
        )  # fmt: skip
        self.gridtype, self.N_grid_channels = gridtype, N_grid_channels
        if grid is None or gridtype == "learnable":
            self.pos_embd = None if grid is None else torch.nn.Parameter(grid)
        else:
            self.register_buffer("pos_embd", grid, persistent=False)
        self.lead_time_mode, self.lt_embd = lead_time_mode, None
        if lead_time_mode:
            self.lead_time_channels, self.lead_time_steps = lead_time_channels, lead_time_steps
            self.lt_embd = torch.nn.Parameter(
                torch.randn(lead_time_steps, lead_time_channels, self.img_shape_y, self.img_shape_x)
            )
            self.prob_channels = list(prob_channels)
            if self.prob_channels:
                self.scalar = torch.nn.Parameter(torch.ones(1, len(self.prob_channels), 1, 1))
        self.register_load_state_dict_pre_hook(_drop_fixed_grid)

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None,
        global_index: Tensor | None = None,
        embedding_selector: Callable[[Tensor], Tensor] | None = None,
        augment_labels: Tensor | None = None,
        lead_time_label: Tensor | None = None,
    ) -> Tensor:
        if embedding_selector is not None and global_index is not None:
            raise ValueError("pass either embedding_selector or global_index, not both")
        if self.pos_embd is not None or self.lt_embd is not None:
            if embedding_selector is not None:
                grid = self.positional_embedding_selector(x, embedding_selector, lead_time_label=lead_time_label)
            else:
                grid = self.positional_embedding_indexing(x, global_index, lead_time_label=lead_time_label)
            x = torch.cat([x, grid.to(x.dtype)], dim=1)
        out = super().forward(x, noise_labels, class_labels, augment_labels)
        if self.lead_time_mode and self.prob_channels:
            out = self._probabilities(out)
        return out

    def _embeddings(self, x: Tensor, lead_time_label: Tensor | None) -> list[Tensor]:
        """The positional grid ``(C_PE, H, W)`` and/or lead-time grids ``(B, C_LT, H, W)``."""
        grids = [] if self.pos_embd is None else [self.pos_embd.to(x.dtype)]
        if self.lt_embd is not None:
            if lead_time_label is None:
                raise ValueError("lead_time_label (B,) is required by a lead-time model")
            lt = self.lt_embd[lead_time_label.long()]  # labels (B,), (B, 1), or () for one sample, as PhysicsNeMo
            grids.append(lt.reshape(-1, *self.lt_embd.shape[1:]).to(x.dtype))
        if not grids:
            raise ValueError("the model has neither a positional grid (N_grid_channels=0) nor lead-time embeddings")
        return grids

    def positional_embedding_indexing(
        self, x: Tensor, global_index: Tensor | None = None, lead_time_label: Tensor | None = None
    ) -> Tensor:
        """Embeddings for each sample of ``x`` ``(P·B, C, h, w)``: the whole grid without
        ``global_index``; else the pixels ``global_index[p, 0]`` (rows), ``global_index[p, 1]``
        (columns) of patch ``p``, sample ``k`` of ``x`` taking patch ``k mod P``."""
        grids = self._embeddings(x, lead_time_label)
        pos = grids[0] if self.pos_embd is not None else None
        lt = grids[-1] if self.lt_embd is not None else None
        out = []
        if global_index is None:
            if pos is not None:
                out.append(pos[None].expand(x.shape[0], -1, -1, -1))
            if lt is not None:
                out.append(lt)
        else:
            P, _, h, w = global_index.shape
            B = x.shape[0] // P
            rows, cols = global_index.permute(1, 0, 2, 3).reshape(2, -1)
            if pos is not None:
                out.append(pos[:, rows, cols].reshape(-1, P, h, w).transpose(0, 1).repeat(B, 1, 1, 1))
            if lt is not None:
                out.append(lt[:, :, rows, cols].reshape(B, -1, P, h, w).transpose(1, 2).reshape(B * P, -1, h, w))
        return torch.cat(out, dim=1)

    def positional_embedding_selector(
        self, x: Tensor, embedding_selector: Callable[[Tensor], Tensor], lead_time_label: Tensor | None = None
    ) -> Tensor:
        """``embedding_selector`` applied to the positional grid ``(C_PE, H, W)`` and to the
        lead-time grids ``(B, C_LT, H, W)``; each result must be ``(P·B, C, h, w)``."""
        return torch.cat([embedding_selector(g) for g in self._embeddings(x, lead_time_label)], dim=1)

    def _probabilities(self, out: Tensor) -> Tensor:
        """Scale the ``prob_channels`` logits by ``scalar``; in eval mode, softmax over them."""
        channels = [c % out.shape[1] for c in self.prob_channels]
        p = torch.cat([out[:, c : c + 1] for c in channels], dim=1) * self.scalar.to(out.dtype)
        if not self.training:
            p = p.softmax(dim=1)
        slot = {c: j for j, c in enumerate(channels)}
        parts = [p[:, slot[c] : slot[c] + 1] if c in slot else out[:, c : c + 1] for c in range(out.shape[1])]
        return torch.cat(parts, dim=1)


def _drop_fixed_grid(module: SongUNetPosEmbd, state_dict: dict, prefix: str, *args, **kwargs) -> None:
    """PhysicsNeMo 1.x saved fixed positional grids; they are recomputed, so ignore them."""
    if "pos_embd" in module._non_persistent_buffers_set:
        state_dict.pop(prefix + "pos_embd", None)


class SongUNetPosLtEmbd(SongUNetPosEmbd):
    """``SongUNetPosEmbd`` with lead-time embeddings: ``lead_time_steps`` learned grids of
    ``lead_time_channels`` channels, one chosen per sample by ``lead_time_label`` (required at
    forward). Output channels ``prob_channels`` are logits scaled by ``scalar`` in training and
    their softmax (over those channels) in eval mode.
    """

    _lead_time_class = True

    def __init__(
        self,
        img_resolution: Union[int, List[int]],
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: List[int] = [1, 2, 2, 2, 2],
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: List[int] = [28],
        dropout: float = 0.13,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: List[int] = [1, 1],
        gridtype: str = "sinusoidal",
        N_grid_channels: int = 4,
        lead_time_channels: int | None = None,
        lead_time_steps: int = 9,
        prob_channels: List[int] = [],
        checkpoint_level: int = 0,
        additive_pos_embed: bool = False,
        bottleneck_attention: bool = True,
        use_apex_gn: bool = False,
        act: str | None = "silu",
        profile_mode: bool = False,
        amp_mode: bool = False,
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(**args, lead_time_mode=True)

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None,
        lead_time_label: Tensor | None = None,
        global_index: Tensor | None = None,
        embedding_selector: Callable[[Tensor], Tensor] | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        return super().forward(
            x, noise_labels, class_labels, global_index=global_index, embedding_selector=embedding_selector,
            augment_labels=augment_labels, lead_time_label=lead_time_label,
        )  # fmt: skip
