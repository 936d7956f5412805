"""Seeded random engine inputs, for parity checks and benchmarks."""

from __future__ import annotations

import torch

from diffexport.engines.base import Engine
from diffexport.recipes import TensorSpec


def random_input(*args, **kwargs) -> torch.Tensor:
    """:func:`diffexport.export.denoiser.random_input`, imported on first use (running an engine
    never imports the exporter)."""
    from diffexport.export.denoiser import random_input as draw

    return draw(*args, **kwargs)


def condition_specs(engine: Engine) -> list[TensorSpec]:
    """The inputs a caller gives besides ``x`` and ``sigma`` (``global_index`` comes from the patching)."""
    return [s for s in engine.io.inputs[2:] if s.kind != "global_index"]


def global_index_spec(engine: Engine) -> TensorSpec | None:
    """The engine's ``global_index`` input, if it has one."""
    return next((s for s in engine.io.inputs if s.kind == "global_index"), None)


def random_conditions(engine: Engine, batch: int, generator: torch.Generator, index_high: int = 1,
                      image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Condition inputs (:func:`~diffexport.export.random_input`); ``image_hw`` overrides the size of
    image conditions (the full image under patching)."""
    return {s.name: random_input(s, batch, generator, index_high=index_high, image_hw=image_hw) for s in condition_specs(engine)}


def random_call(engine: Engine, sigma: float, batch: int, generator: torch.Generator, index_high: int = 1) -> dict[str, torch.Tensor]:
    """The inputs of one call at noise level ``sigma`` (CPU), ``global_index`` included."""
    sigmas = torch.full((batch,), float(sigma))
    out = {"x": random_input(engine.io.inputs[0], batch, generator, sigmas), "sigma": sigmas,
           **random_conditions(engine, batch, generator, index_high)}
    if (gi := global_index_spec(engine)) is not None:
        out[gi.name] = random_input(gi, batch, generator)
    return out


def index_high(engine: Engine) -> int:
    """Exclusive upper bound of index conditions (the reference denoiser's ``index_high``; else 1)."""
    return int(getattr(getattr(engine, "denoiser", None), "index_high", 1))
