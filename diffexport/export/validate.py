"""Check a recipe against the code it names, before any work: model, preconditioner, scheduler."""

from __future__ import annotations

import inspect
from typing import Callable

from diffexport.diffusion import noise_schedulers, preconditioners
from diffexport.models import get_model_class, model_names
from diffexport.recipes import Recipe, RecipeError


def _call_problems(field: str, target: Callable, args: dict, skip: int = 0) -> list[str]:
    """Arguments of ``args`` that ``target`` does not take, or required ones it lacks."""
    params = list(inspect.signature(target).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    name = getattr(target, "__name__", str(target))
    unknown = sorted(set(args) - set(names))
    missing = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL and p.name not in args]
    problems = [f"{field}: unknown argument(s) {', '.join(unknown)} for {name}; expected some of: {', '.join(names)}"] if unknown else []
    return problems + ([f"{field}: {name} needs {', '.join(missing)}"] if missing else [])


def check_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` when its classes exist and take its args; else ``RecipeError`` naming file and field."""
    m = recipe.model
    if m.class_name in model_names():
        problems = _call_problems("model.args", get_model_class(m.class_name), m.args)
    else:
        problems = [f"model.class: unknown model class {m.class_name!r}; expected one of {', '.join(model_names())}"]
    for field, spec, module, skip in (("preconditioner", recipe.preconditioner, preconditioners, 1),
                                      ("sampler.scheduler", recipe.sampler.scheduler, noise_schedulers, 0)):
        if (cls := getattr(module, spec.class_name, None)) is None:
            problems.append(f"{field}.class: {spec.class_name!r} is not in {module.__name__}")
        else:
            problems += _call_problems(f"{field}.args", cls, spec.args, skip=skip)
    if problems:
        source = recipe._source or "<recipe>"
        raise RecipeError("invalid recipe\n  " + "\n  ".join(f"{source}: {msg}" for msg in problems))
    return recipe
