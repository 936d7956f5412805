"""Error measures between an engine's output and the torch reference."""

from __future__ import annotations

import torch


def errors(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """``{"max_abs", "rel_l2"}`` of ``output`` against ``reference`` (computed in float64).

    ``rel_l2 = ||output - reference|| / ||reference||`` (the denominator floored at 1e-30); a
    non-finite ``output`` gives ``inf`` for both, so it can never pass a tolerance.
    """
    ref, out = reference.detach().double().cpu(), output.detach().double().cpu()
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {list(ref.shape)}, output {list(out.shape)}")
    if not torch.isfinite(out).all():
        return {"max_abs": float("inf"), "rel_l2": float("inf")}
    diff = out - ref
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    return {"max_abs": max_abs, "rel_l2": (diff.norm() / ref.norm().clamp_min(1e-30)).item()}
