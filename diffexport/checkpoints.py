"""Load and save model checkpoints: PhysicsNeMo ``.mdlus`` archives and plain state_dicts.

A ``.mdlus`` is a ZIP (PhysicsNeMo 2.x, members stored uncompressed) or a tar (1.x) holding

* ``model.pt``: ``torch.save(model.state_dict())``;
* ``args.json``: ``{"__name__": class name, "__module__": its module, "__args__": {kwargs}}``;
* ``metadata.json``: ``{"mdlus_file_version": ...}`` (PhysicsNeMo checks it; ignored here).

Only the class name matters on load: it is resolved with :func:`diffexport.models.get_model_class`.
:func:`checkpoint_model` says which class and constructor arguments a checkpoint builds (reading only
``args.json``); :func:`load_model` builds exactly that and loads the weights.
A PhysicsNeMo preconditioner checkpoint (``EDMPrecond``, ``EDMPrecondSuperResolution`` as CorrDiff
saves its diffusion model, ``EDMPrecondSR``, ``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``) loads
as the backbone it wraps (``model_type``, weights under ``model.``): a recipe's preconditioner
replaces the wrapper.
Weights are always read with ``torch.load(weights_only=True)``: a pickle that would build anything
but tensors and plain containers (e.g. run ``os.system``) is refused, never executed.
Every problem is reported as a :class:`CheckpointError` with a one-paragraph message.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from diffexport import __version__
from diffexport.models import get_model_class, model_names
from diffexport.models.legacy import drop_device_buffers

__all__ = ["CheckpointError", "CheckpointModel", "checkpoint_model", "constructor_args", "load_model", "save_model"]

# PhysicsNeMo 2.x home of the diffusion UNets that diffexport reimplements (written to args.json
# so PhysicsNeMo can import them; it looks registered names up by name first anyway).
PHYSICSNEMO_MODULE = "physicsnemo.models.diffusion_unets"
PHYSICSNEMO_CLASSES = frozenset(
    {"SongUNet", "SongUNetPosEmbd", "SongUNetPosLtEmbd", "DhariwalUNet", "UNet"}
)
# Wrapper prefixes stripped from state-dict keys, outermost first: DDP, torch.compile, and
# PhysicsNeMo 1.x / EDM preconditioners holding the UNet as ``self.model``.
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # in torch's weights_only refusal
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)

PathLike = str | os.PathLike

# PhysicsNeMo's preconditioners (``physicsnemo.diffusion.preconditioners``, 1.x
# ``models.diffusion.preconditioning``) hold their backbone as ``self.model``. Per class: its
# default ``model_type``, its own arguments (not the backbone's), and how the backbone's channels
# follow from its arguments (it passes ``label_dim`` on to the backbone unless marked).
_PRECONDITIONERS: dict[str, tuple[str, tuple[str, ...], Any]] = {
    "EDMPrecond": ("DhariwalUNet", ("sigma_min", "sigma_max", "sigma_data"),
                   lambda a: (a.get("img_in_channels") or a["img_channels"], a.get("img_out_channels") or a["img_channels"])),
    "VPPrecond": ("SongUNet", ("beta_d", "beta_min", "M", "epsilon_t"), lambda a: (a["img_channels"], a["img_channels"])),
    "VEPrecond": ("SongUNet", ("sigma_min", "sigma_max"), lambda a: (a["img_channels"], a["img_channels"])),
    "iDDPMPrecond": ("DhariwalUNet", ("C_1", "C_2", "M"), lambda a: (a["img_channels"], 2 * a["img_channels"])),
    "EDMPrecondSuperResolution": ("SongUNetPosEmbd", ("sigma_min", "sigma_max", "sigma_data"),
                                  lambda a: (a["img_in_channels"] + a["img_out_channels"], a["img_out_channels"])),
}
_PRECONDITIONERS["EDMPrecondSR"] = _PRECONDITIONERS["EDMPrecondSuperResolution"]
_NO_LABEL_DIM = ("EDMPrecondSuperResolution", "EDMPrecondSR")  # their backbone gets no label_dim
# Arguments that older PhysicsNeMo versions recorded and 2.2 drops on load (UNet checkpoint 0.1.0).
_DROPPED_ARGS = {"UNet": ("img_channels", "sigma_min", "sigma_max", "sigma_data")}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit its model; the message says why. ``field``:
    the argument at fault when it is not the file (``"class"``: ``class_name``, ``"args"``: ``args``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CheckpointModel(NamedTuple):
    """What a checkpoint builds: ``class_name(**args)``. ``stored``: the class its ``args.json`` names
    (a preconditioner's backbone), ``None`` for a plain state_dict; ``wrapper``: that preconditioner."""

    class_name: str
    args: dict[str, Any]
    stored: str | None = None
    wrapper: str | None = None


def constructor_args(model: torch.nn.Module) -> dict[str, Any]:
    """The keyword arguments ``model`` was built with (``model._init_args``); ``TypeError`` if
    it does not record them (subclass :class:`diffexport.models.base.Module` to fix that)."""
    init_args = getattr(model, "_init_args", None)
    if not isinstance(init_args, dict):
        raise TypeError(
            f"{type(model).__name__} does not record its constructor arguments, so it cannot be "
            "saved as .mdlus: subclass diffexport.models.base.Module instead of torch.nn.Module "
            "(or set self._init_args to a dict of its constructor keyword arguments)"
        )
    return dict(init_args)


def save_model(model: torch.nn.Module, path: PathLike) -> Path:
    """Write ``model`` as a PhysicsNeMo 2.x ``.mdlus`` ZIP (readable by PhysicsNeMo 2.2's
    ``Module.from_checkpoint`` for the classes it has); atomically replaces ``path``."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    cls = type(model)
    spec = {
        "__name__": cls.__name__,
        "__module__": PHYSICSNEMO_MODULE if cls.__name__ in PHYSICSNEMO_CLASSES else cls.__module__,
        "__args__": constructor_args(model),
    }
    try:
        args_json = json.dumps(spec)
    except TypeError as err:
        raise TypeError(f"cannot save {cls.__name__}: its constructor arguments {err}") from None
    metadata = {
        "mdlus_file_version": getattr(cls, "__model_checkpoint_version__", "0.1.0"),
        "written_by": f"diffexport {__version__}",
    }
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("model.pt", weights.getvalue())
            archive.writestr("args.json", args_json)
            archive.writestr("metadata.json", json.dumps(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def checkpoint_model(
    path: PathLike, *, class_name: str | None = None, args: Mapping[str, Any] | None = None
) -> CheckpointModel:
    """The class and constructor arguments :func:`load_model` builds from ``path`` with the same
    ``class_name`` and ``args``, read from the ``.mdlus``'s ``args.json`` only (no weights are read).

    A ``.mdlus`` gives its class (a preconditioner's: the backbone it wraps) and arguments; ``args``
    override single arguments. ``class_name`` may only repeat that class, or, when the checkpoint
    holds a class diffexport does not implement, name the diffexport class to build instead; a
    plain state_dict (anything that is not a ``.mdlus``) records neither and needs ``class_name``.
    """
    path = _existing(path)
    return _model_of(path, _archive_members(path, ("args.json",)), class_name, args)


def load_model(
    path: PathLike,
    *,
    class_name: str | None = None,
    args: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Build the model stored at ``path`` and load its weights; returned in eval mode.

    ``path`` is a ``.mdlus`` archive (2.x ZIP or 1.x tar), or a plain ``torch.save`` file of a
    state_dict (or of a dict holding one under ``"state_dict"`` or ``"model"``), which needs
    ``class_name`` and, unless the defaults do, ``args``. The model built is
    :func:`checkpoint_model`'s (``class_name`` and ``args`` as there).
    """
    path = _existing(path)
    members = _archive_members(path)
    if members is None:  # not a .mdlus: a plain torch.save file (read first: it may be no checkpoint at all)
        state = _state_dict(_torch_load(path, str(path), map_location), str(path))
        spec = _model_of(path, members, class_name, args)
    else:
        spec = _model_of(path, members, class_name, args)
        where = f"{path} (model.pt)"
        state = _state_dict(_torch_load(members["model.pt"], where, map_location), where)
        if spec.wrapper is not None:
            state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model = _build(spec.class_name, spec.args, path, spec.stored or spec.class_name).to(map_location)
    _load_weights(model, state, path)
    return model.eval()


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    return path


def _model_of(path: Path, members: dict[str, bytes] | None, class_name: str | None,
              args: Mapping[str, Any] | None) -> CheckpointModel:
    """:func:`checkpoint_model` of the archive ``members`` (``None``: a plain state_dict file)."""
    known = model_names()
    if class_name is not None and class_name not in known:
        raise CheckpointError(f"class {class_name!r} for {path} is not a diffexport model (class_name, recipe: model.class); "
                              f"known classes: {', '.join(known)}", field="class")
    if members is None:
        if class_name is None:
            raise CheckpointError(
                f"{path} is a plain state_dict, not a .mdlus archive, so it does not say which "
                f"model it belongs to: pass class_name= (one of {', '.join(known)}) "
                "and the constructor args= (recipe: model.class and model.args)", field="class"
            )
        return CheckpointModel(class_name, dict(args or {}))
    missing = [m for m in NEEDED if m not in members]
    if missing:
        raise CheckpointError(
            f"{path} is not a complete .mdlus archive: it lacks {' and '.join(missing)} "
            f"(it holds: {', '.join(sorted(members)) or 'nothing'})"
        )
    stored, stored_args = _parse_args_json(members["args.json"], path)
    wrapper = stored if stored in _PRECONDITIONERS else None
    if wrapper is not None:
        stored, stored_args = _backbone(wrapper, stored_args, path)
    for dropped in _DROPPED_ARGS.get(stored, ()):
        stored_args.pop(dropped, None)
    if class_name is None and stored not in known:
        raise CheckpointError(f"{path} holds a {stored!r} model, which diffexport does not implement; known classes: "
                              f"{', '.join(known)} (name one to build instead: class_name=, recipe: model.class)")
    if class_name is not None and class_name != stored and stored in known:
        inside = f" (the backbone of its {wrapper})" if wrapper else ""
        raise CheckpointError(f"{path} holds a {stored}{inside}, not a {class_name} (class_name, recipe: model.class): "
                              f"leave the class out to take the checkpoint's, or name {stored}", field="class")
    return CheckpointModel(class_name or stored, {**stored_args, **(args or {})}, stored, wrapper)


# Archives are read member by member, only the members named here, each within its size limit;
# unused members (however large) are never read, and a member that inflates beyond MAX_RATIO is refused.
NEEDED = ("model.pt", "args.json")
LIMITS = {"model.pt": 16 << 30, "args.json": 1 << 20}  # bytes, uncompressed
MAX_RATIO = 200  # uncompressed / compressed, for members over 16 MiB (zip bombs)
MAX_MEMBERS = 100_000  # entries in one archive


def _archive_members(path: Path, needed: tuple[str, ...] = NEEDED) -> dict[str, bytes] | None:
    """The ``needed`` members (some of :data:`NEEDED`) of the ``.mdlus`` archive at ``path`` (every other
    name listed, with empty contents), or ``None`` when it is none (a ZIP without ``model.pt``/``args.json``
    is taken for a ``torch.save`` file, itself a ZIP)."""
    try:
        if tarfile.is_tarfile(path):  # first, as PhysicsNeMo does: some 1.x files are both
            return _tar_members(path, needed)
        if zipfile.is_zipfile(path):
            return _zip_members(path, needed)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as err:
        raise CheckpointError(f"{path} is a damaged or truncated archive ({err})") from None
    return None


def _check_size(path: Path, name: str, size: int, packed: int | None = None) -> None:
    if size > LIMITS[name]:
        raise CheckpointError(f"{path}: member {name} is {size} bytes, over the limit of {LIMITS[name]} bytes; refused")
    if packed is not None and size > 16 << 20 and size > MAX_RATIO * max(packed, 1):
        raise CheckpointError(f"{path}: member {name} inflates {size / max(packed, 1):.0f}x ({packed} -> {size} bytes), "
                              f"over the limit of {MAX_RATIO}x: a zip bomb; refused")


def _zip_members(path: Path, needed: tuple[str, ...]) -> dict[str, bytes] | None:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise CheckpointError(f"{path}: {len(infos)} archive members, over the limit of {MAX_MEMBERS}; refused")
        found = {i.filename.removeprefix("./"): i for i in infos if not i.is_dir()}
        if not found.keys() & set(NEEDED):
            return None
        members = {}
        for name in needed:
            if (info := found.get(name)) is None:
                continue
            _check_size(path, name, info.file_size, info.compress_size if info.compress_type != zipfile.ZIP_STORED else None)
            with archive.open(info) as f:
                data = f.read(LIMITS[name] + 1)  # never more than the declared size (zipfile checks it and the CRC)
            _check_size(path, name, len(data))
            members[name] = data
        return {**members, **{n: b"" for n in found if n not in members}}  # other names listed, never read


def _tar_members(path: Path, needed: tuple[str, ...]) -> dict[str, bytes]:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
        raise CheckpointError(f"{path} is a compressed tar archive; .mdlus tar archives are read uncompressed "
                              "(as PhysicsNeMo 1.x writes them): decompress it first")
    members: dict[str, bytes] = {}
    listed: set[str] = set()
    with tarfile.open(path, mode="r:") as tar:  # uncompressed, as PhysicsNeMo writes them; headers are read one at a time
        for count, info in enumerate(tar):
            if count >= MAX_MEMBERS:
                raise CheckpointError(f"{path}: over {MAX_MEMBERS} archive members; refused")
            name = info.name.removeprefix("./")
            if not info.isfile():
                continue
            listed.add(name)
            if name in needed and name not in members:
                _check_size(path, name, info.size)
                f = tar.extractfile(info)
                members[name] = f.read(LIMITS[name] + 1) if f is not None else b""
                if len(members[name]) != info.size:
                    raise CheckpointError(f"{path}: member {name} is truncated ({len(members[name])} of {info.size} bytes)")
            if len(members) == len(needed) and listed.issuperset(NEEDED):  # (headers only until every needed name is seen)
                break
    return {**members, **{n: b"" for n in listed if n not in members}}


def _torch_load(source: Path | bytes, where: str, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)`` with its failures turned into ``CheckpointError``."""
    try:
        file = io.BytesIO(source) if isinstance(source, bytes) else source
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 (any failure to unpickle a foreign file: IndexError, KeyError, ...)
        message = str(err)
        unsafe = _UNSAFE_GLOBAL.search(message)
        if unsafe:
            raise CheckpointError(
                f"refused to load {where}: its pickle references {unsafe[1]}, which is neither a "
                "tensor nor a plain container and could run arbitrary code; only state_dicts are "
                "accepted: re-save the weights with torch.save(model.state_dict(), ...)"
            ) from None
        unsupported = (s.strip() for s in message.splitlines() if "unsupported" in s.lower())
        detail = next(unsupported, message.split(". ")[0])
        raise CheckpointError(
            f"cannot read {where}: it is corrupt, truncated, or neither a .mdlus archive nor a "
            f"torch.save file ({detail or type(err).__name__})"
        ) from None


def _state_dict(obj: Any, where: str) -> Mapping[str, torch.Tensor]:
    """The state_dict in a loaded ``obj``: itself, or its ``state_dict``/``model`` entry."""
    if isinstance(obj, Mapping):
        inner = [obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
        obj = inner[0] if inner else obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state_dict")
    odd = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(
            f"{where} holds a dict that is not a state_dict: entries {_listing(odd)} are not "
            "tensors (expected a state_dict, or a dict with one under 'state_dict' or 'model')"
        )
    return obj


def _parse_args_json(raw: bytes, path: Path) -> tuple[str, dict[str, Any]]:
    """``(class name, constructor kwargs)`` from an ``args.json``."""
    try:
        spec = json.loads(raw)
        name, kwargs = spec["__name__"], spec.get("__args__", {})
        if not isinstance(name, str) or not isinstance(kwargs, dict):
            raise TypeError("__name__ must be a string and __args__ an object")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: args.json is not a PhysicsNeMo model description "
            f'{{"__name__": ..., "__args__": {{...}}}} ({type(err).__name__}: {err})'
        ) from None
    return name, kwargs


def _backbone(wrapper: str, args: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """``(class, arguments)`` of the backbone a PhysicsNeMo preconditioner checkpoint wraps."""
    default, own, channels = _PRECONDITIONERS[wrapper]
    try:
        in_channels, out_channels = channels(args)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: args.json of {wrapper} lacks or mistypes its channel counts ({err!r})") from None
    if wrapper == "EDMPrecondSR" and args.get("scale_cond_input", True):
        warnings.warn(
            f"{path}: EDMPrecondSR with scale_cond_input=True scaled the conditioning image by c_in; diffexport's "
            "preconditioners concatenate it unscaled, so the denoiser differs from PhysicsNeMo's (the backbone loads as is)",
            stacklevel=4,
        )
    skip = {"img_resolution", "img_channels", "img_in_channels", "img_out_channels", "use_fp16", "model_type",
            "scale_cond_input", *own}
    if wrapper in _NO_LABEL_DIM:
        skip.discard("label_dim")
    kwargs = {k: v for k, v in args.items() if k not in skip}
    backbone = dict(img_resolution=args.get("img_resolution"), in_channels=in_channels, out_channels=out_channels)
    return args.get("model_type", default), {**backbone, **kwargs}


def _build(name: str, kwargs: dict[str, Any], path: Path, stored_name: str) -> torch.nn.Module:
    """``name(**kwargs)`` from the diffexport model registry (``stored_name``: the class the checkpoint names)."""
    cls = get_model_class(name)  # (a known name: _model_of checked it)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        hint = ""
        if kwargs.get("use_apex_gn"):  # trained on GPU with apex; PhysicsNeMo too loads it with this override
            hint = "; load it with args={'use_apex_gn': False} (recipe: model.args.use_apex_gn: false)"
        if name != stored_name:
            hint += f"; the checkpoint holds a {stored_name}, not a {name} (recipe: model.class)"
        raise CheckpointError(
            f"cannot build {name} from the constructor arguments of {path} ({err}){hint}; "
            f"arguments: {kwargs}"
        ) from None


def _load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` strictly, reporting every missing, unexpected and
    mis-shaped key at once. Models' own load_state_dict pre-hooks (legacy names) still apply."""
    expected = model.state_dict().keys()
    state = dict(state)
    drop_device_buffers(state)  # PhysicsNeMo 1.x (beside a wrapper's ``model.`` keys too)
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in expected
        ):
            state = {k[len(prefix) :]: v for k, v in state.items()}

    seen: dict[str, list[str]] = {}

    def record(_module: torch.nn.Module, keys: Any) -> None:  # runs last, after models' hooks
        seen.update(missing=list(keys.missing_keys), unexpected=list(keys.unexpected_keys))

    handle = model.register_load_state_dict_post_hook(record)
    try:
        model.load_state_dict(state, strict=False)
        mismatched = []
    except RuntimeError as err:  # raised (after the hook ran) only for shape mismatches
        mismatched = _SIZE_MISMATCH.findall(str(err))
        if not mismatched:
            raise CheckpointError(f"cannot load the weights of {path}: {err}") from None
    finally:
        handle.remove()

    shapes = [f"{k} (model expects {want}, checkpoint has {got})" for k, got, want in mismatched]
    found = {"missing keys": seen["missing"], "unexpected keys": seen["unexpected"]}
    found["shape mismatches"] = shapes
    problems = [f"{what} ({len(keys)}): {_listing(keys)}" for what, keys in found.items() if keys]
    if problems:
        raise CheckpointError(
            f"the weights in {path} do not fit the {type(model).__name__} built from its "
            f"arguments: {'; '.join(problems)}"
        )


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"
