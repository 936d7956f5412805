"""Seeded random engine inputs, for parity checks and benchmarks."""

from __future__ import annotations

import torch

from diffexport.engines.base import Engine


def random_conditions(engine: Engine, batch: int, generator: torch.Generator, index_high: int = 1,
                      image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Condition inputs: image and vector ``N(0, 1)``, index uniform in ``[0, index_high)``.
    ``image_hw`` overrides the size of image conditions (the full image under patching)."""
    out = {}
    for spec in engine.io.inputs[2:]:
        shape = [batch, *spec.shape[1:]]
        if spec.kind == "image" and image_hw is not None:
            shape[-2:] = image_hw
        if spec.kind == "index":
            out[spec.name] = torch.randint(0, max(index_high, 1), shape, generator=generator)
        else:
            out[spec.name] = torch.randn(shape, generator=generator)
    return out


def random_call(engine: Engine, sigma: float, batch: int, generator: torch.Generator, index_high: int = 1) -> dict[str, torch.Tensor]:
    """The inputs of one call at noise level ``sigma`` (CPU): ``x = x0 + σ n``, ``x0 ~ N(0, 0.5²)``."""
    shape = [batch, *engine.io.inputs[0].shape[1:]]
    x = 0.5 * torch.randn(shape, generator=generator) + sigma * torch.randn(shape, generator=generator)
    return {"x": x, "sigma": torch.full((batch,), float(sigma)), **random_conditions(engine, batch, generator, index_high)}


def index_high(engine: Engine) -> int:
    """Exclusive upper bound of index conditions (the reference denoiser's ``index_high``; else 1)."""
    return int(getattr(getattr(engine, "denoiser", None), "index_high", 1))
