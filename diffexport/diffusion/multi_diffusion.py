"""Patch-based (multi-diffusion) sampling: grid patching of 2D fields and a patch-wise predictor."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffexport.diffusion.base import Condition, is_tensordict

if TYPE_CHECKING:
    from tensordict import TensorDict


class GridPatching2D(nn.Module):
    """Tile (H, W) images with a regular grid of (H_p, W_p) patches (PhysicsNeMo layout).

    Patch stride is ``patch - overlap_pix - boundary_pix``; the image is reflect-padded by
    ``boundary_pix`` on the top/left and as needed on the bottom/right so the grid covers it.
    :meth:`apply` returns [P * B, C, H_p, W_p] with ``out[p * B + b]`` patch p of sample b, patches
    ordered column-major over the grid (x outer, y inner); :meth:`fuse` inverts it, averaging
    overlaps.
    """

    def __init__(self, img_shape: tuple[int, int], patch_shape: tuple[int, int], overlap_pix: int = 0,
                 boundary_pix: int = 0) -> None:
        super().__init__()
        if len(img_shape) != 2 or len(patch_shape) != 2:
            raise ValueError(f"img_shape and patch_shape must be (H, W), got {img_shape} and {patch_shape}")
        if overlap_pix < 0 or boundary_pix < 0:
            raise ValueError(f"overlap_pix and boundary_pix must be >= 0, got {overlap_pix} and {boundary_pix}")
        self.img_shape = tuple(int(i) for i in img_shape)
        self.patch_shape = tuple(min(int(p), i) for p, i in zip(patch_shape, self.img_shape))
        self.overlap_pix, self.boundary_pix = overlap_pix, boundary_pix
        for p in self.patch_shape:
            if p <= overlap_pix + 2 * boundary_pix:
                raise ValueError(f"patch_shape {self.patch_shape} must exceed overlap_pix + 2 * boundary_pix "
                                 f"= {overlap_pix + 2 * boundary_pix}")
        self.stride = tuple(p - overlap_pix - boundary_pix for p in self.patch_shape)
        self.grid = tuple(math.ceil(i / s) for i, s in zip(self.img_shape, self.stride))  # (n_y, n_x)
        self.padded_shape = tuple(s * (n - 1) + p + boundary_pix
                                  for s, n, p in zip(self.stride, self.grid, self.patch_shape))
        (H, W), (Hp, Wp) = self.img_shape, self.padded_shape
        self.pad = (boundary_pix, Wp - W - boundary_pix, boundary_pix, Hp - H - boundary_pix)  # F.pad order
        ones = torch.ones(1, 1, *self.padded_shape)
        count = self._fold(F.unfold(ones, self.patch_shape, stride=self.stride))
        self.register_buffer("overlap_count", count, persistent=False)

    @property
    def patch_num(self) -> int:
        return self.grid[0] * self.grid[1]

    def _fold(self, cols: Tensor) -> Tensor:
        """Sum [B, C * H_p * W_p, P] patch columns into the padded image, cropped to (H, W)."""
        full = F.fold(cols, self.padded_shape, self.patch_shape, stride=self.stride)
        left, _, top, _ = self.pad
        return full[..., top : top + self.img_shape[0], left : left + self.img_shape[1]]

    def apply(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [P * B, C, H_p, W_p]."""
        if tuple(x.shape[-2:]) != self.img_shape or x.ndim != 4:
            raise ValueError(f"x must be [B, C, {self.img_shape[0]}, {self.img_shape[1]}], got {tuple(x.shape)}")
        B, C = x.shape[:2]
        (ny, nx), (ph, pw) = self.grid, self.patch_shape
        cols = F.unfold(F.pad(x, self.pad, mode="reflect"), self.patch_shape, stride=self.stride)
        return cols.reshape(B, C, ph, pw, ny, nx).permute(5, 4, 0, 1, 2, 3).reshape(nx * ny * B, C, ph, pw)

    forward = apply

    def fuse(self, patches: Tensor, batch_size: int) -> Tensor:
        """[P * B, C, H_p, W_p] -> [B, C, H, W], overlapping pixels averaged."""
        (ny, nx), (ph, pw) = self.grid, self.patch_shape
        if patches.shape[0] != self.patch_num * batch_size:
            raise ValueError(f"patches has {patches.shape[0]} rows, expected patch_num * batch_size "
                             f"= {self.patch_num * batch_size}")
        B, C = batch_size, patches.shape[1]
        cols = patches.reshape(nx, ny, B, C, ph, pw).permute(2, 3, 4, 5, 1, 0).reshape(B, C * ph * pw, ny * nx)
        full = self._fold(cols)
        return full / self.overlap_count.to(full.device, full.dtype)

    def global_index(self, batch_size: int = 1, device: torch.device | str | None = None) -> Tensor:
        """int64 [P, 2, H_p, W_p]: global (y, x) pixel coordinates of every patch pixel, the
        ``global_index`` that positional-embedding UNets (SongUNetPosEmbd) take. The same for every
        sample, so ``batch_size`` is unused (kept for PhysicsNeMo compatibility)."""
        ys, xs = (torch.arange(n, dtype=torch.float64, device=device) for n in self.img_shape)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None]
        return self.apply(grid).round().long()


class PatchBasedPredictor:
    """Run a predictor patch-wise and fuse: ``fuse(predictor(apply(x), t repeated P times, **kw))``.

    ``predictor(x_patches, t_patches, **kw)``: any predictor or DiffusionModel-like callable (a
    preconditioner, an engine wrapped by ``edm_x0_predictor``). ``kw`` carries the bound
    ``model_kwargs``, the ``condition`` (image-shaped entries patched like x, others repeated per
    patch) and, with ``pass_global_index=True``, ``global_index`` [P·B, 2, h, w]: each row's own
    patch coordinates (so a positional UNet sees P·B patches, one per row, for any batch B).
    """

    def __init__(self, predictor: Any, patching: GridPatching2D, condition: Condition = None,
                 pass_global_index: bool = False, **model_kwargs: Any) -> None:
        self.predictor, self.patching, self.condition = predictor, patching, condition
        self.pass_global_index, self.model_kwargs = pass_global_index, model_kwargs

    def patch_condition(self, condition: Tensor | TensorDict) -> Tensor | TensorDict:
        """Patch image-shaped tensors like x; repeat the others P times along the batch."""
        if is_tensordict(condition):  # so tensordict is imported already
            from tensordict import TensorDict

            patched = {k: self.patch_condition(v) for k, v in condition.items()}
            return TensorDict(patched, batch_size=[self.patching.patch_num * condition.batch_size[0]])
        if condition.ndim == 4 and tuple(condition.shape[-2:]) == self.patching.img_shape:
            return self.patching.apply(condition)
        return condition.repeat(self.patching.patch_num, *([1] * (condition.ndim - 1)))

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        kwargs = dict(self.model_kwargs)
        if self.condition is not None:
            kwargs["condition"] = self.patch_condition(self.condition)
        if self.pass_global_index:  # one grid per row: apply() puts patch p of sample b at row p * B + b
            kwargs["global_index"] = self.patching.global_index(device=x.device).repeat_interleave(x.shape[0], dim=0)
        out = self.predictor(self.patching.apply(x), t.repeat(self.patching.patch_num), **kwargs)
        return self.patching.fuse(out, x.shape[0])
