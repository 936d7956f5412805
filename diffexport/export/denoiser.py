"""The exported function: the recipe's model inside its preconditioner, ``D(x, sigma, *conditions)``.

Inputs come in the engine's order (``x``, ``sigma``, then the recipe's conditions); see
``docs/ENGINE_FORMAT.md``. The backbone is wrapped in ``ConcatConditionWrapper`` (as in
PhysicsNeMo): ``image`` conditions are concatenated to the *scaled* input channel-wise,
``F([c_in x, cond], c_noise)``; the ``vector`` condition is the class labels; an ``index``
condition reaches the model as the keyword of its name (e.g. ``lead_time_label``), and so does the
``global_index`` input (a patch-trained ``SongUNetPosEmbd``'s ``global_index``, one grid per sample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffexport.checkpoints import CheckpointError, checkpoint_model, load_model
from diffexport.diffusion.utils import ConcatConditionWrapper
from diffexport.models import get_model_class
from diffexport.models.init import randomize_
from diffexport.recipes import IOSpec, Recipe, RecipeError, TensorSpec, io_spec, resolve_path


def resolve_model(recipe: Recipe) -> Recipe:
    """``recipe`` with the model's class and args as built: with a checkpoint, those its ``args.json``
    records (:func:`~diffexport.checkpoints.checkpoint_model`; only args.json is read), ``model.args``
    over them. ``CheckpointError`` (``field``: the recipe's ``model.<field>`` at fault) when they cannot be."""
    spec = recipe.model
    if spec.checkpoint is None:
        return recipe
    path = resolve_path(recipe, spec.checkpoint)
    found = checkpoint_model(path, class_name=spec.class_name, args=spec.args)
    if found.stored is None and not spec.args:
        raise CheckpointError(f"{path} is a plain state_dict, which records no constructor arguments: give them in model.args",
                              field="args")
    return recipe.model_copy(update={"model": spec.model_copy(update={"class_name": found.class_name, "args": found.args})})


def instantiate_model(recipe: Recipe) -> nn.Module:
    """``model.class(**model.args)`` with the checkpoint's weights, or seeded random ones; eval mode."""
    spec = recipe.model
    if spec.checkpoint is None:
        return randomize_(get_model_class(spec.class_name)(**spec.args), spec.init.seed).eval()
    return load_model(resolve_path(recipe, spec.checkpoint), class_name=spec.class_name, args=spec.args or None).eval()


class Denoiser(nn.Module):
    """``forward(x, sigma, *conditions) -> denoised``: the fixed engine contract around a preconditioner.

    ``conditions`` are the engine inputs after ``x`` and ``sigma`` (their ``name`` and ``kind``).
    The preconditioner gets them as its ``condition``: the image conditions concatenated, or, with a
    vector or index condition, a TensorDict of ``cond_concat`` (images), ``cond_vec`` (the vector)
    and each index condition under its name (``ConcatConditionWrapper``'s keys). Preconditioners'
    ``forward`` takes diffusion time (PhysicsNeMo's API); the engine takes sigma, so this calls their
    ``denoise(x, sigma, condition)`` (a VP graph maps sigma to time itself, for c_noise). The output is float32 whatever precision runs inside.
    """

    def __init__(self, preconditioner: nn.Module, conditions: Sequence[TensorSpec] = (), index_high: int = 1):
        super().__init__()
        self.preconditioner = preconditioner
        self.conditions = [(c.name, c.kind) for c in conditions]
        self.index_high = index_high  # index conditions take values in [0, index_high)
        if any(kind != "image" for _, kind in self.conditions):  # forward builds a TensorDict: import it
            import tensordict  # noqa: F401  here, outside any trace (its first import runs .item())

    def forward(self, x: Tensor, sigma: Tensor, *conditions: Tensor) -> Tensor:
        if len(conditions) != len(self.conditions):
            raise TypeError(f"Denoiser takes x, sigma and {[n for n, _ in self.conditions]}, got {len(conditions)} conditions")
        images, named = [], {}
        for (name, kind), value in zip(self.conditions, conditions):
            if kind == "image":
                images.append(value)
            else:
                named["cond_vec" if kind == "vector" else name] = value
        condition = torch.cat(images, dim=1) if len(images) > 1 else images[0] if images else None
        if named:  # labels and indices travel with the image in one TensorDict
            from tensordict import TensorDict  # not at module top (it imports torch._dynamo); loaded by __init__

            condition = TensorDict({**named, **({"cond_concat": condition} if images else {})}, batch_size=x.shape[:1])
        denoise = getattr(self.preconditioner, "denoise", self.preconditioner)  # D(x; sigma); forward takes time t
        return denoise(x, sigma, condition).float()


def build_denoiser(recipe: Recipe) -> Denoiser:
    """The recipe's model (:func:`instantiate_model`, class and args by :func:`resolve_model`) inside
    ``preconditioner.class(**args)``, eval mode."""
    from diffexport.diffusion import preconditioners

    recipe = resolve_model(recipe)
    cls = getattr(preconditioners, recipe.preconditioner.class_name, None)
    if cls is None:
        raise RecipeError(
            f"preconditioner.class: {recipe.preconditioner.class_name!r} is not defined in "
            "diffexport.diffusion.preconditioners"
        )
    if recipe.model.class_name == "UNet":
        raise RecipeError(
            "model.class: UNet is CorrDiff's regression network (no noise-level input), not a denoiser; "
            "export the diffusion backbone it wraps (its model_type) instead"
        )
    model = instantiate_model(recipe)
    conditions = io_spec(recipe).inputs[2:]
    wrapped = ConcatConditionWrapper(model, kwarg_keys=[c.name for c in conditions if c.kind in ("index", "global_index")])
    return Denoiser(cls(wrapped, **recipe.preconditioner.args), conditions, getattr(model, "lead_time_steps", 1)).eval()


def random_global_index(spec: TensorSpec, batch: int, generator: torch.Generator) -> Tensor:
    """int64 [batch, 2, h, w]: per sample, the (row, column) indices of a random h×w window of the
    global grid ``spec.grid`` (the patch-sized grid itself when it has none)."""
    h, w = spec.shape[-2:]
    H, W = spec.grid or (h, w)
    top = torch.randint(0, H - h + 1, (batch, 1, 1), generator=generator)
    left = torch.randint(0, W - w + 1, (batch, 1, 1), generator=generator)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([(top + rows).expand(batch, h, w), (left + cols).expand(batch, h, w)], dim=1).contiguous()


def random_input(spec: TensorSpec, batch: int, generator: torch.Generator, sigma: Tensor | None = None,
                 index_high: int = 1, image_hw: Sequence[int] | None = None) -> Tensor:
    """One seeded engine input of ``spec`` for ``batch`` samples: ``x = x0 + sigma n`` (``x0 ~ N(0, 0.5²)``,
    ``sigma`` [batch]); index ones in ``[0, index_high)``; ``global_index`` a random window of its grid
    per sample (:func:`random_global_index`); others (image, vector) ``N(0, 1)``, image ones
    ``image_hw``-sized when given (the full image under patching)."""
    shape = [batch, *spec.shape[1:]]
    if spec.kind == "x":
        x0, n = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        return 0.5 * x0 + sigma.reshape(-1, *[1] * (len(shape) - 1)) * n
    if spec.kind == "index":
        return torch.randint(0, max(index_high, 1), shape, generator=generator)
    if spec.kind == "global_index":
        return random_global_index(spec, batch, generator)
    if spec.kind == "image" and image_hw is not None:
        shape[-2:] = image_hw
    return torch.randn(shape, generator=generator)


def example_inputs(io: IOSpec, batch: int = 2, seed: int = 0, index_high: int = 1) -> tuple[Tensor, ...]:
    """Seeded inputs in engine order (:func:`random_input`), ``sigma`` log-uniform in [0.02, 20]."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(0.02), math.log(20.0)
    sigma = (lo + (hi - lo) * torch.rand(batch, generator=g)).exp()
    return tuple(sigma if spec.kind == "sigma" else random_input(spec, batch, g, sigma, index_high) for spec in io.inputs)
