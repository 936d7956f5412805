"""Seeded random weights with no zero layer.

EDM-style inits zero (or nearly) the last convolutions, so an untrained model returns about
``c_skip·x`` and any parity check passes vacuously. ``randomize_`` redraws every floating-point
parameter and buffer-free weight from N(0, 1/fan_in) so every layer contributes.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter of ``model`` in place from N(0, 1/fan_in), seeded; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        fan_in = p[0].numel() if p.ndim > 1 else p.numel()
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) / math.sqrt(max(fan_in, 1)))
    return model
