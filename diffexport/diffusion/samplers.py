"""Solvers and the sampling loop (the sampler math lives here once; runtimes drive it with engines).

A :class:`Solver` advances ``x`` from ``t_cur`` to ``t_next`` using a
:class:`~diffexport.diffusion.base.Denoiser` (the ODE right-hand side from
``noise_scheduler.get_denoiser``). :func:`sample` runs the loop over the scheduler's time steps.

Stochastic EDM solvers (Karras et al. 2022, Alg. 2) take the same ODE denoiser as the
deterministic ones -- as in PhysicsNeMo, not an x0-predictor: the churn (noise injection) is done
here, in EDM noise-level space, and the ODE step from the raised time uses the denoiser.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffexport.diffusion.base import Denoiser, GeneratorLike, NoiseSource, batch_view, check_batch
from diffexport.diffusion.noise_schedulers import (
    DDPMScheduler,
    LinearGaussianNoiseScheduler,
    NoiseScheduler,
    check_num_steps,
)

StepHook = Callable[[int, Tensor, Tensor, Tensor], Any]
"""``on_step(i, t_cur, t_next, x)``: called after step i with the new state x at ``t_next``."""


@runtime_checkable
class Solver(Protocol):
    """``step(x [B, *], t_cur [B], t_next [B]) -> x at t_next``."""

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor: ...


def _check_times(x: Tensor, t_cur: Tensor, t_next: Tensor) -> None:
    check_batch("t_cur", t_cur, x.shape[0], exact_1d=True)
    check_batch("t_next", t_next, x.shape[0], exact_1d=True)


class EulerSolver:
    """First order: ``x_next = x + (t_next - t_cur) d(x, t_cur)``. One evaluation per step."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
        _check_times(x, t_cur, t_next)
        return x + batch_view(t_next - t_cur, x) * self.denoiser(x, t_cur)


class HeunSolver:
    """Second order (EDM Alg. 1, generalised by ``alpha``; 1 = trapezoidal, 0.5 = midpoint)::

        d = d(x, t);  x' = x + alpha h d;  d' = d(x', t + alpha h)
        x_next = x + h ((1 - 1/(2 alpha)) d + 1/(2 alpha) d')

    The step to ``t_next = 0`` is an Euler step (no evaluation at t = 0), so N steps cost 2N - 1
    evaluations.
    """

    def __init__(self, denoiser: Denoiser, alpha: float = 1.0) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.denoiser, self.alpha = denoiser, alpha

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
        _check_times(x, t_cur, t_next)
        h = batch_view(t_next - t_cur, x)
        d = self.denoiser(x, t_cur)
        x_euler = x + h * d
        last = t_next == 0
        if bool(last.all()):
            return x_euler
        t_prime = torch.where(last, t_cur, t_cur + self.alpha * (t_next - t_cur))
        d_prime = self.denoiser(x + self.alpha * h * d, t_prime)
        w = 1 / (2 * self.alpha)
        x_heun = x + h * ((1 - w) * d + w * d_prime)
        return torch.where(batch_view(last, x), x_euler, x_heun) if bool(last.any()) else x_heun


class _EDMChurnSolver:
    """EDM stochastic step: raise the noise level ``s -> s (1 + gamma)``, then an ODE step.

    ``gamma = min(S_churn / num_steps, sqrt(2) - 1)`` where ``S_min <= s <= S_max``, else 0, with s the
    EDM noise level ``noise_scheduler.edm_sigma(t)`` (``s = t`` without a scheduler). With
    ``x = alpha(t) (x0 + s n)``::

        t_hat = edm_sigma_inv(s_hat)
        x_hat = alpha(t_hat)/alpha(t) x + alpha(t_hat) sqrt(s_hat^2 - s^2) S_noise eps

    ``eps`` comes from ``generator`` (a ``torch.Generator``, an int seed, or None for the global
    RNG): the same seed gives the same trajectory bit for bit.
    """

    scheduler_type = LinearGaussianNoiseScheduler

    def __init__(self, ode: Solver, S_churn: float, S_min: float, S_max: float, S_noise: float, num_steps: int,
                 generator: GeneratorLike | NoiseSource, noise_scheduler: LinearGaussianNoiseScheduler | None) -> None:
        check_num_steps(num_steps)
        if S_churn < 0:
            raise ValueError(f"S_churn must be >= 0, got {S_churn}")
        self.ode, self.noise_scheduler, self.noise = ode, noise_scheduler, NoiseSource.of(generator)
        self.S_churn, self.S_min, self.S_max, self.S_noise, self.num_steps = S_churn, S_min, S_max, S_noise, num_steps
        self.gamma = min(S_churn / num_steps, math.sqrt(2) - 1)

    def churn(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_hat, t_hat)``: x moved to the raised noise level."""
        ns = self.noise_scheduler
        s = t if ns is None else ns.edm_sigma(t)
        gamma = ((s >= self.S_min) & (s <= self.S_max)).to(s.dtype) * self.gamma
        s_hat = s * (1 + gamma)
        t_hat = torch.where(gamma > 0, s_hat if ns is None else ns.edm_sigma_inv(s_hat), t)
        a, a_hat = (1.0, 1.0) if ns is None else (batch_view(ns.alpha(t), x), batch_view(ns.alpha(t_hat), x))
        noise = batch_view((s_hat**2 - s**2).clamp(min=0).sqrt() * self.S_noise, x) * self.noise.randn_like(x)
        return a_hat / a * x + a_hat * noise, t_hat

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
        _check_times(x, t_cur, t_next)
        if self.gamma > 0:
            x, t_cur = self.churn(x, t_cur)
        return self.ode.step(x, t_cur, t_next)


class EDMStochasticEulerSolver(_EDMChurnSolver):
    """EDM churn followed by an :class:`EulerSolver` step. ``denoiser``: the ODE right-hand side."""

    def __init__(self, denoiser: Denoiser, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                 S_noise: float = 1.0, num_steps: int = 18, generator: GeneratorLike = None, *,
                 noise_scheduler: LinearGaussianNoiseScheduler | None = None) -> None:
        super().__init__(EulerSolver(denoiser), S_churn, S_min, S_max, S_noise, num_steps, generator, noise_scheduler)


class EDMStochasticHeunSolver(_EDMChurnSolver):
    """EDM churn followed by a :class:`HeunSolver` step (EDM Alg. 2). ``denoiser``: the ODE
    right-hand side, e.g. ``scheduler.get_denoiser(x0_predictor=...)``."""

    def __init__(self, denoiser: Denoiser, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                 S_noise: float = 1.0, num_steps: int = 18, generator: GeneratorLike = None, *,
                 noise_scheduler: LinearGaussianNoiseScheduler | None = None, alpha: float = 1.0) -> None:
        super().__init__(HeunSolver(denoiser, alpha), S_churn, S_min, S_max, S_noise, num_steps, generator, noise_scheduler)


class DDIMSolver:
    """Discrete DDPM/DDIM chain: ``denoiser`` returns epsilon, :meth:`DDPMScheduler.step` updates.
    ``eta = 1`` over all T steps is DDPM ancestral sampling, ``eta = 0`` deterministic DDIM."""

    scheduler_type = DDPMScheduler

    def __init__(self, denoiser: Denoiser, noise_scheduler: DDPMScheduler, eta: float = 0.0,
                 generator: GeneratorLike | NoiseSource = None) -> None:
        self.denoiser, self.noise_scheduler, self.eta = denoiser, noise_scheduler, eta
        self.noise = NoiseSource.of(generator)

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
        _check_times(x, t_cur, t_next)
        eps = self.denoiser(x, t_cur)
        return self.noise_scheduler.step(eps, t_cur, x, t_next, eta=self.eta, generator=self.noise)


SOLVERS: dict[str, type] = {
    "euler": EulerSolver,
    "heun": HeunSolver,
    "edm_stochastic_euler": EDMStochasticEulerSolver,
    "edm_stochastic_heun": EDMStochasticHeunSolver,
    "ddim": DDIMSolver,
}


def _make_solver(solver: str | Solver, denoiser: Denoiser, options: dict[str, Any] | None,
                 noise_scheduler: NoiseScheduler, num_steps: int) -> Solver:
    if not isinstance(solver, str):
        if options:
            raise ValueError("solver_options must be None when solver is a Solver instance")
        if not hasattr(solver, "step"):
            raise ValueError(f"solver must be one of {sorted(SOLVERS)} or have a step method, got {solver!r}")
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)} or pass a Solver")
    cls, opts = SOLVERS[solver], dict(options or {})
    params = inspect.signature(cls).parameters
    if "num_steps" in params:  # churn is scaled by the actual number of steps
        opts.setdefault("num_steps", num_steps)
    if "noise_scheduler" in params and isinstance(noise_scheduler, cls.scheduler_type):
        opts.setdefault("noise_scheduler", noise_scheduler)
    return cls(denoiser, **opts)


def sample(
    denoiser: Denoiser,
    xN: Tensor,
    noise_scheduler: NoiseScheduler,
    num_steps: int,
    solver: Literal["euler", "heun", "edm_stochastic_euler", "edm_stochastic_heun", "ddim"] | Solver = "heun",
    time_steps: Tensor | None = None,
    solver_options: dict[str, Any] | None = None,
    on_step: StepHook | None = None,
) -> Tensor:
    """Integrate from ``xN`` (at ``time_steps[0]``) down to ``time_steps[-1]`` (0) and return x0.

    Args:
        denoiser: ``(x, t) -> update`` from ``noise_scheduler.get_denoiser(...)``.
        xN: initial latents [B, *] (``noise_scheduler.init_latents``); sets dtype and device.
        noise_scheduler: supplies ``timesteps(num_steps)`` unless ``time_steps`` is given.
        num_steps: number of steps N >= 1 (ignored when ``time_steps`` is given).
        solver: a key of :data:`SOLVERS` or a :class:`Solver` instance. For string keys,
            ``num_steps`` and (for the EDM stochastic and DDIM solvers) ``noise_scheduler`` are
            passed to the constructor unless given in ``solver_options``; e.g.
            ``solver_options={"S_churn": 40, "generator": 0}`` for a seeded stochastic run.
        time_steps: explicit decreasing times [N + 1], last one 0 for a clean sample.
        solver_options: keyword arguments for a solver given by key.
        on_step: ``on_step(i, t_cur, t_next, x)`` after every step i = 0..N-1, with 0-d times and
            the new state x at ``t_next`` (e.g. :func:`check_finite`, or appending to a trajectory).

    Under ``torch.no_grad()`` the state is detached between steps, so per-step graphs (DPS) do not
    accumulate.
    """
    if time_steps is None:
        check_num_steps(num_steps)
        t_steps = noise_scheduler.timesteps(num_steps, device=xN.device, dtype=xN.dtype)
    else:
        if time_steps.ndim != 1 or len(time_steps) < 2:
            raise ValueError(f"time_steps must be 1-D with at least 2 entries, got shape {tuple(time_steps.shape)}")
        t_steps = time_steps.to(device=xN.device, dtype=xN.dtype if time_steps.is_floating_point() else None)
    n = len(t_steps) - 1
    step = _make_solver(solver, denoiser, solver_options, noise_scheduler, n).step
    keep_graph, B, x = torch.is_grad_enabled(), xN.shape[0], xN
    for i in range(n):
        x = step(x, t_steps[i].repeat(B), t_steps[i + 1].repeat(B))
        if not keep_graph:
            x = x.detach()
        if on_step is not None:
            on_step(i, t_steps[i], t_steps[i + 1], x)
    return x


def check_finite(i: int, t_cur: Tensor, t_next: Tensor, x: Tensor) -> None:
    """An ``on_step`` hook raising ``FloatingPointError`` as soon as x holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"non-finite values in x after step {i} (t {float(t_cur):g} -> {float(t_next):g})")
