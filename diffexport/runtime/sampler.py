"""Sample with an engine through the sampler its manifest records.

The solver math is :func:`diffexport.diffusion.samplers.sample`; this module only assembles its
arguments from ``manifest["sampler"]`` and turns the engine into the solver's denoiser::

    engine -> [CUDA graph] -> batch chunks -> NaN/Inf guard -> edm_x0_predictor(·, scheduler)
           -> [patch-wise, fused] -> scheduler.get_denoiser -> diffusion.samplers.sample

Precision, as EDM's ``generate.py``: the solver state (x, the time steps, slopes and their
combination) is float64; each engine call gets float32 x and sigma and its output is cast back
(``edm_x0_predictor(denoiser_dtype=float32)``); the samples returned are float32. A float32 state lost
about sigma_max * 6e-8 of x per step to cancellation (2 EDM Heun steps from 80: 1e-5 to 5e-4 of the sample).

Randomness comes from one seeded ``torch.Generator`` on the engine's device: it draws the initial
latents (float32, unless given) and then every per-step noise of a stochastic solver (float64, in the
state's dtype), so a seed fixes the
samples bit for bit on a given device. With a list of seeds (:class:`GroupNoise`), each group of
rows has its own generator, so a sample does not depend on what it was batched with (Triton).

Patching and positional embeddings: PhysicsNeMo's patch-trained ``SongUNetPosEmbd`` spans the
global grid and takes each patch's ``global_index`` (the coordinates of its pixels in the full
image) to pick its positional embedding. An engine built with ``sampler.patching.global_index``
has that input (int64 [B, 2, h, w], one grid per sample): it is filled here from
``GridPatching2D.global_index``, never by the caller. Without it, an exported ``SongUNetPosEmbd``
applies the embedding of its own patch-sized grid to every patch (right only for a model trained
on whole images of the engine's size).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from diffexport.diffusion import noise_schedulers, preconditioners, samplers
from diffexport.diffusion.base import NoiseSource
from diffexport.diffusion.guidance import JointClassifierFreeGuidance
from diffexport.diffusion.utils import edm_x0_predictor
from diffexport.engines.base import Engine, index_range_error
from diffexport.runtime.batching import BatchedEngine
from diffexport.runtime.cuda_graphs import CUDAGraphEngine
from diffexport.runtime.guards import FiniteGuard
from diffexport.runtime.inputs import condition_specs, global_index_spec

StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Any]
_DTYPES = {"float32": torch.float32, "int64": torch.int64}
ENGINE_DTYPE = torch.float32  # the engines' x, sigma and denoised (docs/ENGINE_FORMAT.md)
STATE_DTYPE = torch.float64  # the solver state, as EDM's generate.py keeps it


def make_rounding(spec: dict | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``manifest["sampler"]["round_sigma"]`` (``{"class", "args"}`` of the preconditioner) -> the nearest-level
    rounding of its noise levels that the stochastic solvers apply to churned levels; None: no rounding."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("args", {}), dict):
        raise ValueError(f"sampler.round_sigma: expected {{class, args}}, got {spec!r}")
    try:
        return preconditioners.sigma_rounding(str(spec.get("class")), spec.get("args", {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampler.round_sigma: {e}") from None


def make_scheduler(spec: dict) -> Any:
    """``{"class": name, "args": {...}}`` -> that class of :mod:`diffexport.diffusion.noise_schedulers`."""
    cls = getattr(noise_schedulers, spec.get("class", ""), None)
    if not isinstance(cls, type):
        raise ValueError(f"sampler.scheduler.class: {spec.get('class')!r} is not a noise scheduler of diffexport.diffusion")
    return cls(**spec.get("args", {}))


@dataclass(frozen=True)
class SamplerSpec:
    """What :func:`sample` runs: scheduler, solver and options, the N + 1 times, and patching."""

    scheduler: Any
    solver: str
    time_steps: torch.Tensor  # [N + 1], decreasing, last 0
    solver_options: dict = field(default_factory=dict)
    patching: dict | None = None
    guidance: float | None = None  # classifier-free guidance scale (manifest sampler.guidance.cfg)
    clip: tuple[float, float] | None = None  # the data range the final samples are clamped to
    round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None  # the preconditioner's levels, for churned ones

    @property
    def num_steps(self) -> int:
        return len(self.time_steps) - 1

    @classmethod
    def from_manifest(cls, sampler: dict) -> SamplerSpec:
        """From ``manifest["sampler"]``: its scheduler, solver, options, patching and ``time_steps``."""
        scheduler, rounding = make_scheduler(sampler["scheduler"]), make_rounding(sampler.get("round_sigma"))
        if (ts := sampler.get("time_steps")) is not None:  # integers for discrete schedules (DDPM)
            times = torch.tensor(ts, dtype=torch.int64 if all(isinstance(t, int) for t in ts) else torch.float64)
        else:
            times = samplers.round_time_steps(scheduler, scheduler.timesteps(int(sampler["num_steps"]), dtype=torch.float64), rounding)
        return cls(scheduler, sampler["solver"], times, dict(sampler.get("solver_options") or {}), sampler.get("patching"),
                   (sampler.get("guidance") or {}).get("cfg"), tuple(sampler["clip"]) if sampler.get("clip") else None, rounding)

    def with_steps(self, num_steps: int) -> SamplerSpec:
        """The same sampler with the schedule re-discretised into ``num_steps`` steps (at the preconditioner's
        noise levels when it has them, as the build's)."""
        times = samplers.round_time_steps(self.scheduler, self.scheduler.timesteps(num_steps, dtype=torch.float64), self.round_sigma)
        return replace(self, time_steps=times)

    def edm_sigmas(self) -> torch.Tensor:
        """The EDM noise level the engine receives at each time step (float64, [N + 1])."""
        return self.scheduler.edm_sigma(self.time_steps.double()).double()


def image_shape(engine: Engine, spec: SamplerSpec) -> tuple[int, int, int]:
    """(C, H, W) of a sample: the engine's ``x`` or, with patching, the full image."""
    c, h, w = engine.io.inputs[0].shape[1:]
    if spec.patching:
        h, w = spec.patching["img_shape"]
    return c, h, w


def check_conditions(engine: Engine, conditions: dict[str, torch.Tensor] | None, batch: int,
                     image_hw: tuple[int, int] | None = None, sources: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``conditions`` by engine input name, each ``[batch, *shape]`` with the engine's dtype, on its device.

    A condition given without its batch axis, or with batch 1, is repeated over the batch. With
    patching, ``image_hw`` is the full image size that image conditions must have; index conditions
    must lie in their io range ``[0, high)``. ``sources``
    (e.g. file names by condition) prefix the ``ValueError`` messages.
    """
    conditions = dict(conditions or {})
    specs = condition_specs(engine)
    names = [s.name for s in specs]
    unknown, missing = sorted(set(conditions) - set(names)), [n for n in names if n not in conditions]
    if unknown or missing:
        raise ValueError(f"conditions: the engine takes {names or 'none'}; missing {missing or '-'}, unexpected {unknown or '-'}")
    out = {}
    for spec in specs:
        where = f"{sources[spec.name]}: " if sources and spec.name in sources else ""
        t = torch.as_tensor(conditions[spec.name])
        want = list(spec.shape[1:])
        if spec.kind == "image" and image_hw is not None:
            want[-2:] = image_hw
        if list(t.shape) == want:
            t = t.unsqueeze(0)
        if t.ndim == len(want) + 1 and t.shape[0] == 1 and batch > 1 and list(t.shape[1:]) == want:
            t = t.expand(batch, *want)
        if list(t.shape) != [batch, *want]:
            raise ValueError(f"{where}condition '{spec.name}' ({spec.kind}) must have shape {[batch, *want]} or {want}, got {list(t.shape)}")
        dtype = _DTYPES[spec.dtype]
        if dtype == torch.int64 and t.is_floating_point() and not bool((t == t.round()).all()):
            raise ValueError(f"{where}condition '{spec.name}' is an index (int64) but holds non-integer values")
        if why := index_range_error(spec, t):
            raise ValueError(f"{where}condition {why}")
        out[spec.name] = t.to(device=engine.device, dtype=dtype).contiguous()
    return out


def one_hot_condition(engine: Engine, labels: list[int], batch: int | None = None, name: str | None = None) -> tuple[str, torch.Tensor]:
    """``(name, one-hot [batch, K])``: class ``labels`` for the engine's vector condition (or the one
    called ``name``), cycled over ``batch`` rows (default: one row per label). ``ValueError`` when the
    engine has no such vector condition or a label is outside 0..K-1."""
    vectors = [s for s in condition_specs(engine) if s.kind == "vector" and (name is None or s.name == name)]
    if not vectors:
        raise ValueError(f"class labels need a vector condition{f' named {name!r}' if name else ''}; the engine takes "
                         f"{[f'{s.name} ({s.kind})' for s in condition_specs(engine)] or 'none'}")
    spec, k = vectors[0], vectors[0].shape[-1]
    if not labels or any(not 0 <= v < k for v in labels):
        raise ValueError(f"condition '{spec.name}': class labels must be integers in 0..{k - 1}, got {labels}")
    rows = torch.tensor(labels).repeat(-(-(batch or len(labels)) // len(labels)))[: batch or len(labels)]
    return spec.name, torch.nn.functional.one_hot(rows, k).float()


def _condition_batch(engine: Engine, conditions: dict[str, torch.Tensor] | None) -> int:
    """The batch of the first condition given with its batch axis (1 when none is)."""
    for spec in condition_specs(engine):
        t = (conditions or {}).get(spec.name)
        if t is not None and t.ndim == len(spec.shape):
            return int(t.shape[0])
    return 1


class GroupNoise(NoiseSource):
    """Noise for a batch whose consecutive row groups each draw from their own seeded generator:
    group k (``rows[k]`` rows) from ``seeds[k]``, exactly as if it were sampled alone with that
    seed. One group is the plain single-generator stream of ``sample(seed=...)``."""

    def __init__(self, seeds: Sequence[int], rows: Sequence[int], device: torch.device) -> None:
        if len(seeds) != len(rows) or any(n < 1 for n in rows):
            raise ValueError(f"seeds: {len(seeds)} seeds for row groups {list(rows)}; need one seed per group of >= 1 rows")
        super().__init__(None)
        self.rows = list(rows)
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.generator = self.generators[0]

    def _draw(self, fn, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 0 or x.shape[0] != sum(self.rows):
            raise ValueError(f"seeds: noise for a batch of {list(x.shape)[:1]} rows, the seed groups cover {sum(self.rows)}")
        if len(self.generators) == 1:
            return fn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return torch.cat([fn((n, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype) for g, n in zip(self.generators, self.rows)])


def initial_latents(spec: SamplerSpec, shape: tuple[int, ...], generator: torch.Generator | GroupNoise, device: torch.device) -> torch.Tensor:
    """``scheduler.init_latents`` at the first time step: ε·α(t₀)σ(t₀) (σ_max·ε for EDM/VE, about ε for VP/DDPM), [B, C, H, W] float32
    (each row group from its own generator with :class:`GroupNoise`)."""
    if isinstance(generator, GroupNoise):
        return torch.cat([initial_latents(spec, (n, *shape[1:]), g, device) for g, n in zip(generator.generators, generator.rows)])
    t0 = spec.time_steps[0].to(device).expand(shape[0])
    return spec.scheduler.init_latents(tuple(shape[1:]), t0, generator, device=device, dtype=torch.float32)


def _solver_options(spec: SamplerSpec, generator: torch.Generator | GroupNoise) -> dict:
    """The recipe's solver options, plus the generator when the solver draws noise and none is set, and
    the preconditioner's ``round_sigma`` for a churning solver."""
    opts = dict(spec.solver_options)
    cls = samplers.SOLVERS.get(spec.solver)
    params = inspect.signature(cls).parameters if cls is not None else {}
    if "generator" in params and opts.get("generator") is None:
        opts["generator"] = generator
    if "round_sigma" in params and spec.round_sigma is not None:
        opts["round_sigma"] = spec.round_sigma
    return opts


def engine_predictor(engine: Engine, spec: SamplerSpec, conditions: dict[str, torch.Tensor], *, chunk: int | None = None,
                     check_finite: bool = True, cuda_graph: bool = False) -> tuple[Callable[..., torch.Tensor], FiniteGuard | None]:
    """The engine as the solvers' x0-predictor ``(x_t, t) -> x0`` on full-size images, and its NaN/Inf
    guard (whose :meth:`FiniteGuard.on_step` must see every step; None when not checking).

    Any batch (chunked to the engine's range); with ``spec.patching`` the image is cut into the
    engine's patch size (:class:`~diffexport.diffusion.multi_diffusion.GridPatching2D`), image
    conditions with it, other conditions repeated per patch, and the patch outputs fused. An engine
    with a ``global_index`` input gets each patch's global pixel coordinates with it.
    """
    d: Any = BatchedEngine(CUDAGraphEngine(engine) if cuda_graph else engine, chunk)
    guard = FiniteGuard(d) if check_finite else None
    d = guard or d
    gi_spec = global_index_spec(engine)
    if not spec.patching:
        if gi_spec is not None:
            raise ValueError(f"engine input '{gi_spec.name}' needs patch-wise sampling, but the sampler has no patching")
        if spec.guidance is None or spec.guidance == 1:
            return edm_x0_predictor(d, spec.scheduler, denoiser_dtype=ENGINE_DTYPE, **conditions), guard
        # classifier-free guidance: conditional and unconditional rows (class labels zeroed) in one call
        vectors = {s.name for s in condition_specs(engine) if s.kind == "vector"}
        both = {k: torch.cat([v, v.new_zeros(v.shape) if k in vectors else v]) for k, v in conditions.items()}
        return JointClassifierFreeGuidance(edm_x0_predictor(d, spec.scheduler, denoiser_dtype=ENGINE_DTYPE, **both), spec.guidance), guard
    if spec.guidance is not None and spec.guidance != 1:
        raise ValueError("sampler.guidance: classifier-free guidance is not supported with patching")
    from tensordict import TensorDict

    from diffexport.diffusion.multi_diffusion import GridPatching2D, PatchBasedPredictor

    p, patch = spec.patching, tuple(engine.io.inputs[0].shape[2:])
    if any(i < s for i, s in zip(p["img_shape"], patch)):  # GridPatching2D would crop the patches to the image
        raise ValueError(f"sampler.patching.img_shape: {list(p['img_shape'])} is smaller than the engine's {patch[0]}x{patch[1]} patch")
    patching = GridPatching2D(tuple(p["img_shape"]), patch, p.get("overlap_pix", 0), p.get("boundary_pix", 0))
    per_patch = edm_x0_predictor(d, spec.scheduler, denoiser_dtype=ENGINE_DTYPE)

    def predictor(x: torch.Tensor, t: torch.Tensor, condition: TensorDict | None = None, **kw: Any) -> torch.Tensor:
        return per_patch(x, t, **(dict(condition.items()) if condition is not None else {}), **kw)

    batch = next(iter(conditions.values())).shape[0] if conditions else None
    condition = TensorDict(conditions, batch_size=[batch]) if conditions else None
    return PatchBasedPredictor(predictor, patching.to(engine.device), condition=condition, pass_global_index=gi_spec is not None), guard


@torch.no_grad()
def sample(
    engine: Engine,
    sampler: SamplerSpec | dict,
    *,
    batch: int | None = None,
    seed: int | Sequence[int] = 0,
    seed_rows: Sequence[int] | None = None,
    latents: torch.Tensor | None = None,
    conditions: dict[str, torch.Tensor] | None = None,
    num_steps: int | None = None,
    chunk: int | None = None,
    check_finite: bool = True,
    cuda_graph: bool = False,
    on_step: StepHook | None = None,
    condition_sources: dict[str, str] | None = None,
    guidance: float | None = None,
) -> torch.Tensor:
    """Samples ``[N, C, H, W]`` (float32, on the engine's device) from ``engine``.

    Args:
        engine: any :class:`~diffexport.engines.base.Engine`.
        sampler: ``manifest["sampler"]`` or a :class:`SamplerSpec`.
        batch: number of samples N (default: the batch of ``latents``, else of ``conditions``, else 1).
        seed: seeds the generator of the initial latents and of the per-step noise; a list gives each
            group of rows its own generator (:class:`GroupNoise`), as if each were sampled alone.
        seed_rows: rows per seed of a ``seed`` list (default: one row per seed).
        latents: explicit initial state x at the first time step, [N, C, H, W]: ε scaled by the manifest's
            ``alphas[0] * sigmas[0]`` (σ_max for EDM/VE, about 1 for VP and DDPM).
        conditions: engine condition inputs by name, [N, ...] (or one, repeated over N).
        num_steps: re-discretise the schedule with this many steps.
        chunk: rows per engine call (default: the engine's ``batch.max``).
        check_finite: stop with :class:`~diffexport.runtime.guards.SamplingError` at the first NaN/Inf.
        cuda_graph: replay each engine call from a CUDA graph (CUDA engines, static shapes).
        on_step: ``on_step(i, t_cur, t_next, x)`` after every step (x: the float64 state).
        condition_sources: where each condition came from (e.g. a file), named in shape errors.
        guidance: classifier-free guidance scale replacing the recipe's ``sampler.guidance.cfg``.
    """
    spec = sampler if isinstance(sampler, SamplerSpec) else SamplerSpec.from_manifest(sampler)
    if num_steps is not None and num_steps != spec.num_steps:
        spec = spec.with_steps(num_steps)
    if guidance is not None:
        spec = replace(spec, guidance=guidance)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1):
        raise ValueError(f"batch must be an int >= 1 (the number of samples), got {batch!r}")
    device = engine.device
    c, h, w = image_shape(engine, spec)
    if batch is None and latents is None:
        batch = _condition_batch(engine, conditions) if isinstance(seed, int) else sum(seed_rows or [1] * len(seed))
    if isinstance(seed, int):
        generator: torch.Generator | GroupNoise = torch.Generator(device=device).manual_seed(seed)
    else:
        generator = GroupNoise(seed, [1] * len(seed) if seed_rows is None else seed_rows, device)
    if latents is None:
        latents = initial_latents(spec, (batch or 1, c, h, w), generator, device)
    else:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != (c, h, w) or (batch is not None and latents.shape[0] != batch):
            raise ValueError(f"latents must have shape [{batch or 'N'}, {c}, {h}, {w}], got {list(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)
    n = latents.shape[0]
    if isinstance(generator, GroupNoise) and sum(generator.rows) != n:
        raise ValueError(f"seed: the seed groups cover {sum(generator.rows)} rows, the batch has {n}")
    conds = check_conditions(engine, conditions, n, (h, w) if spec.patching else None, condition_sources)
    predictor, guard = engine_predictor(engine, spec, conds, chunk=chunk, check_finite=check_finite, cuda_graph=cuda_graph)
    hooks = [f for f in (guard and guard.on_step, on_step) if f is not None]

    def hook(i: int, t_cur: torch.Tensor, t_next: torch.Tensor, x: torch.Tensor) -> None:
        for f in hooks:
            f(i, t_cur, t_next, x)

    denoiser = spec.scheduler.get_denoiser(x0_predictor=predictor)
    x = samplers.sample(denoiser, latents.to(STATE_DTYPE), spec.scheduler, spec.num_steps, solver=spec.solver,
                        time_steps=spec.time_steps, solver_options=_solver_options(spec, generator), on_step=hook).float()
    return x.clamp_(*spec.clip) if spec.clip else x
