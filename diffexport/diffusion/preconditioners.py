"""Preconditioners (Karras et al. 2022, Table 1): ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``.

As in PhysicsNeMo, ``forward(x, t)`` takes the diffusion time ``t`` [B] and an unscaled input
``x = x0 + sigma(t) n``; :meth:`BaseAffinePreconditioner.sigma` maps t to the EDM noise level
(identity for EDM / VE / iDDPM / DDPM, where t is sigma; :class:`VPPreconditioner` overrides it
with ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``) and ``sigma_inv`` maps back.
Exported engines keep the contract ``D(x, sigma)``
(:class:`~diffexport.diffusion.base.EDMDenoiserFn`): the exported graph calls
:meth:`BaseAffinePreconditioner.denoise` with sigma, where VP maps sigma to time itself
(``c_noise = (M - 1) sigma_inv(sigma)``).

Export-friendly: no Python branching on tensor values in ``forward``; constant tables are
buffers; input checks are skipped while tracing (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diffexport.diffusion.base import Condition, batch_view, check_batch, require
from diffexport.diffusion.noise_schedulers import VPNoiseScheduler, iddpm_sigma_table

Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]


class BaseAffinePreconditioner(nn.Module, ABC):
    """Wrap a :class:`~diffexport.diffusion.base.DiffusionModel` ``F`` into ``D(x, t, condition, **kw)``.

    ``sigma = self.sigma(t)`` (identity by default); :meth:`compute_coefficients` gets sigma
    shaped (B, 1, ..., 1) and returns ``(c_in, c_noise, c_out, c_skip)`` of that shape; the model
    receives ``c_noise`` flattened to [B]. The preconditioner is itself a DiffusionModel.
    """

    #: whether sigma must be > 0 (c_noise takes its log); checked in eager mode only
    positive_sigma: bool = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @abstractmethod
    def compute_coefficients(self, sigma: Tensor) -> Coefficients:
        """``(c_in, c_noise, c_out, c_skip)`` for sigma of shape (B, 1, ..., 1)."""

    def sigma(self, t: Tensor) -> Tensor:
        """Noise level for the forward's diffusion time ``t`` (identity: ``t`` is sigma)."""
        return t

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        """The diffusion time whose noise level is ``sigma`` (inverse of :meth:`sigma`)."""
        return sigma

    def round_sigma(self, sigma: Tensor) -> Tensor:
        """The noise level the model is conditioned on nearest to ``sigma`` (identity: continuous)."""
        return sigma

    @classmethod
    def sigma_levels(cls, **args: Any) -> Tensor | None:
        """Without a model: the positive noise levels (float64, decreasing) that an instance built with
        ``args`` conditions on, which samplers round a raised (churned) noise level to as EDM's
        ``round_sigma(t_hat)`` does (:func:`level_rounding`); None when continuous (no rounding)."""
        return None

    def forward(self, x: Tensor, t: Tensor, condition: Condition = None, **model_kwargs: Any) -> Tensor:
        """``D(x, t)`` at diffusion time ``t`` [B] (PhysicsNeMo's API): :meth:`denoise` at ``sigma(t)``."""
        if not torch.compiler.is_compiling():
            check_batch("t", t, x.shape[0], exact_1d=True)
        return self.denoise(x, self.sigma(t), condition, **model_kwargs)

    def denoise(self, x: Tensor, sigma: Tensor, condition: Condition = None, **model_kwargs: Any) -> Tensor:
        """``D(x; sigma)`` at EDM noise level ``sigma`` [B]: the engine contract. Exported graphs call
        this, so a VP engine maps sigma to time only where c_noise needs it (no sigma -> t -> sigma)."""
        eager = not torch.compiler.is_compiling()
        if eager:
            check_batch("sigma", sigma, x.shape[0], exact_1d=True)
            check_batch("condition", condition, x.shape[0])
        sigma = batch_view(sigma, x)
        if eager and self.positive_sigma and bool((sigma <= 0).any()):
            raise ValueError(f"t (noise level sigma) must be > 0 for {type(self).__name__}, got min {sigma.min().item():g}")
        c_in, c_noise, c_out, c_skip = self.compute_coefficients(sigma)
        if condition is not None:
            model_kwargs["condition"] = condition
        F_x = self.model_output(self.model(c_in * x, c_noise.reshape(-1), **model_kwargs), x)
        return c_skip * x + c_out * F_x

    def model_output(self, F_x: Tensor, x: Tensor) -> Tensor:
        """The part of the model's output that is ``F`` (all of it, unless a subclass says otherwise)."""
        return F_x


class EDMPreconditioner(BaseAffinePreconditioner):
    """EDM: ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
    ``c_noise = ln(s)/4``."""

    positive_sigma = True

    def __init__(self, model: nn.Module, sigma_data: float = 0.5) -> None:
        require(sigma_data > 0, "sigma_data", "> 0", sigma_data)
        super().__init__(model)
        self.sigma_data = sigma_data

    def compute_coefficients(self, sigma: Tensor) -> Coefficients:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_in, sigma.log() / 4, c_out, c_skip


class VEPreconditioner(BaseAffinePreconditioner):
    """VE: ``c_skip = 1``, ``c_out = s``, ``c_in = 1``, ``c_noise = ln(s/2)``."""

    positive_sigma = True

    def compute_coefficients(self, sigma: Tensor) -> Coefficients:
        one = torch.ones_like(sigma)
        return one, (0.5 * sigma).log(), sigma, one


class VPPreconditioner(BaseAffinePreconditioner):
    """VP: ``forward(x, t)`` takes the diffusion time t, ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``;
    ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = (M-1) sigma_inv(s)``.

    ``sigma`` and ``sigma_inv`` are :class:`VPNoiseScheduler`'s ``edm_sigma`` / ``edm_sigma_inv``
    (written with expm1 / log1p, so small noise levels keep their precision in float32)."""

    def __init__(self, model: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000) -> None:
        require(M >= 1, "M", ">= 1", M)
        super().__init__(model)
        self.schedule = VPNoiseScheduler(beta_min=beta_min, beta_d=beta_d)
        self.beta_d, self.beta_min, self.M = beta_d, beta_min, M

    def sigma(self, t: Tensor) -> Tensor:
        return self.schedule.edm_sigma(t)

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return self.schedule.edm_sigma_inv(sigma)

    def compute_coefficients(self, sigma: Tensor) -> Coefficients:
        c_in = 1 / (sigma**2 + 1).sqrt()
        return c_in, (self.M - 1) * self.sigma_inv(sigma), -sigma, torch.ones_like(sigma)


class IDDPMPreconditioner(BaseAffinePreconditioner):
    """iDDPM: ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)``,
    ``c_noise = M - 1 - argmin_j |s - u_j|`` over the buffer ``u`` of iDDPM noise levels.

    A model with twice the channels of ``x`` (ADM's learned variance, e.g. an iDDPM / ADM
    checkpoint) has only its first C output channels used, as EDM's ``iDDPMPrecond`` does."""

    def __init__(self, model: nn.Module, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> None:
        require(0 < C_1 < 1, "C_1", "in (0, 1)", C_1)
        require(C_2 > 0, "C_2", "> 0", C_2)
        require(M >= 1, "M", ">= 1", M)
        super().__init__(model)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self.register_buffer("u", iddpm_sigma_table(C_1, C_2, M).float())

    @classmethod
    def sigma_levels(cls, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> Tensor:
        """The table's positive levels u_0 > ... > u_{M-1} in float64 (``u`` is their float32 rounding, and u_M = 0)."""
        u = iddpm_sigma_table(C_1, C_2, M)
        return u[u > 0]

    def round_sigma(self, sigma: Tensor, return_index: bool = False) -> Tensor:
        """Nearest table level u_j to each sigma (or its index j), same shape as sigma."""
        index = (sigma.reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)
        return index if return_index else self.u[index].to(sigma.dtype)

    def compute_coefficients(self, sigma: Tensor) -> Coefficients:
        c_noise = (self.M - 1 - self.round_sigma(sigma, return_index=True)).to(sigma.dtype)
        return 1 / (sigma**2 + 1).sqrt(), c_noise, -sigma, torch.ones_like(sigma)

    def model_output(self, F_x: Tensor, x: Tensor) -> Tensor:
        return F_x[:, : x.shape[1]] if F_x.ndim > 1 and F_x.shape[1] == 2 * x.shape[1] else F_x


def level_rounding(levels: Tensor | None) -> Callable[[Tensor], Tensor] | None:
    """``round_sigma(sigma)``: each sigma replaced by the nearest of ``levels`` (compared in float64; same
    shape and dtype as sigma), e.g. of :meth:`IDDPMPreconditioner.sigma_levels`; None when ``levels`` is."""
    if levels is None:
        return None

    def round_sigma(sigma: Tensor) -> Tensor:
        lv = levels.to(device=sigma.device, dtype=torch.float64)
        index = (sigma.reshape(-1, 1).double() - lv.reshape(1, -1)).abs().argmin(dim=1)
        return lv[index].reshape(sigma.shape).to(sigma.dtype)

    return round_sigma


def _preconditioner_class(class_name: str) -> type[BaseAffinePreconditioner]:
    cls = globals().get(class_name)
    if not (isinstance(cls, type) and issubclass(cls, BaseAffinePreconditioner)):
        raise ValueError(f"{class_name!r} is not a preconditioner of diffexport.diffusion")
    return cls


def rounding_spec(class_name: str, args: dict[str, Any]) -> dict | None:
    """``{"class", "args"}`` for :func:`sigma_rounding` (the args :meth:`~BaseAffinePreconditioner.sigma_levels`
    takes, defaults filled in) when ``class_name(model, **args)`` conditions on discrete noise levels, else None:
    the manifest's ``sampler.round_sigma``."""
    cls = _preconditioner_class(class_name)
    params = inspect.signature(cls.sigma_levels).parameters.values()
    levels_args = {p.name: args.get(p.name, p.default) for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {"class": class_name, "args": levels_args} if cls.sigma_levels(**levels_args) is not None else None


def sigma_rounding(class_name: str, args: dict[str, Any]) -> Callable[[Tensor], Tensor] | None:
    """:func:`level_rounding` of ``class_name(model, **args)``'s :meth:`~BaseAffinePreconditioner.sigma_levels`
    (no model built); ``ValueError`` naming the class when it is not a preconditioner of this module."""
    return level_rounding(_preconditioner_class(class_name).sigma_levels(**args))


class DDPMPreconditioner(BaseAffinePreconditioner):
    """A discrete DDPM epsilon-predictor ``eps(x_t, t_int)`` as an EDM denoiser.

    With ``x_t = sqrt(abar_t) (x0 + s_t n)`` and ``s_t = sqrt((1 - abar_t) / abar_t)``:
    ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)`` (= sqrt(abar_t)), ``c_noise`` = the
    timestep t whose ``s_t`` is nearest to s (linear betas, as :class:`DDPMScheduler`).
    """

    def __init__(self, model: nn.Module, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        require(num_train_timesteps >= 1, "num_train_timesteps", ">= 1", num_train_timesteps)
        require(0 < beta_start <= beta_end < 1, "beta_start", f"in (0, beta_end = {beta_end}] with beta_end < 1", beta_start)
        super().__init__(model)
        abar = torch.cumprod(1 - torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64), 0)
        self.register_buffer("s", ((1 - abar) / abar).sqrt().float())

    def compute_coefficients(self, sigma: Tensor) -> Coefficients:
        t = (sigma.reshape(-1, 1) - self.s.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)
        return 1 / (sigma**2 + 1).sqrt(), t.to(sigma.dtype), -sigma, torch.ones_like(sigma)
