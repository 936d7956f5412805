"""Noise schedules: forward process, training-time sampling and sampling-time discretisation.

Layering, as in PhysicsNeMo: the :class:`NoiseScheduler` protocol; :class:`GaussianScheduler`
(any ``x_t = alpha(t) x0 + sigma(t) eps`` with its x0 / score / epsilon conversions);
:class:`LinearGaussianNoiseScheduler` (continuous time, adds derivatives and the reverse ODE/SDE);
ready components :class:`EDMNoiseScheduler`, :class:`VENoiseScheduler`, :class:`VPNoiseScheduler`,
:class:`IDDPMNoiseScheduler` (Karras et al. 2022, Table 1) and the discrete :class:`DDPMScheduler`.

Convention (PhysicsNeMo's): ``sigma(t)`` is the std of the noise in ``x_t`` itself. The EDM paper's
noise level -- the one preconditioners and exported engines take -- is
``edm_sigma(t) = sigma(t) / alpha(t)``: ``x_t / alpha(t) = x0 + edm_sigma(t) n``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffexport.diffusion.base import (
    Denoiser,
    GeneratorLike,
    NoiseSource,
    Predictor,
    PredictorType,
    batch_view,
    require,
)


def check_num_steps(num_steps: int) -> None:
    require(isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 1, "num_steps", "an int >= 1", num_steps)


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    require(sigma_min > 0, "sigma_min", "> 0", sigma_min)
    require(sigma_max > sigma_min, "sigma_max", f"> sigma_min = {sigma_min}", sigma_max)


def _append_zero(t: Tensor, device, dtype) -> Tensor:
    return torch.cat([t, t.new_zeros(1)]).to(device=device, dtype=dtype or torch.float32)


def _ramp(num_steps: int) -> Tensor:
    """``i / (N - 1)`` for i = 0..N-1 in float64 (just ``[0]`` when N = 1)."""
    check_num_steps(num_steps)
    return torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)


def _lerp(a: float, b: float, num_steps: int) -> Tensor:
    """``a + i/(N-1) (b - a)`` for i = 0..N-1 (float64), exactly ``b`` at the end: the plain formula
    cancels to 0 there when ``a`` dwarfs ``b`` (e.g. EDM's ``sigma^(1/rho)`` with a small rho)."""
    return torch.lerp(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), _ramp(num_steps))


def _rand(N: int, device, dtype, generator: GeneratorLike) -> Tensor:
    """U[0, 1) of shape [N]."""
    return NoiseSource(generator).rand_like(torch.empty(N, device=device, dtype=dtype))


def _one_predictor(
    x0_predictor: Predictor | None, score_predictor: Predictor | None, epsilon_predictor: Predictor | None
) -> tuple[PredictorType, Predictor]:
    named = (("x0", x0_predictor), ("score", score_predictor), ("epsilon", epsilon_predictor))
    given = [(kind, p) for kind, p in named if p is not None]
    if len(given) != 1:
        raise ValueError("pass exactly one of x0_predictor, score_predictor, epsilon_predictor")
    return given[0]


@runtime_checkable
class NoiseScheduler(Protocol):
    """What training (:class:`~diffexport.diffusion.losses.MSEDSMLoss`) and
    :func:`~diffexport.diffusion.samplers.sample` need from a noise schedule."""

    def sample_time(self, N: int, *, device=None, dtype=None, generator: GeneratorLike = None) -> Tensor: ...

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor: ...

    def timesteps(self, num_steps: int, *, device=None, dtype=None) -> Tensor: ...

    def init_latents(
        self, spatial_shape: tuple[int, ...], tmax: Tensor, generator: GeneratorLike = None, *, device=None, dtype=None
    ) -> Tensor: ...

    def get_denoiser(self, **predictor) -> Denoiser: ...

    def loss_weight(self, t: Tensor) -> Tensor: ...


class GaussianScheduler(ABC):
    """``x_t = alpha(t) x0 + sigma(t) eps``: forward process and prediction conversions.

    score = (alpha x0 - x_t) / sigma^2,  eps = (x_t - alpha x0) / sigma = -sigma score.
    """

    def edm_sigma(self, t: Tensor) -> Tensor:
        """EDM noise level ``sigma(t) / alpha(t)``: what preconditioners and engines take."""
        return self.sigma(t) / self.alpha(t)

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t)."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise std sigma(t) of x_t."""

    def _coef(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        t = batch_view(t, x)
        return self.alpha(t).to(x.dtype), self.sigma(t).to(x.dtype)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw ``x_t`` given clean ``x0`` [B, *] and times ``t`` [B]."""
        a, s = self._coef(t, x0)
        return a * x0 + s * (torch.randn_like(x0) if noise is None else noise)

    def init_latents(
        self, spatial_shape: tuple[int, ...], tmax: Tensor, generator: GeneratorLike = None, *, device=None, dtype=None
    ) -> Tensor:
        """Initial latents ``sigma(tmax) * eps`` of shape [B, *spatial_shape] (tmax is [B])."""
        device = device if device is not None else tmax.device
        dtype = dtype or (tmax.dtype if tmax.is_floating_point() else torch.float32)
        eps = NoiseSource(generator).randn_like(torch.empty(tmax.shape[0], *spatial_shape, device=device, dtype=dtype))
        return self._coef(tmax.to(device), eps)[1] * eps

    def x0_to_score(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self._coef(t, x_t)
        return (a * x0 - x_t) / s**2

    def score_to_x0(self, score: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self._coef(t, x_t)
        return (x_t + s**2 * score) / a

    def epsilon_to_score(self, epsilon: Tensor, t: Tensor) -> Tensor:
        return -epsilon / self._coef(t, epsilon)[1]

    def score_to_epsilon(self, score: Tensor, t: Tensor) -> Tensor:
        return -self._coef(t, score)[1] * score

    def epsilon_to_x0(self, epsilon: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self._coef(t, x_t)
        return (x_t - s * epsilon) / a

    def x0_to_epsilon(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self._coef(t, x_t)
        return (x_t - a * x0) / s


class LinearGaussianNoiseScheduler(GaussianScheduler):
    """Continuous-time linear-Gaussian schedule with reverse ODE / SDE.

    Forward SDE ``dx = f(x,t) dt + g(t) dW`` with ``f = (alpha'/alpha) x`` and
    ``g^2 = 2 sigma' sigma - 2 (alpha'/alpha) sigma^2``. Reverse-time:

        ODE (probability flow):  dx/dt = f - g^2/2 * score
        SDE drift:               dx/dt = f - g^2 * score     (+ g dW, left to the solver)
    """

    @abstractmethod
    def sigma_inv(self, sigma: Tensor) -> Tensor:
        """Time t with sigma(t) = sigma."""

    @abstractmethod
    def sigma_dot(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def alpha_dot(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def timesteps(self, num_steps: int, *, device=None, dtype=None) -> Tensor:
        """N decreasing sampling times followed by a trailing 0: shape [N + 1]."""

    @abstractmethod
    def sample_time(self, N: int, *, device=None, dtype=None, generator: GeneratorLike = None) -> Tensor:
        """N training times."""

    @abstractmethod
    def loss_weight(self, t: Tensor) -> Tensor:
        """Weight of ``|x0_hat - x0|^2`` at times t [B] (EDM's lambda(sigma))."""

    def edm_sigma_inv(self, edm_sigma: Tensor) -> Tensor:
        """Inverse of :meth:`edm_sigma` (default: :meth:`sigma_inv`, right when alpha = 1)."""
        return self.sigma_inv(edm_sigma)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        t = batch_view(t, x)
        return (self.alpha_dot(t) / self.alpha(t)).to(x.dtype) * x

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        """g^2(t), shaped (B, 1, ..., 1)."""
        t = batch_view(t, x)
        s = self.sigma(t)
        return (2 * self.sigma_dot(t) * s - 2 * self.alpha_dot(t) / self.alpha(t) * s**2).to(x.dtype)

    def get_denoiser(
        self,
        *,
        x0_predictor: Predictor | None = None,
        score_predictor: Predictor | None = None,
        epsilon_predictor: Predictor | None = None,
        denoising_type: Literal["ode", "sde"] = "ode",
    ) -> Denoiser:
        """Turn exactly one predictor into the ODE right-hand side or the reverse-SDE drift."""
        if denoising_type not in ("ode", "sde"):
            raise ValueError(f"denoising_type must be 'ode' or 'sde', got {denoising_type!r}")
        kind, predictor = _one_predictor(x0_predictor, score_predictor, epsilon_predictor)
        weight = 0.5 if denoising_type == "ode" else 1.0

        def score(x: Tensor, t: Tensor) -> Tensor:
            p = predictor(x, t)
            if kind == "x0":
                return self.x0_to_score(p, x, t)
            return p if kind == "score" else self.epsilon_to_score(p, t)

        def denoiser(x: Tensor, t: Tensor) -> Tensor:
            return self.drift(x, t) - weight * self.diffusion(x, t) * score(x, t)

        return denoiser


class _VarianceExploding(LinearGaussianNoiseScheduler):
    """alpha(t) = 1, sigma(t) = t (EDM, iDDPM)."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def alpha_dot(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return sigma

    def sigma_dot(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class EDMNoiseScheduler(_VarianceExploding):
    """EDM: sigma(t) = t; rho-spaced steps; log-normal training sigmas; EDM loss weight."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2) -> None:
        _check_sigma_range(sigma_min, sigma_max)
        require(rho > 0, "rho", "> 0", rho)
        require(sigma_data > 0, "sigma_data", "> 0", sigma_data)
        require(P_std > 0, "P_std", "> 0", P_std)
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std

    def timesteps(self, num_steps: int, *, device=None, dtype=None) -> Tensor:
        """``t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0."""
        a, b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return _append_zero(_lerp(a, b, num_steps) ** self.rho, device, dtype)

    def sample_time(self, N: int, *, device=None, dtype=None, generator: GeneratorLike = None) -> Tensor:
        """ln sigma ~ N(P_mean, P_std^2)."""
        n = NoiseSource(generator).randn_like(torch.empty(N, device=device, dtype=dtype))
        return (self.P_mean + self.P_std * n).exp()

    def loss_weight(self, t: Tensor) -> Tensor:
        return (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2


class VENoiseScheduler(LinearGaussianNoiseScheduler):
    """Variance exploding (Song et al.): t = sigma^2, geometric steps in sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        _check_sigma_range(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def alpha_dot(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return t.sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return sigma**2

    def sigma_dot(self, t: Tensor) -> Tensor:
        return 0.5 / t.sqrt()

    def timesteps(self, num_steps: int, *, device=None, dtype=None) -> Tensor:
        """``t_i = smax^2 (smin^2 / smax^2)^(i/(N-1))``, then 0."""
        ratio = self.sigma_min**2 / self.sigma_max**2
        return _append_zero(self.sigma_max**2 * ratio ** _ramp(num_steps), device, dtype)

    def sample_time(self, N: int, *, device=None, dtype=None, generator: GeneratorLike = None) -> Tensor:
        """sigma log-uniform in [sigma_min, sigma_max], t = sigma^2."""
        u = _rand(N, device, dtype, generator)
        return self.sigma_inv(self.sigma_min * (self.sigma_max / self.sigma_min) ** u)

    def loss_weight(self, t: Tensor) -> Tensor:
        return 1 / t


class VPNoiseScheduler(LinearGaussianNoiseScheduler):
    """Variance preserving: beta(t) = beta_min + beta_d t, a(t) = beta_d t^2 / 2 + beta_min t,
    alpha = exp(-a/2), sigma = sqrt(1 - alpha^2); EDM sigma = sqrt(e^a - 1). Steps t: t_max -> epsilon_s.

    ``beta_d`` defaults to 19.1 as in PhysicsNeMo 2.2's ``VPNoiseScheduler`` (EDM's VP and
    :class:`~diffexport.diffusion.preconditioners.VPPreconditioner` use 19.9; the denoiser takes
    sigma, so the two need not agree)."""

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.1, epsilon_s: float = 1e-3, t_max: float = 1.0) -> None:
        require(beta_min > 0, "beta_min", "> 0", beta_min)
        require(beta_d > 0, "beta_d", "> 0", beta_d)
        require(t_max > 0, "t_max", "> 0", t_max)
        require(0 < epsilon_s < t_max, "epsilon_s", f"in (0, t_max = {t_max})", epsilon_s)
        self.beta_min, self.beta_d, self.epsilon_s, self.t_max = beta_min, beta_d, epsilon_s, t_max

    def _a(self, t: Tensor) -> Tensor:
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def _t_of_a(self, a: Tensor) -> Tensor:
        """The root t >= 0 of ``beta_d t^2 / 2 + beta_min t = a``, as ``2a / (sqrt(beta_min^2 + 2 beta_d a) + beta_min)``
        (no cancellation at small a)."""
        return 2 * a / ((self.beta_min**2 + 2 * self.beta_d * a).sqrt() + self.beta_min)

    def alpha(self, t: Tensor) -> Tensor:
        return (-0.5 * self._a(t)).exp()

    def alpha_dot(self, t: Tensor) -> Tensor:
        return -0.5 * (self.beta_min + self.beta_d * t) * self.alpha(t)

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(-self._a(t))).sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return self._t_of_a(-torch.log1p(-(sigma**2)))

    def sigma_dot(self, t: Tensor) -> Tensor:
        return 0.5 * (self.beta_min + self.beta_d * t) * self.alpha(t) ** 2 / self.sigma(t)

    def edm_sigma(self, t: Tensor) -> Tensor:
        return torch.expm1(self._a(t)).sqrt()

    def edm_sigma_inv(self, edm_sigma: Tensor) -> Tensor:
        return self._t_of_a(torch.log1p(edm_sigma**2))

    def timesteps(self, num_steps: int, *, device=None, dtype=None) -> Tensor:
        """``t_i = t_max + i/(N-1) (epsilon_s - t_max)``, then 0."""
        return _append_zero(_lerp(self.t_max, self.epsilon_s, num_steps), device, dtype)

    def sample_time(self, N: int, *, device=None, dtype=None, generator: GeneratorLike = None) -> Tensor:
        """t uniform in [epsilon_s, t_max]."""
        return self.epsilon_s + _rand(N, device, dtype, generator) * (self.t_max - self.epsilon_s)

    def loss_weight(self, t: Tensor) -> Tensor:
        """1 / edm_sigma^2 = alpha^2 / sigma^2."""
        return 1 / torch.expm1(self._a(t))


def iddpm_sigma_table(C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> Tensor:
    """iDDPM noise levels u_0 > u_1 > ... > u_M = 0 (float64), EDM paper Table 1:
    ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1)``, ``abar_j = sin^2(pi j / (2 M (C_2 + 1)))``."""
    abar = [math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2 for j in range(M + 1)]
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C_1) - 1)
    return torch.tensor(u, dtype=torch.float64)


class IDDPMNoiseScheduler(_VarianceExploding):
    """Improved DDPM (Nichol & Dhariwal) in EDM form: sigma(t) = t restricted to the u_j table."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 81.0, C_1: float = 0.001, C_2: float = 0.008,
                 M: int = 1000) -> None:
        _check_sigma_range(sigma_min, sigma_max)
        require(0 < C_1 < 1, "C_1", "in (0, 1)", C_1)
        require(C_2 > 0, "C_2", "> 0", C_2)
        require(M >= 1, "M", ">= 1", M)
        self.sigma_min, self.sigma_max, self.C_1, self.C_2, self.M = sigma_min, sigma_max, C_1, C_2, M
        u = iddpm_sigma_table(C_1, C_2, M)
        self.u = u[(u >= sigma_min) & (u <= sigma_max)]  # decreasing
        require(len(self.u) > 0, "sigma_min", f"<= sigma_max with an iDDPM level in between (levels {u[-2]:.4g}..{u[0]:.4g})", sigma_min)

    def timesteps(self, num_steps: int, *, device=None, dtype=None) -> Tensor:
        """N entries of the in-range table at evenly spaced (rounded) indices, then 0. ``num_steps``
        must not exceed the number of table levels between sigma_min and sigma_max (else some repeat)."""
        check_num_steps(num_steps)
        require(num_steps <= len(self.u), "num_steps",
                f"<= {len(self.u)}: the iDDPM table of M = {self.M} has {len(self.u)} levels between sigma_min = "
                f"{self.sigma_min:g} and sigma_max = {self.sigma_max:g} (more steps would repeat levels; widen the range or raise M)", num_steps)
        idx = ((len(self.u) - 1) * _ramp(num_steps)).round().long()
        return _append_zero(self.u[idx], device, dtype)

    def sample_time(self, N: int, *, device=None, dtype=None, generator: GeneratorLike = None) -> Tensor:
        """Uniform over the in-range table."""
        i = (_rand(N, device, torch.float64, generator) * len(self.u)).long().clamp_(max=len(self.u) - 1)
        return self.u.to(i.device)[i].to(dtype=dtype or torch.float32)

    def loss_weight(self, t: Tensor) -> Tensor:
        return 1 / t**2


class DDPMScheduler(GaussianScheduler):
    """Discrete DDPM (Ho et al. 2020): linear betas, integer timesteps 0..T-1, epsilon prediction.

    ``alpha(t) = sqrt(abar_t)``, ``sigma(t) = sqrt(1 - abar_t)``; ``t = -1`` denotes clean data
    (abar = 1), used as the trailing entry of :meth:`timesteps`. :meth:`step` is the DDIM update
    (Song et al. 2021) whose ``eta = 1`` over consecutive timesteps is DDPM ancestral sampling
    (the loop: :func:`diffexport.diffusion.samplers.ddpm_sample`).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        require(num_train_timesteps >= 1, "num_train_timesteps", ">= 1", num_train_timesteps)
        require(0 < beta_start < 1, "beta_start", "in (0, 1)", beta_start)
        require(beta_start <= beta_end < 1, "beta_end", f"in [beta_start = {beta_start}, 1)", beta_end)
        self.T = num_train_timesteps
        self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])  # index t + 1

    def alpha_bar(self, t: Tensor) -> Tensor:
        return self._abar.to(t.device)[t.long() + 1]

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self.alpha_bar(t)).sqrt()

    def timesteps(self, num_steps: int | None = None, *, device=None, dtype=None) -> Tensor:
        """``num_steps`` (default T) evenly spaced integers from T-1 down to 0, then -1 (int64)."""
        num_steps = self.T if num_steps is None else num_steps
        check_num_steps(num_steps)
        require(num_steps <= self.T, "num_steps", f"<= num_train_timesteps = {self.T}", num_steps)
        t = torch.linspace(self.T - 1, 0, num_steps, dtype=torch.float64).round().long()
        return torch.cat([t, torch.tensor([-1])]).to(device)

    def sample_time(self, N: int, *, device=None, dtype=None, generator: GeneratorLike = None) -> Tensor:
        return (_rand(N, device, torch.float64, generator) * self.T).long().clamp_(max=self.T - 1)

    def loss_weight(self, t: Tensor) -> Tensor:
        """abar / (1 - abar): turns the x0 error of an epsilon-predictor into the epsilon MSE."""
        abar = self.alpha_bar(t)
        return (abar / (1 - abar)).float()

    def init_latents(
        self, spatial_shape: tuple[int, ...], tmax: Tensor, generator: GeneratorLike = None, *, device=None, dtype=None
    ) -> Tensor:
        """x_T ~ N(0, I), as DDPM samples it."""
        device = device if device is not None else tmax.device
        return NoiseSource(generator).randn_like(torch.empty(tmax.shape[0], *spatial_shape, device=device, dtype=dtype))

    def get_denoiser(self, *, x0_predictor: Predictor | None = None, score_predictor: Predictor | None = None,
                     epsilon_predictor: Predictor | None = None) -> Denoiser:
        """For a discrete chain the "denoiser" is the epsilon prediction that :meth:`step` consumes."""
        kind, predictor = _one_predictor(x0_predictor, score_predictor, epsilon_predictor)
        if kind == "epsilon":
            return predictor
        if kind == "x0":
            return lambda x, t: self.x0_to_epsilon(predictor(x, t), x, t)
        return lambda x, t: self.score_to_epsilon(predictor(x, t), t)

    def step(self, epsilon: Tensor, t: Tensor | int, x: Tensor, t_prev: Tensor | int | None = None, *,
             eta: float = 1.0, generator: GeneratorLike | NoiseSource = None) -> Tensor:
        """One DDIM(eta) step ``x_t -> x_{t_prev}`` (t_prev defaults to t - 1; -1 = clean)::

            x0  = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)
            s   = eta sqrt((1 - abar_p) / (1 - abar_t)) sqrt(1 - abar_t / abar_p)
            x_p = sqrt(abar_p) x0 + sqrt(1 - abar_p - s^2) eps + s z
        """
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        t_prev = t - 1 if t_prev is None else torch.as_tensor(t_prev, device=x.device).expand(x.shape[0])
        ab_t, ab_p = batch_view(self.alpha_bar(t), x), batch_view(self.alpha_bar(t_prev), x)
        s = eta * ((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)).sqrt()
        x0 = self.epsilon_to_x0(epsilon, x, t)
        x_prev = ab_p.sqrt().to(x.dtype) * x0 + (1 - ab_p - s**2).clamp(min=0).sqrt().to(x.dtype) * epsilon
        if eta == 0:
            return x_prev
        return x_prev + s.to(x.dtype) * NoiseSource.of(generator).randn_like(x)
