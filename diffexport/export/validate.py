"""The one recipe validation: a recipe checked whole against the code it names, before any work.

``validate_recipe(path)`` = ``check_recipe(load_recipe(path))``; every build runs it first. What is
checked, each failure one line ``<file>: <field path>: <what is allowed>``:

* model: with a checkpoint, its class and args merged in (:func:`~diffexport.export.denoiser.resolve_model`:
  a ``.mdlus``'s args.json, ``model.args`` over it); the class exists, takes those args (names, types),
  and its constructor plus one shape-only forward (meta device, the recipe's engine inputs) accept them;
* preconditioner and ``sampler.scheduler``: names, types and ranges of their args (the classes'
  own checks, :class:`~diffexport.diffusion.base.ArgumentError`), and a finite, decreasing schedule;
* solver and scheduler fit (:func:`~diffexport.diffusion.samplers.check_fit`, from each solver's
  ``scheduler_type``); ``sampler.solver_options`` against the solver's signature and ranges;
* patching: the grid the runtime will cut (:class:`~diffexport.diffusion.multi_diffusion.GridPatching2D`);
* ``export.precision`` against each named target (:func:`~diffexport.export.precision_unsupported`);
* non-finite numbers anywhere (``S_max``'s default +inf is had by leaving it out).

Types and ranges of the schema's own fields (batch sizes, opset, ...) are checked when loading
(:mod:`diffexport.recipes.schema`).
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from diffexport.checkpoints import CheckpointError
from diffexport.diffusion import noise_schedulers, preconditioners, samplers
from diffexport.diffusion.base import ArgumentError
from diffexport.diffusion.multi_diffusion import GridPatching2D
from diffexport.models import get_model_class, model_names
from diffexport.recipes import Recipe, RecipeError, image_shape, io_spec, load_recipe, parse_recipe, resolve_path

__all__ = ["check_recipe", "validate_recipe", "resolved_args", "scheduler_of"]


def validate_recipe(source: str | Path | dict) -> Recipe:
    """A recipe file (or mapping) loaded and checked whole; ``RecipeError`` with one line per problem."""
    recipe = parse_recipe(source) if isinstance(source, dict) else load_recipe(source)
    return check_recipe(recipe)


def _params(target: Callable, skip: int) -> list[inspect.Parameter]:
    return list(inspect.signature(target).parameters.values())[skip:]


def resolved_args(target: Callable, args: dict, skip: int = 0, supplied: tuple[str, ...] = ()) -> dict:
    """``args`` with every other keyword default of ``target`` filled in (minus ``supplied`` ones)."""
    out = {}
    for p in _params(target, skip):
        if p.name in args:
            out[p.name] = args[p.name]
        elif p.default is not p.empty and p.name not in supplied and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[p.name] = p.default
    return out


def _hints(target: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # unresolvable annotations: names are still checked
        return {}


def _type_problem(field: str, name: str, hint: Any, value: Any) -> str | None:
    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as e:
        return f"{field}.{name}: must be {getattr(hint, '__name__', hint)}, got {value!r} ({e.errors()[0]['msg']})"
    except Exception:  # a hint pydantic cannot check (a tensor, a callable): leave it to the constructor
        return None
    return None


def _finite_problems(field: str, value: Any, default: Any) -> list[str]:
    """NaN or inf anywhere (saying so when the parameter's default is the infinity asked for)."""
    if isinstance(value, float):
        if math.isnan(value):
            return [f"{field}: must be a number, got nan"]
        if math.isinf(value):  # (the manifest is strict JSON; an infinite default is had by leaving the key out)
            hint = f"; leave it out for its default ({default})" if isinstance(default, float) and math.isinf(default) else ""
            return [f"{field}: must be finite, got {value}{hint}"]
        return []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _finite_problems(f"{field}.{k}", v, None)]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _finite_problems(f"{field}[{i}]", v, None)]
    return []


def _call_problems(field: str, target: Callable, args: dict, skip: int = 0, supplied: dict[str, str] | None = None) -> list[str]:
    """Arguments of ``args`` that ``target`` does not take, lacks, or takes with another type."""
    supplied = supplied or {}
    params = _params(target, skip)
    name = getattr(target, "__name__", str(target))
    problems = [f"{field}.{k}: {why}" for k, why in supplied.items() if k in args]
    args = {k: v for k, v in args.items() if k not in supplied}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return problems
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in supplied]
    unknown = sorted(set(args) - set(names))
    missing = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL and p.name not in args and p.name not in supplied]
    if unknown:
        problems.append(f"{field}: unknown argument(s) {', '.join(unknown)} for {name}; expected some of: {', '.join(names)}")
    if missing:
        problems.append(f"{field}: {name} needs {', '.join(missing)}")
    hints, defaults = _hints(target), {p.name: p.default for p in params}
    for k, v in args.items():
        if k in defaults and not (bad := _finite_problems(f"{field}.{k}", v, defaults[k])):
            bad = [p] if k in hints and (p := _type_problem(field, k, hints[k], v)) else []
        problems += bad if k in defaults else []
    return problems


def _construct(field: str, what: str, make: Callable[[], Any], names: Any = ()) -> tuple[Any, list[str]]:
    """``make()`` and no problems, or ``None`` and the one line saying why it refused (naming the
    argument when the message starts with one of ``names``)."""
    try:
        return make(), []
    except ArgumentError as e:
        return None, [f"{field}.{e.name}: {what}: must be {e.requirement}, got {e.value!r}"]
    except Exception as e:  # a constructor's own refusal, whatever its type
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if (m := re.match(r"(\w+): (.+)", msg)) and m[1] in names:  # "<argument>: <why>"
            return None, [f"{field}.{m[1]}: {what}: {m[2]}"]
        return None, [f"{field}: {what} rejects these arguments: {msg}"]


class _Backbone(nn.Module):
    """The wrapped model where the preconditioner would be: ``(x, sigma, condition) -> F``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, condition: Any = None) -> torch.Tensor:
        return self.model(x, sigma, condition)


def _model_problems(recipe: Recipe) -> list[str]:
    m = recipe.model
    if m.class_name not in model_names():
        return [f"model.class: unknown model class {m.class_name!r}; expected one of {', '.join(model_names())}"]
    cls = get_model_class(m.class_name)
    if problems := _call_problems("model.args", cls, m.args):
        return problems
    try:
        image_shape(recipe)
    except ValueError as e:  # (parse_recipe reports these already unless the args came with a checkpoint)
        return [str(e)]
    import tensordict  # noqa: F401  (imported lazily elsewhere; its import runs tensor code, not to be done on meta)

    from diffexport.diffusion.utils import ConcatConditionWrapper
    from diffexport.export.denoiser import Denoiser

    with torch.device("meta"):
        model, problems = _construct("model.args", m.class_name, lambda: cls(**m.args), m.args)
    if problems or m.class_name == "UNet":  # UNet: refused by build_denoiser with its own message
        return problems
    model, io = model.to("meta").eval(), io_spec(recipe)  # (buffers some constructors build on the CPU); eval as exported
    conditions = io.inputs[2:]
    wrapped = ConcatConditionWrapper(model, kwarg_keys=[c.name for c in conditions if c.kind in ("index", "global_index")])
    shaped = Denoiser(_Backbone(wrapped), conditions, getattr(model, "lead_time_steps", 1))
    inputs = [torch.zeros([2, *s.shape[1:]], dtype=getattr(torch, s.dtype), device="meta") for s in io.inputs]
    try:
        with torch.device("meta"):  # tensors the forward creates are shape-only too
            out = shaped(*inputs)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [f"model.args: {m.class_name} cannot run on the engine's inputs {[s.shape for s in io.inputs]}: {msg}"]
    if list(out.shape[1:]) != io.outputs[0].shape[1:]:
        return [f"model.args: {m.class_name} returns {list(out.shape[1:])} per sample, the engine needs {io.outputs[0].shape[1:]} (out_channels)"]
    return []


def _preconditioner_problems(recipe: Recipe) -> list[str]:
    spec = recipe.preconditioner
    if (cls := getattr(preconditioners, spec.class_name, None)) is None:
        return [f"preconditioner.class: {spec.class_name!r} is not in diffexport.diffusion.preconditioners"]
    return _call_problems("preconditioner.args", cls, spec.args, skip=1) or \
        _construct("preconditioner.args", spec.class_name, lambda: cls(nn.Identity(), **spec.args))[1]


def _scheduler(recipe: Recipe) -> tuple[Any, list[str]]:
    s = recipe.sampler.scheduler
    if (cls := getattr(noise_schedulers, s.class_name, None)) is None:
        return None, [f"sampler.scheduler.class: {s.class_name!r} is not in diffexport.diffusion.noise_schedulers"]
    if problems := _call_problems("sampler.scheduler.args", cls, s.args):
        return None, problems
    return _construct("sampler.scheduler.args", s.class_name, lambda: cls(**s.args))


def scheduler_of(recipe: Recipe) -> Any:
    """The recipe's noise scheduler, constructed (``RecipeError`` naming the field when it cannot be)."""
    scheduler, problems = _scheduler(recipe)
    if problems:
        _raise(recipe, problems)
    return scheduler


def _round_sigma(recipe: Recipe) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The preconditioner's noise-level rounding (iDDPM's table), None when continuous or when its
    class or args are wrong (reported by :func:`_preconditioner_problems`)."""
    p = recipe.preconditioner
    try:
        spec = preconditioners.rounding_spec(p.class_name, p.args)
        return spec and preconditioners.sigma_rounding(spec["class"], spec["args"])
    except (TypeError, ValueError):
        return None


def _schedule_problems(recipe: Recipe, scheduler: Any) -> list[str]:
    n = recipe.sampler.num_steps
    t, problems = _construct("sampler", type(scheduler).__name__, lambda: scheduler.timesteps(n))
    if problems:
        return problems
    sigmas = scheduler.edm_sigma(t if not t.is_floating_point() else t.double()).double()
    if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas[:-1] > 0).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        head = ", ".join(f"{v:.4g}" for v in sigmas[:4].tolist())
        return [f"sampler.scheduler.args: {type(scheduler).__name__} gives noise levels that are not finite, positive and "
                f"decreasing over {n} steps ({head}, ...); check its range"]
    if (round_sigma := _round_sigma(recipe)) is not None and t.is_floating_point():  # the steps at the preconditioner's levels
        levels = scheduler.edm_sigma(samplers.round_time_steps(scheduler, t.double(), round_sigma)).double()
        if not bool((levels[1:] < levels[:-1]).all()):
            repeated = levels[1:][levels[1:] >= levels[:-1]][0].item()
            lowest = round_sigma(torch.zeros(1, dtype=torch.float64)).item()
            return [f"sampler.num_steps: {n} steps of {type(scheduler).__name__} rounded to {recipe.preconditioner.class_name}'s "
                    f"noise levels (as EDM's samplers round the time steps) repeat the level {repeated:.4g}; use fewer steps, or "
                    f"a sampler.scheduler range within its levels (the lowest is {lowest:.4g}; EDM raises sigma_min to it)"]
    # in float32 as the engines compute with sigma (VP's expm1 overflows exactly where sigma**2 does); the
    # sampler computes sigma in float64 and casts it to float32 for the engine
    sigmas32 = scheduler.edm_sigma(t if not t.is_floating_point() else t.float()).float()
    if not bool(torch.isfinite(sigmas32).all()) or not bool((sigmas32[:-1] > 0).all()):
        return [f"sampler.scheduler.args: {type(scheduler).__name__} gives noise levels beyond float32 (the engine's sigma "
                f"input; largest {sigmas.max().item():.4g}, smallest {sigmas[:-1].min().item():.4g}); narrow its range"]
    return []


def _solver_problems(recipe: Recipe, scheduler: Any) -> list[str]:
    s = recipe.sampler
    try:
        samplers.check_fit(s.solver, scheduler)
    except ValueError as e:
        return [f"sampler.solver: {e}"]
    cls = samplers.SOLVERS[s.solver]
    why = {"num_steps": "set by sampler.num_steps", "generator": "set by the sampler's seed",
           "noise_scheduler": "set by sampler.scheduler", "denoiser": "set by the engine",
           "round_sigma": "set by the preconditioner"}
    supplied = {k: why[k] for k in samplers.SUPPLIED}
    if problems := _call_problems("sampler.solver_options", cls, s.solver_options, skip=1, supplied=supplied):
        return problems
    return _construct("sampler.solver_options", cls.__name__,
                      lambda: samplers.make_solver(s.solver, lambda x, t: x, s.solver_options, scheduler, s.num_steps))[1]


def _patching_problems(recipe: Recipe) -> list[str]:
    p = recipe.sampler.patching
    if p is None:
        return []
    try:
        _, h, w = image_shape(recipe)
    except ValueError:
        return []
    if p.img_shape[0] < h or p.img_shape[1] < w:  # GridPatching2D would crop the patches, the engine's size is fixed
        return [f"sampler.patching.img_shape: {p.img_shape} is smaller than the engine's {h}x{w} patch (the model's "
                f"img_resolution); sample at least that size"]
    return _construct("sampler.patching", "GridPatching2D",
                      lambda: GridPatching2D(tuple(p.img_shape), (h, w), p.overlap_pix, p.boundary_pix))[1]


DEVICE_TARGETS = ("aoti",)  # the targets compiled for export.device (the others' devices are their own)


def _export_problems(recipe: Recipe) -> list[str]:
    """``export.precision`` against each named target, and ``export.device: cuda`` without a target
    compiled for it: the engine would record the GPU as its device while every artifact runs elsewhere."""
    from diffexport.export import precision_unsupported

    e = recipe.export
    whys = {t: precision_unsupported(t, e.precision, e.opset) for t in ([] if e.auto else e.targets)}
    problems = [f"export.precision: {e.precision} with target {t}: {why}" for t, why in whys.items() if why]
    if e.device != "cpu" and not e.auto and not any(t in DEVICE_TARGETS for t in e.targets):
        problems.append(f"export.device: {e.device} is the device the aoti target compiles for; targets {', '.join(e.targets)} do not use it "
                        "(openvino runs on the CPU, onnx where onnxruntime runs it when loaded, tensorrt on the GPU it is built on); "
                        "use export.device: cpu, or add the aoti target")
    return problems


def _raise(recipe: Recipe, problems: list[str]) -> None:
    source = recipe._source or "<recipe>"
    raise RecipeError("invalid recipe\n  " + "\n  ".join(f"{source}: {msg}" for msg in problems))


def _resolved_model(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """``recipe`` with its checkpoint's class and args merged in (:func:`~diffexport.export.denoiser.resolve_model`),
    or ``recipe`` and the line saying why they cannot be."""
    m = recipe.model
    if m.checkpoint is None:
        return recipe, []
    if not (path := resolve_path(recipe, m.checkpoint)).is_file():
        return recipe, [f"model.checkpoint: {path} is not a file; expected a .mdlus / .pt checkpoint"]
    from diffexport.export.denoiser import resolve_model

    try:
        return resolve_model(recipe), []
    except CheckpointError as e:
        return recipe, [f"model.{e.field or 'checkpoint'}: {e}"]


def _model_lines(recipe: Recipe, merged: Recipe) -> list[str]:
    """:func:`_model_problems` of ``merged``; ``model.args`` lines not about the recipe's own args name the
    checkpoint whose args.json gave them."""
    problems = _model_problems(merged)
    if merged.model.args == recipe.model.args:
        return problems
    note = f" (from {resolve_path(recipe, recipe.model.checkpoint)} args.json)"
    own = recipe.model.args
    return [p + note if (m := re.match(r"model\.args(?:\.(\w+))?:", p)) and m[1] not in own else p for p in problems]


def check_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` as built (with a checkpoint: ``model.class`` and ``model.args`` merged from its args.json,
    :func:`_resolved_model`) when everything it names exists, fits together and takes its args; else
    ``RecipeError`` with one line per problem, each naming the file, the field and what is allowed."""
    merged, problems = _resolved_model(recipe)
    scheduler, sampler_problems = _scheduler(merged)
    if scheduler is not None:
        sampler_problems += _schedule_problems(merged, scheduler) + _solver_problems(merged, scheduler)
    problems = (problems or _model_lines(recipe, merged)) + _preconditioner_problems(merged) + _patching_problems(merged) + _export_problems(merged)
    if problems + sampler_problems:
        _raise(recipe, problems + sampler_problems)
    return merged
