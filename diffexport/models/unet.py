"""CorrDiff regression wrapper (PhysicsNeMo 2.2 ``UNet``): a diffusion backbone used as a
deterministic network, fed the (zero) latent concatenated with the conditioning image, at noise
level zero and without class labels."""

from __future__ import annotations

from typing import Any, List, Tuple, Union

import torch
from torch import Tensor

from .base import Module

__all__ = ["UNet"]

WRAPPED_CLASSES = ("SongUNetPosEmbd", "SongUNetPosLtEmbd", "SongUNet", "DhariwalUNet")


class UNet(Module):
    """``model_type`` backbone (kept as ``self.model``, so keys start with ``model.``) built with
    ``in_channels = img_in_channels + img_out_channels``, ``out_channels = img_out_channels`` and
    ``**model_kwargs``.

    ``forward(x, img_lr, force_fp32=False, **model_kwargs)`` returns
    ``model(cat(x, img_lr), 0, None, **model_kwargs)`` in float32; the backbone runs in float16
    when ``use_fp16`` is set, on CUDA and not ``force_fp32``. ``use_fp16`` casts the parameters.
    """

    __model_checkpoint_version__ = "0.2.0"  # PhysicsNeMo 2.2's UNet checkpoint version

    def __init__(
        self,
        img_resolution: Union[int, Tuple[int, int], List[int]],
        img_in_channels: int,
        img_out_channels: int,
        use_fp16: bool = False,
        model_type: str = "SongUNetPosEmbd",
        **model_kwargs: Any,
    ):
        if model_type not in WRAPPED_CLASSES:
            raise ValueError(f"model_type must be one of {', '.join(WRAPPED_CLASSES)}; got {model_type!r}")
        super().__init__()
        from . import get_model_class  # the registry imports this module lazily

        if isinstance(img_resolution, int):
            self.img_shape_y = self.img_shape_x = img_resolution
        else:
            self.img_shape_y, self.img_shape_x = img_resolution
        self.img_in_channels, self.img_out_channels, self.model_type = img_in_channels, img_out_channels, model_type
        self.model = get_model_class(model_type)(
            img_resolution=img_resolution,
            in_channels=img_in_channels + img_out_channels,
            out_channels=img_out_channels,
            **model_kwargs,
        )
        self.use_fp16 = use_fp16

    @property
    def use_fp16(self) -> bool:
        return self._use_fp16

    @use_fp16.setter
    def use_fp16(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"use_fp16 must be a bool; got {type(value).__name__}")
        self._use_fp16 = value
        self.to(torch.float16 if value else torch.float32)

    @property
    def amp_mode(self) -> bool:
        return getattr(self.model, "amp_mode", False)

    @amp_mode.setter
    def amp_mode(self, value: bool) -> None:
        self.model.amp_mode = value

    @property
    def profile_mode(self) -> bool:
        return getattr(self.model, "profile_mode", False)

    @profile_mode.setter
    def profile_mode(self, value: bool) -> None:
        self.model.profile_mode = value

    def forward(self, x: Tensor, img_lr: Tensor | None, force_fp32: bool = False, **model_kwargs: Any) -> Tensor:
        if img_lr is not None:
            x = torch.cat([x, img_lr], dim=1)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32
        out = self.model(x.to(dtype), torch.zeros(x.shape[0], dtype=dtype, device=x.device), None, **model_kwargs)
        return out.to(torch.float32)

    def round_sigma(self, sigma: float | List[float] | Tensor) -> Tensor:
        return torch.as_tensor(sigma)
