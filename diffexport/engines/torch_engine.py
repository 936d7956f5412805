"""Torch backend: the reference ``Denoiser`` rebuilt in eager PyTorch from ``manifest["recipe"]`` + ``weights.pt``.

Every other backend is compared with this one: same recipe, same weights, fp32, no export.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from diffexport.engines.base import EngineError, check_inputs
from diffexport.engines.manifest import MANIFEST, read_manifest
from diffexport.export import Denoiser, build_denoiser
from diffexport.recipes import IOSpec, Recipe, RecipeError, parse_recipe


def backbone(denoiser: Denoiser) -> nn.Module:
    """The recipe's model inside ``denoiser`` (whose ``state_dict`` is ``weights.pt``)."""
    return denoiser.preconditioner.model.model  # Denoiser -> preconditioner -> Backbone -> model


def reference_denoiser(recipe: Recipe, weights: str | Path) -> Denoiser:
    """``build_denoiser(recipe)`` with the model's weights replaced by ``weights`` (a state_dict file).

    The recipe's checkpoint is not read (``weights.pt`` holds what was exported from it).
    """
    model_spec = recipe.model.model_copy(update={"checkpoint": None})
    denoiser = build_denoiser(recipe.model_copy(update={"model": model_spec}))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        backbone(denoiser).load_state_dict(state, strict=True)
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise EngineError(f"{weights}: cannot load the model's weights: {str(e).splitlines()[0]}") from e
    return denoiser.eval()


def engine_recipe(engine_dir: str | Path) -> Recipe:
    """The recipe an engine was built from: ``manifest["recipe"]``, the resolved recipe its content
    key hashes (``recipe.yaml`` is a copy for people to read)."""
    manifest = read_manifest(engine_dir)
    source = f"{Path(engine_dir) / MANIFEST}: recipe"
    try:
        return parse_recipe(manifest.get("recipe"), source)
    except RecipeError as e:
        raise EngineError(str(e)) from None


class TorchEngine:
    """The eager reference for an engine directory; ``device`` defaults to CPU."""

    backend = "torch"

    def __init__(self, engine_dir: str | Path, io: IOSpec, device: str | torch.device | None = None):
        engine_dir = Path(engine_dir)
        self.io, self.device = io, torch.device(device if device is not None else "cpu")
        recipe = engine_recipe(engine_dir)
        self.denoiser = reference_denoiser(recipe, engine_dir / "weights.pt").to(self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        inputs = check_inputs(self.io, self.backend, {"x": x, "sigma": sigma, **conditions})
        return self.denoiser(*(t.to(self.device) for t in inputs))
