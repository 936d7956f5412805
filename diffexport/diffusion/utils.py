"""Adapters: backbones -> :class:`~diffexport.diffusion.base.DiffusionModel`, EDM denoisers -> x0-predictors."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffexport.diffusion.base import Condition, EDMDenoiserFn, Predictor, batch_view, check_batch, is_tensordict
from diffexport.diffusion.noise_schedulers import LinearGaussianNoiseScheduler


def edm_x0_predictor(
    denoiser_fn: EDMDenoiserFn, noise_scheduler: LinearGaussianNoiseScheduler | None = None, *,
    denoiser_dtype: torch.dtype | None = None, **conditions: Any
) -> Predictor:
    """Turn an EDM denoiser ``D(x, sigma, **conditions)`` -- an exported engine, or a preconditioner
    -- into the x0-predictor ``(x_t, t) -> x0`` that ``noise_scheduler.get_denoiser`` consumes.

    ``D`` has EDM semantics: input ``x0 + sigma n`` (unscaled), ``sigma`` [B]. A linear-Gaussian
    schedule has ``x_t = alpha(t) x0 + sigma(t) eps``, so ``x_t / alpha(t) = x0 + edm_sigma(t) eps``
    and::

        x0_hat(x_t, t) = D(x_t / alpha(t), sigma(t) / alpha(t), **conditions)

    For EDM / VE / iDDPM (alpha = 1) this is ``D(x_t, sigma(t))``; for VE ``sigma(t) = sqrt(t)``.
    Without a scheduler ``t`` is passed through as sigma. ``conditions`` are bound keyword
    arguments; extra arguments given at call time are forwarded too (so the result also works as a
    DiffusionModel, e.g. in :class:`~diffexport.diffusion.losses.MSEDSMLoss`).

    ``denoiser_dtype`` (e.g. float32, an engine's I/O): ``D`` gets ``x`` and ``sigma`` cast to it and
    its output is cast back to x's dtype, so a float64 sampler state drives a float32 network as
    EDM's ``generate.py`` does (None: D sees x's dtype).
    """

    def x0_predictor(x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not torch.compiler.is_compiling():
            check_batch("t", t, x.shape[0], exact_1d=True)
        kwargs = {**conditions, **kwargs}
        if noise_scheduler is None:
            x_in, sigma = x, t
        else:
            x_in, sigma = x / batch_view(noise_scheduler.alpha(t), x).to(x.dtype), noise_scheduler.edm_sigma(t).to(x.dtype)
        if denoiser_dtype is None:
            return denoiser_fn(x_in, sigma, *args, **kwargs)
        return denoiser_fn(x_in.to(denoiser_dtype), sigma.to(denoiser_dtype), *args, **kwargs).to(x.dtype)

    return x0_predictor


class ConcatConditionWrapper(nn.Module):
    """Give a backbone ``forward(x, noise_labels[, class_labels], **kw)`` -- every
    ``diffexport.models`` UNet -- the DiffusionModel signature ``(x, t, condition=None, **kw)``.

    ``condition`` is a TensorDict with ``image_cond_key`` (concatenated to x along channels) and/or
    ``vector_cond_key`` (passed as ``class_labels``), a Tensor (concatenated), or None. TensorDict
    entries named in ``kwarg_keys`` (e.g. ``lead_time_label``) are forwarded as keyword arguments;
    other keywords (``augment_labels``, ``global_index``, ``embedding_selector``, ...) pass through.
    A backbone without a ``class_labels`` parameter (e.g. the plain DDPM U-Net) gets none.
    """

    def __init__(self, model: nn.Module, image_cond_key: str = "cond_concat", vector_cond_key: str = "cond_vec",
                 kwarg_keys: Sequence[str] = ("lead_time_label",)) -> None:
        super().__init__()
        self.model = model
        self.image_cond_key, self.vector_cond_key, self.kwarg_keys = image_cond_key, vector_cond_key, tuple(kwarg_keys)
        forward = model.forward if isinstance(model, nn.Module) else model
        self.takes_class_labels = "class_labels" in inspect.signature(forward).parameters

    def forward(self, x: Tensor, t: Tensor, condition: Condition = None, **model_kwargs: Any) -> Tensor:
        cond_concat: Tensor | None = None
        cond_vec: Tensor | None = None
        if is_tensordict(condition):
            cond_concat = condition.get(self.image_cond_key, None)
            cond_vec = condition.get(self.vector_cond_key, None)
            for key in self.kwarg_keys:
                if condition.get(key, None) is not None:
                    model_kwargs.setdefault(key, condition.get(key))
        elif isinstance(condition, Tensor):
            cond_concat = condition
        elif condition is not None:
            raise TypeError(f"condition must be a Tensor, a TensorDict or None, got {type(condition).__name__}")
        if not torch.compiler.is_compiling():
            self._check(x, t, cond_concat, cond_vec)
        if cond_concat is not None:
            x = torch.cat([x, cond_concat.to(x.dtype)], dim=1)
        if self.takes_class_labels:
            return self.model(x, t, cond_vec, **model_kwargs)
        return self.model(x, t, **model_kwargs)

    def _check(self, x: Tensor, t: Tensor, cond_concat: Tensor | None, cond_vec: Tensor | None) -> None:
        B = x.shape[0]
        check_batch("t", t, B, exact_1d=True)
        check_batch(f"condition[{self.vector_cond_key!r}]", cond_vec, B)
        check_batch(f"condition[{self.image_cond_key!r}]", cond_concat, B)
        if cond_concat is not None and (cond_concat.ndim != x.ndim or cond_concat.shape[2:] != x.shape[2:]):
            raise ValueError(f"condition[{self.image_cond_key!r}] must match the spatial shape of x {tuple(x.shape[2:])}, "
                             f"got {tuple(cond_concat.shape)}")
        if cond_vec is not None and not self.takes_class_labels:
            raise ValueError(f"condition[{self.vector_cond_key!r}] given but {type(self.model).__name__} "
                             "takes no class_labels")
