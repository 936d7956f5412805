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

from diffexport.diffusion.base import Denoiser, GeneratorLike, NoiseSource, batch_view, check_batch, require
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

    scheduler_type = LinearGaussianNoiseScheduler  # integrates a continuous-time ODE right-hand side

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

    scheduler_type = LinearGaussianNoiseScheduler

    def __init__(self, denoiser: Denoiser, alpha: float = 1.0) -> None:
        require(0 < alpha <= 1, "alpha", "in (0, 1]", alpha)
        self.denoiser, self.alpha = denoiser, alpha

    def step(self, x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
        _check_times(x, t_cur, t_next)
        h = batch_view(t_next - t_cur, x)
        d = self.denoiser(x, t_cur)
        x_euler = x + h * d
        last = t_next == 0
        if bool(last.all()):
            return x_euler
        # lerp is exact at alpha = 1 (t_prime = t_next): t_cur + (t_next - t_cur) can round to 0 in float32
        t_prime = torch.where(last, t_cur, torch.lerp(t_cur, t_next, self.alpha))
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
    RNG): the same seed gives the same trajectory bit for bit. ``round_sigma`` (the preconditioner's,
    e.g. ``IDDPMPreconditioner.round_sigma`` or :func:`~diffexport.diffusion.preconditioners.level_rounding`)
    rounds ``s_hat`` to a noise level the network was trained on where gamma > 0, as EDM and PhysicsNeMo's
    stochastic sampler do (None: identity, right for continuous preconditioners).
    """

    scheduler_type = LinearGaussianNoiseScheduler

    def __init__(self, ode: Solver, S_churn: float, S_min: float, S_max: float, S_noise: float, num_steps: int,
                 generator: GeneratorLike | NoiseSource, noise_scheduler: LinearGaussianNoiseScheduler | None,
                 round_sigma: Callable[[Tensor], Tensor] | None = None) -> None:
        check_num_steps(num_steps)
        require(S_churn >= 0, "S_churn", ">= 0", S_churn)
        require(S_min >= 0, "S_min", ">= 0", S_min)
        require(S_max >= S_min, "S_max", f">= S_min = {S_min}", S_max)
        require(S_noise >= 0, "S_noise", ">= 0", S_noise)
        self.ode, self.noise_scheduler, self.noise, self.round_sigma = ode, noise_scheduler, NoiseSource.of(generator), round_sigma
        self.S_churn, self.S_min, self.S_max, self.S_noise, self.num_steps = S_churn, S_min, S_max, S_noise, num_steps
        self.gamma = min(S_churn / num_steps, math.sqrt(2) - 1)

    def churn(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_hat, t_hat)``: x moved to the raised noise level."""
        ns = self.noise_scheduler
        s = t if ns is None else ns.edm_sigma(t)
        gamma = ((s >= self.S_min) & (s <= self.S_max)).to(s.dtype) * self.gamma
        s_hat = s * (1 + gamma)
        if self.round_sigma is not None:  # EDM: t_hat = net.round_sigma(t_cur + gamma t_cur)
            s_hat = torch.where(gamma > 0, self.round_sigma(s_hat), s_hat)
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
                 noise_scheduler: LinearGaussianNoiseScheduler | None = None,
                 round_sigma: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__(EulerSolver(denoiser), S_churn, S_min, S_max, S_noise, num_steps, generator, noise_scheduler, round_sigma)


class EDMStochasticHeunSolver(_EDMChurnSolver):
    """EDM churn followed by a :class:`HeunSolver` step (EDM Alg. 2). ``denoiser``: the ODE
    right-hand side, e.g. ``scheduler.get_denoiser(x0_predictor=...)``."""

    def __init__(self, denoiser: Denoiser, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                 S_noise: float = 1.0, num_steps: int = 18, generator: GeneratorLike = None, *,
                 noise_scheduler: LinearGaussianNoiseScheduler | None = None, alpha: float = 1.0,
                 round_sigma: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__(HeunSolver(denoiser, alpha), S_churn, S_min, S_max, S_noise, num_steps, generator, noise_scheduler,
                         round_sigma)


class DDIMSolver:
    """Discrete DDPM/DDIM chain: ``denoiser`` returns epsilon, :meth:`DDPMScheduler.step` updates.
    ``eta = 1`` over all T steps is DDPM ancestral sampling, ``eta = 0`` deterministic DDIM."""

    scheduler_type = DDPMScheduler

    def __init__(self, denoiser: Denoiser, noise_scheduler: DDPMScheduler, eta: float = 0.0,
                 generator: GeneratorLike | NoiseSource = None) -> None:
        require(0 <= eta <= 1, "eta", "in [0, 1]", eta)
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


#: solver constructor arguments the sampling loop supplies (never a recipe's ``solver_options``)
SUPPLIED = ("denoiser", "noise_scheduler", "num_steps", "generator", "round_sigma")


def solvers_for(scheduler: type | object) -> list[str]:
    """Names of the solvers that can integrate ``scheduler`` (a class or an instance)."""
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    return [name for name, solver in SOLVERS.items() if issubclass(cls, solver.scheduler_type)]


def check_fit(solver: str, scheduler: type | object) -> None:
    """``ValueError`` unless ``solver`` (a key of :data:`SOLVERS`) can integrate ``scheduler``."""
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    if solver in SOLVERS and not issubclass(cls, SOLVERS[solver].scheduler_type):
        need = SOLVERS[solver].scheduler_type.__name__
        raise ValueError(f"solver {solver!r} needs a {need} and {cls.__name__} is not one; "
                         f"for {cls.__name__} use one of: {', '.join(solvers_for(cls)) or '(none)'}")


def make_solver(solver: str | Solver, denoiser: Denoiser, options: dict[str, Any] | None,
                noise_scheduler: NoiseScheduler, num_steps: int) -> Solver:
    """The solver :func:`sample` steps with: ``SOLVERS[solver](denoiser, **options)`` plus the
    :data:`SUPPLIED` arguments its signature takes (or ``solver`` itself, a ``Solver``)."""
    if not isinstance(solver, str):
        if options:
            raise ValueError("solver_options must be None when solver is a Solver instance")
        if not hasattr(solver, "step"):
            raise ValueError(f"solver must be one of {sorted(SOLVERS)} or have a step method, got {solver!r}")
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)} or pass a Solver")
    check_fit(solver, noise_scheduler)
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
        xN: initial latents [B, *] (``noise_scheduler.init_latents``); sets the device and the dtype of
            the state, times, slopes and per-step noise (as PhysicsNeMo's ``sample``). Pass float64 latents
            for EDM's float64 loop over a float32 network (``edm_x0_predictor(denoiser_dtype=float32)``),
            as :func:`diffexport.runtime.sample` does.
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
    step = make_solver(solver, denoiser, solver_options, noise_scheduler, n).step
    keep_graph, B, x = torch.is_grad_enabled(), xN.shape[0], xN
    for i in range(n):
        x = step(x, t_steps[i].repeat(B), t_steps[i + 1].repeat(B))
        if not keep_graph:
            x = x.detach()
        if on_step is not None:
            on_step(i, t_steps[i], t_steps[i + 1], x)
    return x


def round_time_steps(noise_scheduler: NoiseScheduler, time_steps: Tensor, round_sigma: Callable[[Tensor], Tensor] | None) -> Tensor:
    """``time_steps`` [N + 1] at the noise levels ``round_sigma`` (the preconditioner's) rounds them to, the final
    entry kept: EDM's ``t_steps = sigma_inv(net.round_sigma(sigma_steps))`` (``generate.py``, as PhysicsNeMo's
    stochastic sampler), so a preconditioner with discrete levels (iDDPM) is only called at its levels, whatever
    the discretisation. Unchanged without ``round_sigma`` or for a discrete (integer-time) schedule; iDDPM's own
    u_j steps are levels already."""
    if round_sigma is None or not time_steps.is_floating_point() or not isinstance(noise_scheduler, LinearGaussianNoiseScheduler):
        return time_steps
    head = time_steps[:-1]
    rounded = noise_scheduler.edm_sigma_inv(round_sigma(noise_scheduler.edm_sigma(head)))
    return torch.cat([rounded.to(time_steps.dtype), time_steps[-1:]])


def check_finite(i: int, t_cur: Tensor, t_next: Tensor, x: Tensor) -> None:
    """An ``on_step`` hook raising ``FloatingPointError`` as soon as x holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"non-finite values in x after step {i} (t {float(t_cur):g} -> {float(t_next):g})")


def ddpm_sample(scheduler: DDPMScheduler, model: Callable[[Tensor, Tensor], Tensor], shape: tuple[int, ...],
                num_steps: int | None = None, *, eta: float = 1.0, generator: GeneratorLike = None, device=None,
                dtype=torch.float32, on_step: StepHook | None = None) -> Tensor:
    """Sample ``shape = (B, *)`` from ``scheduler``'s chain with an epsilon-predicting ``model(x, t_int [B])``.

    ``num_steps=None, eta=1``: DDPM ancestral sampling over all T steps; ``eta=0``: DDIM.
    ``generator`` (Generator or int seed) drives x_T and the per-step noise.
    """
    noise = NoiseSource(generator)
    x_T = noise.randn_like(torch.empty(shape, device=device, dtype=dtype))
    ts = scheduler.timesteps(num_steps, device=x_T.device)
    denoiser = scheduler.get_denoiser(epsilon_predictor=model)
    solver = DDIMSolver(denoiser, scheduler, eta=eta, generator=noise)
    return sample(denoiser, x_T, scheduler, len(ts) - 1, solver=solver, time_steps=ts, on_step=on_step)


def _at(fn: Callable[[Tensor], Tensor], t: float) -> float:
    return float(fn(torch.tensor([t], dtype=torch.float64))[0])


def _ode_eval(scheduler: LinearGaussianNoiseScheduler, t: float) -> dict[str, float]:
    """The ODE slope at ``t`` as ``c_x x + c_d D(in_scale x, sigma)``: with ``f = alpha'/alpha``,
    ``g^2 = 2 sigma' sigma - 2 f sigma^2`` and ``c = g^2 / (2 sigma^2)``, ``c_x = f + c``, ``c_d = -c alpha``."""
    a, s = _at(scheduler.alpha, t), _at(scheduler.sigma, t)
    f, s_dot = _at(scheduler.alpha_dot, t) / a, _at(scheduler.sigma_dot, t)
    c = (2 * s_dot * s - 2 * f * s**2) / (2 * s**2)
    return {"t": t, "sigma": _at(scheduler.edm_sigma, t), "in_scale": 1 / a, "c_x": f + c, "c_d": -c * a}


def _churn(solver: _EDMChurnSolver, scheduler: LinearGaussianNoiseScheduler, t: float) -> dict[str, float] | None:
    s = _at(scheduler.edm_sigma, t)
    if not (solver.gamma > 0 and solver.S_min <= s <= solver.S_max):
        return None
    s_hat = s * (1 + solver.gamma)
    if solver.round_sigma is not None:
        s_hat = _at(solver.round_sigma, s_hat)
    t_hat = _at(scheduler.edm_sigma_inv, s_hat)
    a, a_hat = _at(scheduler.alpha, t), _at(scheduler.alpha, t_hat)
    return {"t_hat": t_hat, "x_scale": a_hat / a, "noise_scale": a_hat * math.sqrt(max(s_hat**2 - s**2, 0.0)) * solver.S_noise}


def step_table(scheduler: NoiseScheduler, solver: str, time_steps: Tensor, options: dict[str, Any] | None = None,
               round_sigma: Callable[[Tensor], Tensor] | None = None) -> list[dict]:
    """Every step of :func:`sample` with solver ``solver`` as plain numbers, for runtimes without
    this package (the C++ runner); the format is ``sampler.steps`` of ``docs/ENGINE_FORMAT.md``.

    ODE solvers: ``{"t_cur", "t_next", "churn", "h", "evals", ["a21"], "b"}``, each eval a slope
    ``c_x x + c_d D(in_scale x, sigma)``; ``x_next = x_0 + h sum_k b_k d_k``. ``ddim``:
    ``{"t_cur", "t_next", "evals", "ddim": {"c_x", "c_x0", "c_noise"}}``, ``x_next = c_x x + c_x0 x0 + c_noise z``.
    ``round_sigma``: the preconditioner's, for the churned noise levels (as :class:`EDMStochasticHeunSolver` takes it).
    """
    check_fit(solver, scheduler)
    n = len(time_steps) - 1
    ts = time_steps.tolist()
    cls = SOLVERS.get(solver)
    supplied = {"round_sigma": round_sigma} if round_sigma is not None and cls and "round_sigma" in inspect.signature(cls).parameters else {}
    obj = make_solver(solver, lambda x, t: x, {**(options or {}), **supplied}, scheduler, n)
    table = []
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        if isinstance(obj, DDIMSolver):
            table.append(_ddim_step(obj, t_cur, t_next))
            continue
        churn = _churn(obj, scheduler, t_cur) if isinstance(obj, _EDMChurnSolver) else None
        t0 = churn["t_hat"] if churn else t_cur
        h = t_next - t0
        heun = obj.ode if isinstance(obj, _EDMChurnSolver) else obj
        step = {"t_cur": t_cur, "t_next": t_next, "churn": churn, "h": h, "evals": [_ode_eval(scheduler, t0)]}
        if isinstance(heun, HeunSolver) and t_next != 0:
            w = 1 / (2 * heun.alpha)
            step.update(a21=heun.alpha, b=[1 - w, w])
            step["evals"].append(_ode_eval(scheduler, t_next if heun.alpha == 1 else t0 + heun.alpha * h))
        else:
            step["b"] = [1.0]
        table.append(step)
    return table


def _ddim_step(solver: DDIMSolver, t_cur: int, t_next: int) -> dict:
    ns = solver.noise_scheduler
    ab_t, ab_p = (float(ns.alpha_bar(torch.tensor([t]))[0]) for t in (t_cur, t_next))
    s = solver.eta * math.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))
    k = math.sqrt(max(1 - ab_p - s**2, 0.0))
    a_t, s_t = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    evals = [{"t": t_cur, "sigma": s_t / a_t, "in_scale": 1 / a_t}]
    return {"t_cur": t_cur, "t_next": t_next, "evals": evals,
            "ddim": {"c_x": k / s_t, "c_x0": math.sqrt(ab_p) - k * a_t / s_t, "c_noise": s if solver.eta else 0.0}}


def sample_step_table(denoiser_fn: Callable[[Tensor, Tensor], Tensor], xN: Tensor, steps: list[dict],
                      generator: torch.Generator | None = None, denoiser_dtype: torch.dtype | None = None) -> Tensor:
    """Run a :func:`step_table` with an EDM denoiser ``D(x, sigma [B])`` (an engine): the reference
    for runtimes that read ``manifest["sampler"]["steps"]``. As in :func:`sample`, xN's dtype is the
    state's (float64 in :func:`diffexport.runtime.sample`); D gets x and sigma in ``denoiser_dtype``
    (float32 for an engine; None: the state's) and its output is cast back. Noise is drawn as
    :func:`sample` draws it (one ``randn`` in the state's dtype per step of a churning or ``eta > 0``
    solver), so with the same ``generator`` the two agree to float rounding."""
    x, B = xN, xN.shape[0]
    dtype = denoiser_dtype or xN.dtype
    stochastic = any(s.get("churn") for s in steps) or any(s.get("ddim", {}).get("c_noise") for s in steps)

    def D(x: Tensor, e: dict) -> Tensor:
        sigma = torch.full((B,), e["sigma"], dtype=dtype, device=x.device)
        return denoiser_fn((e["in_scale"] * x).to(dtype), sigma).to(x.dtype)

    for step in steps:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if stochastic else None
        if "ddim" in step:
            c = step["ddim"]
            x = c["c_x"] * x + c["c_x0"] * D(x, step["evals"][0]) + (c["c_noise"] * z if c["c_noise"] else 0)
            continue
        if step["churn"]:
            x = step["churn"]["x_scale"] * x + step["churn"]["noise_scale"] * z
        slopes, x_k = [], x
        for k, e in enumerate(step["evals"]):
            if k:
                x_k = x + step["a21"] * step["h"] * slopes[0]
            slopes.append(e["c_x"] * x_k + e["c_d"] * D(x_k, e))
        x = x + step["h"] * sum(b * d for b, d in zip(step["b"], slopes))
    return x
