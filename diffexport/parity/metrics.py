"""Error measures between an engine's output and the torch reference, in D space and in F space."""

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


def prediction(denoised: torch.Tensor, x: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
    """The network's prediction ``F = (D - c_skip x) / c_out`` (float64) from a denoiser output ``D``.

    At small σ, ``c_skip ≈ 1`` and ``D ≈ x``: D's error hides F's, which this recovers. ``c_skip``
    and ``c_out`` broadcast against ``x`` (shape [B, 1, ..., 1]).
    """
    d, x = denoised.detach().double().cpu(), x.detach().double().cpu()
    return (d - c_skip.double().cpu() * x) / c_out.double().cpu()


def call_errors(reference: torch.Tensor, output: torch.Tensor, x: torch.Tensor, c_skip: torch.Tensor,
                c_out: torch.Tensor) -> dict[str, float]:
    """``{"max_abs", "rel_l2", "f_max_abs", "f_rel_l2"}``: :func:`errors` of D, then of F (:func:`prediction`)."""
    d = errors(reference, output)
    f = errors(prediction(reference, x, c_skip, c_out), prediction(output, x, c_skip, c_out))
    return {**d, "f_max_abs": f["max_abs"], "f_rel_l2": f["rel_l2"]}
