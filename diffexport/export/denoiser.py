"""The exported function: the recipe's model inside its preconditioner, ``D(x, sigma, *conditions)``.

Inputs come in the engine's order (``x``, ``sigma``, then the recipe's conditions); see
``docs/ENGINE_FORMAT.md``. Condition kinds map onto the backbones as in PhysicsNeMo's
``ConcatConditionWrapper``: ``image`` conditions are concatenated to the *scaled* input
channel-wise, ``F([c_in x, cond], c_noise)``; the ``vector`` condition is the class labels; an
``index`` condition is passed by its name (e.g. ``lead_time_label``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffexport.models import get_model_class
from diffexport.models.init import randomize_
from diffexport.recipes import IOSpec, Recipe, RecipeError, TensorSpec, io_spec, resolve_path


def instantiate_model(recipe: Recipe) -> nn.Module:
    """``model.class(**model.args)`` with the checkpoint's weights, or seeded random ones; eval mode."""
    spec = recipe.model
    if spec.checkpoint is None:
        return randomize_(get_model_class(spec.class_name)(**spec.args), spec.init.seed).eval()
    from diffexport.checkpoints import load_model

    path = resolve_path(recipe, spec.checkpoint)
    return load_model(path, class_name=spec.class_name, args=spec.args or None).eval()


class Backbone(nn.Module):
    """Gives any model class the preconditioners' call ``F(x, t, condition=None, **kwargs)``.

    ``condition`` (image channels) is concatenated to ``x``; ``class_labels`` and index
    conditions (``kwargs``) go to the model by name. ``DiffusionModel`` takes ``(x, t)`` only;
    the CorrDiff ``UNet`` wrapper concatenates its conditioning image itself and has no noise input.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.style = {"DiffusionModel": "xt", "UNet": "regression"}.get(type(model).__name__, "edm")

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None, class_labels: Tensor | None = None, **kwargs: Tensor) -> Tensor:
        if self.style == "regression":
            return self.model(x, condition, **kwargs)
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        if self.style == "xt":
            return self.model(x, t)
        return self.model(x, t, class_labels, **kwargs)


class Denoiser(nn.Module):
    """``forward(x, sigma, *conditions) -> denoised``: the fixed engine contract around a preconditioner.

    ``conditions`` are the engine inputs after ``x`` and ``sigma`` (their ``name`` and ``kind``);
    the output is float32 whatever precision runs inside.
    """

    def __init__(self, preconditioner: nn.Module, conditions: Sequence[TensorSpec] = (), index_high: int = 1):
        super().__init__()
        self.preconditioner = preconditioner
        self.conditions = [(c.name, c.kind) for c in conditions]
        self.index_high = index_high  # index conditions take values in [0, index_high)

    def forward(self, x: Tensor, sigma: Tensor, *conditions: Tensor) -> Tensor:
        if len(conditions) != len(self.conditions):
            raise TypeError(f"Denoiser takes x, sigma and {[n for n, _ in self.conditions]}, got {len(conditions)} conditions")
        images, kwargs = [], {}
        for (name, kind), value in zip(self.conditions, conditions):
            if kind == "image":
                images.append(value)
            else:
                kwargs["class_labels" if kind == "vector" else name] = value
        condition = torch.cat(images, dim=1) if len(images) > 1 else images[0] if images else None
        return self.preconditioner(x, sigma, condition, **kwargs).float()


def build_denoiser(recipe: Recipe) -> Denoiser:
    """The recipe's model (:func:`instantiate_model`) inside ``preconditioner.class(**args)``, eval mode."""
    from diffexport.diffusion import preconditioners

    cls = getattr(preconditioners, recipe.preconditioner.class_name, None)
    if cls is None:
        raise RecipeError(
            f"preconditioner.class: {recipe.preconditioner.class_name!r} is not defined in "
            "diffexport.diffusion.preconditioners"
        )
    model = instantiate_model(recipe)
    precond = cls(Backbone(model), **recipe.preconditioner.args)
    index_high = getattr(model, "lead_time_steps", 1)
    return Denoiser(precond, io_spec(recipe).inputs[2:], index_high=index_high).eval()


def example_inputs(io: IOSpec, batch: int = 2, seed: int = 0, index_high: int = 1) -> tuple[Tensor, ...]:
    """Seeded inputs in engine order: ``x = x0 + sigma n`` (``x0 ~ N(0, 0.5²)``) with ``sigma``
    log-uniform in [0.02, 20]; image/vector conditions ``N(0, 1)``; index ones in [0, index_high)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(0.02), math.log(20.0)
    sigma = (lo + (hi - lo) * torch.rand(batch, generator=g)).exp()
    out = []
    for spec in io.inputs:
        shape = [batch, *spec.shape[1:]]
        if spec.kind == "sigma":
            out.append(sigma)
        elif spec.kind == "x":
            x0, n = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
            out.append(0.5 * x0 + sigma.reshape(-1, *[1] * (len(shape) - 1)) * n)
        elif spec.kind == "index":
            out.append(torch.randint(0, index_high, shape, generator=g))
        else:
            out.append(torch.randn(shape, generator=g))
    return tuple(out)
