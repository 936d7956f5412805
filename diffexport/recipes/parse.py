"""Recipe parsing and checks: strict YAML -> ``Recipe`` (pydantic), with errors naming the file and
field path, and the engine I/O contract that follows from a recipe (:func:`io_spec`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .io import IOSpec, TensorSpec, global_index_spec
from .schema import Condition, Recipe
from .yaml_io import YAMLInputError, read_yaml

GLOBAL_INDEX_MODELS = ("SongUNetPosEmbd", "SongUNetPosLtEmbd")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and field path."""


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif not str(p).startswith(("function-", "literal[")):  # pydantic's union/validator tags
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


def _allowed_keys(loc: tuple) -> list[str]:
    """Keys accepted by the schema model that holds the field at ``loc``."""
    model: Any = Recipe
    for p in loc[:-1]:
        if isinstance(p, int):
            continue
        field = model.model_fields.get(p) or next((f for f in model.model_fields.values() if f.alias == p), None)
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)] or [ann]
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _describe(err: dict) -> str:
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(err["loc"])
        return "unknown key" + (f"; expected one of: {', '.join(allowed)}" if allowed else "")
    if kind == "missing":
        return "required key is missing"
    got = err.get("input")
    return f"{msg} (got {got!r})" if not isinstance(got, dict) and kind != "value_error" else msg


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping; ``RecipeError`` lists every problem as ``source: field: what``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: {_loc(err['loc'])}: {_describe(err)}" for err in e.errors()]
        raise RecipeError("invalid recipe\n  " + "\n  ".join(lines)) from None
    if recipe.model.checkpoint is None:  # (a checkpoint's class and args are merged, then checked, by check_recipe)
        try:
            image_shape(recipe)
        except ValueError as e:
            raise RecipeError(f"invalid recipe\n  {source}: {e}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read (:func:`~diffexport.recipes.yaml_io.read_yaml`: size-bounded UTF-8, no alias bombs or
    duplicate keys) and validate ``path``; relative paths inside it are resolved against its folder.
    The whole check against the code is :func:`diffexport.export.validate_recipe`."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except YAMLInputError as e:
        raise RecipeError(str(e)) from None
    recipe = parse_recipe(data, str(path))
    recipe._source = path.resolve()
    return recipe


def resolve_path(recipe: Recipe, value: str) -> Path:
    """``value`` resolved against the recipe file's folder (or the working directory)."""
    base = recipe._source
    p = Path(value).expanduser()
    return p if p.is_absolute() or base is None else (base.parent / p)


class _ModelArgs(dict):
    """``model.args`` whose missing keys raise a ValueError naming the field."""

    def __init__(self, args: dict, cls: str) -> None:
        super().__init__(args)
        self.cls = cls

    def __missing__(self, key: str):
        raise ValueError(f"model.args: {self.cls} needs {key!r}")


MAX_SIDE, MAX_CHANNELS = 8192, 4096  # engine image sizes beyond these are typos (and memory bombs)


def _resolution(v: Any, key: str = "img_resolution") -> tuple[int, int]:
    ok = isinstance(v, int) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(s, int) for s in v))
    if not ok or isinstance(v, bool):
        raise ValueError(f"model.args.{key}: must be an int or [H, W] of ints, got {v!r}")
    return (v, v) if isinstance(v, int) else (v[0], v[1])


def _check_size(field: str, value: Any, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise ValueError(f"{field}: must be an int in [1, {high}], got {value!r}")
    return value


def image_shape(recipe: Recipe) -> tuple[int, int, int]:
    """(C, H, W) of the engine's ``x`` (the patch under ``sampler.patching.global_index``) from the
    model's args, checking the conditions add up to its input channels."""
    cls = recipe.model.class_name
    if cls is None:
        raise ValueError("model.class: not known until the checkpoint is read (diffexport.export.check_recipe merges it)")
    a = _ModelArgs(recipe.model.args, cls=cls)
    keys = {"DiffusionModel": ("channels", "image_size", "channels"), "UNet": ("img_out_channels", "img_resolution", "img_in_channels")}
    k_out, k_res, k_in = keys.get(cls, ("out_channels", "img_resolution", "in_channels"))
    c, (h, w), c_in = a[k_out], _resolution(a[k_res], k_res), a[k_in]
    for key, value, high in ((k_out, c, MAX_CHANNELS), (k_in, c_in, MAX_CHANNELS), (k_res, h, MAX_SIDE), (k_res, w, MAX_SIDE)):
        _check_size(f"model.args.{key}", value, high)
    if cls != "DiffusionModel" and cls != "UNet":
        if cls in ("SongUNetPosEmbd", "SongUNetPosLtEmbd"):
            c_in -= a.get("N_grid_channels", 4)  # every gridtype, 0 (no grid) included
        if cls == "SongUNetPosLtEmbd":
            c_in -= a.get("lead_time_channels") or 0
    h, w = _patch_shape(recipe, cls, (h, w))
    images = [cnd for cnd in recipe.conditions if cnd.kind == "image"]
    for cnd in images:
        if cnd.shape[1:] != [h, w]:
            raise ValueError(f"conditions.{cnd.name}.shape: image conditions must be {h}x{w} like x, got {cnd.shape}")
    if c + sum(cnd.shape[0] for cnd in images) != c_in:
        raise ValueError(
            f"model.args: the model takes {c_in} image channels but x has {c} and the image conditions add "
            f"{sum(cnd.shape[0] for cnd in images)}; fix in_channels or conditions"
        )
    vectors = [cnd for cnd in recipe.conditions if cnd.kind == "vector"]
    label_dim = a.get("label_dim", 0)
    if vectors and vectors[0].shape[0] != label_dim:
        raise ValueError(f"conditions.{vectors[0].name}.shape: the model's label_dim is {label_dim}, got {vectors[0].shape}")
    if label_dim and not vectors and cls not in ("DiffusionModel", "UNet") and a.get("embedding_type") != "zero":
        raise ValueError(f"conditions: the model's label_dim is {label_dim}, so it needs class labels: add "
                         f"{{name: class_labels, kind: vector, shape: [{label_dim}]}}")
    if cls == "SongUNetPosLtEmbd" and not any(cnd.kind == "index" and cnd.name == "lead_time_label" for cnd in recipe.conditions):
        raise ValueError("conditions: SongUNetPosLtEmbd needs its lead time: add {name: lead_time_label, kind: index}")
    return c, h, w


def _patch_shape(recipe: Recipe, cls: str, resolution: tuple[int, int]) -> tuple[int, int]:
    """The engine's (H, W): the model's resolution, or the patch of ``sampler.patching.global_index``
    (whose model spans the global grid ``img_shape``)."""
    p = recipe.sampler.patching
    if p is None or not p.global_index:
        if p is not None and p.patch_shape is not None and tuple(p.patch_shape) != resolution:
            raise ValueError(f"sampler.patching.patch_shape: {p.patch_shape} must equal the model's img_resolution "
                             f"{list(resolution)} without global_index")
        return resolution
    if cls not in GLOBAL_INDEX_MODELS:
        raise ValueError(f"sampler.patching.global_index: needs a model with a global positional grid "
                         f"({', '.join(GLOBAL_INDEX_MODELS)}), got {cls}")
    if list(resolution) != list(p.img_shape):
        raise ValueError(f"model.args.img_resolution: {list(resolution)} must equal sampler.patching.img_shape "
                         f"{p.img_shape} (the global grid) with global_index")
    return p.patch_shape[0], p.patch_shape[1]


LEAD_TIME_STEPS = 9  # SongUNetPosLtEmbd's default lead_time_steps (PhysicsNeMo 2.2)


def index_high(recipe: Recipe, name: str) -> int | None:
    """The exclusive upper bound of index condition ``name``: ``lead_time_steps`` for the
    ``lead_time_label`` of a ``SongUNetPosLtEmbd``; None when the model does not say."""
    if recipe.model.class_name == "SongUNetPosLtEmbd" and name == "lead_time_label":
        return _check_size("model.args.lead_time_steps", recipe.model.args.get("lead_time_steps", LEAD_TIME_STEPS), 1 << 20)
    return None


def _condition_spec(recipe: Recipe, c: Condition) -> TensorSpec:
    if c.kind == "index":
        return TensorSpec(c.name, [-1, *c.shape], "int64", c.kind, high=index_high(recipe, c.name))
    return TensorSpec(c.name, [-1, *c.shape], "float32", c.kind)


def io_spec(recipe: Recipe) -> IOSpec:
    """The exported denoiser's contract: ``x [B,C,H,W]``, ``sigma [B]``, conditions[, ``global_index``] → ``denoised``."""
    c, h, w = image_shape(recipe)
    inputs = [TensorSpec("x", [-1, c, h, w], kind="x"), TensorSpec("sigma", [-1], kind="sigma")]
    inputs += [_condition_spec(recipe, cnd) for cnd in recipe.conditions]
    if (p := recipe.sampler.patching) is not None and p.global_index:
        inputs.append(global_index_spec(h, w, tuple(p.img_shape)))
    outputs = [TensorSpec("denoised", [-1, c, h, w], kind="denoised")]
    return IOSpec(inputs, outputs, recipe.inputs.batch.model_dump())
