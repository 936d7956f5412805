"""Seeded random engine inputs, for parity checks and benchmarks."""

from __future__ import annotations

import torch

from diffexport.engines.base import Engine
from diffexport.export import random_global_index
from diffexport.recipes import TensorSpec


def condition_specs(engine: Engine) -> list[TensorSpec]:
    """The inputs a caller gives besides ``x`` and ``sigma`` (``global_index`` comes from the patching)."""
    return [s for s in engine.io.inputs[2:] if s.kind != "global_index"]


def global_index_spec(engine: Engine) -> TensorSpec | None:
    """The engine's ``global_index`` input, if it has one."""
    return next((s for s in engine.io.inputs if s.kind == "global_index"), None)


def random_conditions(engine: Engine, batch: int, generator: torch.Generator, index_high: int = 1,
                      image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Condition inputs: image and vector ``N(0, 1)``, index uniform in ``[0, index_high)``.
    ``image_hw`` overrides the size of image conditions (the full image under patching)."""
    out = {}
    for spec in condition_specs(engine):
        shape = [batch, *spec.shape[1:]]
        if spec.kind == "image" and image_hw is not None:
            shape[-2:] = image_hw
        if spec.kind == "index":
            out[spec.name] = torch.randint(0, max(index_high, 1), shape, generator=generator)
        else:
            out[spec.name] = torch.randn(shape, generator=generator)
    return out


def random_call(engine: Engine, sigma: float, batch: int, generator: torch.Generator, index_high: int = 1) -> dict[str, torch.Tensor]:
    """The inputs of one call at noise level ``sigma`` (CPU): ``x = x0 + σ n``, ``x0 ~ N(0, 0.5²)``;
    ``global_index`` a random window of its grid per sample."""
    shape = [batch, *engine.io.inputs[0].shape[1:]]
    x = 0.5 * torch.randn(shape, generator=generator) + sigma * torch.randn(shape, generator=generator)
    out = {"x": x, "sigma": torch.full((batch,), float(sigma)), **random_conditions(engine, batch, generator, index_high)}
    if (gi := global_index_spec(engine)) is not None:
        out[gi.name] = random_global_index(gi, batch, generator)
    return out


def index_high(engine: Engine) -> int:
    """Exclusive upper bound of index conditions (the reference denoiser's ``index_high``; else 1)."""
    return int(getattr(getattr(engine, "denoiser", None), "index_high", 1))
