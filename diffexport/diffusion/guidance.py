"""Guidance: classifier-free guidance and diffusion posterior sampling (DPS, Chung et al. 2023;
with the SDA variance correction of Rozet & Louppe 2023)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from diffexport.diffusion.base import Predictor, batch_view

ToScore = Callable[[Tensor, Tensor, Tensor], Tensor]


class ClassifierFreeGuidance:
    """Predictor ``uncond + guidance_scale (cond - uncond)`` (Ho & Salimans 2022).

    Works for x0, score and epsilon predictors alike (all are affine in each other at fixed x, t).
    ``guidance_scale = 1`` is the conditional predictor, 0 the unconditional one.
    """

    def __init__(self, cond_predictor: Predictor, uncond_predictor: Predictor, guidance_scale: float) -> None:
        self.cond_predictor, self.uncond_predictor = cond_predictor, uncond_predictor
        self.guidance_scale = guidance_scale

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return guide(self.cond_predictor(x, t), self.uncond_predictor(x, t), self.guidance_scale)


class JointClassifierFreeGuidance:
    """:class:`ClassifierFreeGuidance` with one predictor call for both predictions.

    ``joint_predictor(x, t)`` takes ``2B`` rows, the conditional ones first and the unconditional
    ones after (its conditions stacked that way), so a network runs once per step at twice the
    batch instead of twice. Rows never interact: the result equals two separate calls.
    """

    def __init__(self, joint_predictor: Predictor, guidance_scale: float) -> None:
        self.joint_predictor, self.guidance_scale = joint_predictor, guidance_scale

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        both = self.joint_predictor(torch.cat([x, x]), torch.cat([t, t]) if t.ndim else t)
        cond, uncond = both.chunk(2)
        return guide(cond, uncond, self.guidance_scale)


def guide(cond: Tensor, uncond: Tensor, guidance_scale: float) -> Tensor:
    """``uncond + guidance_scale (cond - uncond)``."""
    return uncond + guidance_scale * (cond - uncond)


@runtime_checkable
class DPSGuidance(Protocol):
    """``guidance(x, t, x_0) -> term [B, *]`` added to the score (a likelihood score estimate)."""

    def __call__(self, x: Tensor, t: Tensor, x_0: Tensor) -> Tensor: ...


class DPSScorePredictor:
    """Score predictor ``score(x0_predictor(x, t)) + sum_i guidance_i(x, t, x0)``.

    ``x0_to_score_fn(x0, x, t)`` is typically ``scheduler.x0_to_score``. Guidances differentiate
    ``x0`` w.r.t. ``x``: run under ``torch.no_grad()`` (not inference mode). With several
    autograd guidances, all but the last need ``retain_graph=True``.
    """

    def __init__(self, x0_predictor: Predictor, x0_to_score_fn: ToScore,
                 guidances: DPSGuidance | Sequence[DPSGuidance]) -> None:
        self.x0_predictor, self.x0_to_score_fn = x0_predictor, x0_to_score_fn
        self.guidances = list(guidances) if isinstance(guidances, Sequence) else [guidances]

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("DPS guidance needs autograd: use torch.no_grad() instead of torch.inference_mode()")
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            x_0 = self.x0_predictor(x, t)
            guidance = sum(g(x, t, x_0) for g in self.guidances)
        return self.x0_to_score_fn(x_0, x, t) + guidance


def _lp_loss(p: int) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda y_pred, y: (y_pred - y).reshape(y.shape[0], -1).abs().pow(p).sum(dim=1)


class ModelConsistencyDPSGuidance:
    """Likelihood score for ``y = A(x0) + N(0, std_y^2)``::

        -grad_x loss(A(x0_hat(x, t)), y) / (2 (std_y^2 + gamma sigma(t)^2 / alpha(t)^2))

    ``loss`` is the summed |.|^p (``norm=p``, default 2: the Gaussian log-likelihood) or a callable
    ``(y_pred, y) -> [B]``. ``gamma > 0`` (SDA) needs ``sigma_fn`` (and ``alpha_fn``, default 1).
    """

    def __init__(self, observation_operator: Callable[[Tensor], Tensor], y: Tensor, std_y: float,
                 norm: int | Callable[[Tensor, Tensor], Tensor] = 2, gamma: float = 0.0,
                 sigma_fn: Callable[[Tensor], Tensor] | None = None, alpha_fn: Callable[[Tensor], Tensor] | None = None,
                 retain_graph: bool = False, create_graph: bool = False) -> None:
        if gamma > 0 and sigma_fn is None:
            raise ValueError("sigma_fn must be given when gamma > 0")
        self.observation_operator, self.y, self.std_y, self.gamma = observation_operator, y, std_y, gamma
        self.loss_fn = _lp_loss(norm) if isinstance(norm, int) else norm
        self.sigma_fn, self.alpha_fn = sigma_fn, alpha_fn
        self.retain_graph, self.create_graph = retain_graph, create_graph

    def __call__(self, x: Tensor, t: Tensor, x_0: Tensor) -> Tensor:
        with torch.enable_grad():
            loss = self.loss_fn(self.observation_operator(x_0), self.y.to(x.device, x.dtype))
            (grad,) = torch.autograd.grad(loss.sum(), x, retain_graph=self.retain_graph, create_graph=self.create_graph)
        variance = torch.full_like(t, self.std_y**2, dtype=x.dtype)
        if self.gamma > 0:
            alpha = self.alpha_fn(t) if self.alpha_fn is not None else 1.0
            variance = variance + self.gamma * (self.sigma_fn(t) / alpha) ** 2
        return -grad / (2 * batch_view(variance, x))


class DataConsistencyDPSGuidance(ModelConsistencyDPSGuidance):
    """:class:`ModelConsistencyDPSGuidance` for masked observations: ``A(x0) = mask * x0``,
    observed ``mask * y`` (mask True/1 where observed; y elsewhere is ignored)."""

    def __init__(self, mask: Tensor, y: Tensor, std_y: float, norm: int | Callable[[Tensor, Tensor], Tensor] = 2,
                 gamma: float = 0.0, sigma_fn: Callable[[Tensor], Tensor] | None = None,
                 alpha_fn: Callable[[Tensor], Tensor] | None = None, retain_graph: bool = False,
                 create_graph: bool = False) -> None:
        self.mask = mask
        super().__init__(lambda x_0: self.mask.to(x_0.device, x_0.dtype) * x_0, mask * y, std_y, norm, gamma,
                         sigma_fn, alpha_fn, retain_graph, create_graph)
