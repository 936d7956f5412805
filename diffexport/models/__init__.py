"""Reference UNets, API- and checkpoint-compatible with PhysicsNeMo 2.2 ``diffusion_unets``.

Classes are resolved by name (``get_model_class``) so recipes and checkpoints can name them.
"""

from __future__ import annotations

import importlib

import torch

# class name -> submodule of diffexport.models that defines it
_REGISTRY: dict[str, str] = {
    "SongUNet": "song_unet",
    "SongUNetPosEmbd": "song_unet",
    "SongUNetPosLtEmbd": "song_unet",
    "DhariwalUNet": "dhariwal_unet",
    "UNet": "unet",
    "DiffusionModel": "diffusion",
}

__all__ = [*_REGISTRY, "get_model_class", "model_names"]


def model_names() -> list[str]:
    """Names of every model class that recipes and checkpoints may use."""
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[torch.nn.Module]:
    """The ``diffexport.models`` class called ``name``; ``ValueError`` listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model class {name!r}; known: {', '.join(model_names())}")
    return getattr(importlib.import_module(f"{__name__}.{_REGISTRY[name]}"), name)


def __getattr__(name: str):  # PEP 562: ``from diffexport.models import SongUNet``
    if name in _REGISTRY:
        return get_model_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
