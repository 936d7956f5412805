"""Denoising score matching: ``L = E_{t, eps} [ w(t) |x0_hat(x_t, t) - x0|^2 ]``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from diffexport.diffusion.base import Condition, DiffusionModel, PredictorType, batch_view
from diffexport.diffusion.noise_schedulers import NoiseScheduler

ToX0 = Callable[[Tensor, Tensor, Tensor], Tensor]


class MSEDSMLoss:
    """MSE denoising score matching with the scheduler's ``sample_time``, ``add_noise``, ``loss_weight``.

    ``model(x_t, t, condition=..., **kw)`` predicts ``prediction_type``; a score or epsilon
    prediction is turned into x0 with ``score_to_x0_fn`` / ``epsilon_to_x0_fn`` (default: the
    scheduler's ``score_to_x0`` / ``epsilon_to_x0``). ``loss_weight(t)`` may be [B] or [B, C].
    """

    def __init__(self, model: DiffusionModel, noise_scheduler: NoiseScheduler, prediction_type: PredictorType = "x0",
                 score_to_x0_fn: ToX0 | None = None, epsilon_to_x0_fn: ToX0 | None = None,
                 reduction: Literal["none", "mean", "sum"] = "mean") -> None:
        if prediction_type not in ("x0", "score", "epsilon"):
            raise ValueError(f"prediction_type must be 'x0', 'score' or 'epsilon', got {prediction_type!r}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        default = {"score": "score_to_x0", "epsilon": "epsilon_to_x0"}.get(prediction_type)
        convert = {"score": score_to_x0_fn, "epsilon": epsilon_to_x0_fn}.get(prediction_type)
        if default is not None and convert is None:
            convert = getattr(noise_scheduler, default, None)
            if convert is None:
                raise ValueError(f"prediction_type={prediction_type!r} needs {default}_fn (the scheduler has none)")
        self.model, self.noise_scheduler = model, noise_scheduler
        self.prediction_type, self.reduction = prediction_type, reduction
        self.to_x0: ToX0 = convert or (lambda prediction, x_t, t: prediction)

    def __call__(self, x0: Tensor, condition: Condition = None, t: Tensor | None = None, **model_kwargs: Any) -> Tensor:
        """Loss for clean data ``x0`` [B, *]; ``t`` [B] overrides the sampled training times."""
        if t is None:
            t = self.noise_scheduler.sample_time(x0.shape[0], device=x0.device, dtype=x0.dtype)
        x_t = self.noise_scheduler.add_noise(x0, t)
        if condition is not None:
            model_kwargs["condition"] = condition
        x0_hat = self.to_x0(self.model(x_t, t, **model_kwargs), x_t, t)
        w = self.noise_scheduler.loss_weight(t).to(x0.dtype)
        w = batch_view(w, x0) if w.ndim == 1 else w.reshape(*w.shape, *([1] * (x0.ndim - w.ndim)))
        loss = w * (x0_hat - x0) ** 2
        return loss if self.reduction == "none" else getattr(torch, self.reduction)(loss)
