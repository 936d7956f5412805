"""``build_engine``: a recipe into an engine directory (``docs/ENGINE_FORMAT.md``), built atomically.

Stages, each timed into ``manifest["stages"]`` and reported to ``progress``: ``load`` (model and
preconditioner; ``weights.pt``), ``export`` (the one ``torch.export``), ``export:<target>`` per
target, then the ``finalize`` callables (parity, deploy) inside the temporary directory. The
temporary sibling directory replaces the engine directory only when every stage succeeded.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from torch.export import ExportedProgram

from diffexport.diffusion import noise_schedulers
from diffexport.engines.base import EngineError
from diffexport.engines.manifest import (
    FORMAT, MANIFEST, content_key, device_info, file_record, read_manifest, sha256_file, verify_files, versions, write_manifest,
)  # fmt: skip
from diffexport.engines.torch_engine import backbone
from diffexport.export import FILENAMES, Denoiser, TargetUnavailable, build_denoiser, check_recipe, export_program, export_target, require
from diffexport.recipes import IOSpec, Recipe, RecipeError, io_spec, load_recipe, parse_recipe, resolve_path

Progress = Callable[[str, str, float, str], None]  # (stage, "start" | "done" | "skip", seconds, detail)
Finalize = Callable[[Path, dict], None]  # (temporary engine dir, manifest) -> None


@dataclass
class BuildResult:
    """What ``build_engine`` did: ``built`` is False when an identical engine was already there."""

    engine_dir: Path
    manifest: dict
    built: bool
    message: str

    @property
    def skipped(self) -> dict[str, str]:
        return self.manifest.get("skipped", {})


class _Stages:
    """Times named stages into ``times`` (seconds) and reports them to ``progress``."""

    def __init__(self, progress: Progress | None):
        self.progress = progress or (lambda *args: None)
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, detail: str = "") -> Iterator[None]:
        self.progress(name, "start", 0.0, detail)
        start = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - start, 3)
        self.progress(name, "done", self.times[name], detail)

    def skip(self, name: str, why: str) -> None:
        self.progress(name, "skip", 0.0, why)


def _source(recipe: Recipe) -> str:
    return str(recipe._source or "<recipe>")


def resolve_recipe(recipe: Recipe, targets: Sequence[str] | None = None) -> Recipe:
    """The recipe as built: defaults filled, paths absolute, ``targets`` (if given) replacing
    ``export.targets``; validated again, so a bad target is a ``RecipeError``."""
    data = recipe.model_dump(mode="json", by_alias=True)
    for section, key in (("model", "checkpoint"), (None, "output")):
        where = data[section] if section else data
        if where.get(key):
            where[key] = str(resolve_path(recipe, where[key]).resolve())
    if targets is not None:
        data["export"]["targets"] = list(targets)
    resolved = parse_recipe(data, _source(recipe))
    resolved._source = recipe._source
    return resolved


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as plain JSON data (what ``recipe.yaml`` and the manifest hold)."""
    return recipe.model_dump(mode="json", by_alias=True)


def engine_dir_for(recipe: Recipe, out_dir: str | Path | None = None) -> Path:
    """``out_dir``, else the recipe's ``output``, else ``engines/<name>`` under the working directory."""
    if out_dir is not None:
        return Path(out_dir).absolute()
    if recipe.output:
        return resolve_path(recipe, recipe.output).absolute()
    return (Path("engines") / recipe.name).absolute()


def sampler_schedule(recipe: Recipe) -> dict:
    """The manifest's ``sampler``: the recipe's sampler plus its discretisation ``time_steps``
    (N + 1, trailing end time), the EDM ``sigmas`` σ(t)/α(t) the engine receives, and ``alphas``."""
    s = recipe.sampler
    cls = getattr(noise_schedulers, s.scheduler.class_name, None)
    if cls is None:
        raise RecipeError(f"{_source(recipe)}: sampler.scheduler.class: {s.scheduler.class_name!r} is not in diffexport.diffusion.noise_schedulers")
    try:
        scheduler = cls(**s.scheduler.args)
        t = scheduler.timesteps(s.num_steps)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{_source(recipe)}: sampler.scheduler: {s.scheduler.class_name}: {e}") from None
    alphas, sigmas = scheduler.alpha(t).double(), scheduler.edm_sigma(t)
    return {
        "scheduler": {"class": s.scheduler.class_name, "args": dict(s.scheduler.args)},
        "solver": s.solver, "num_steps": s.num_steps, "solver_options": dict(s.solver_options),
        "time_steps": t.tolist(), "sigmas": sigmas.double().tolist(), "alphas": alphas.tolist(),
        "patching": s.patching.model_dump() if s.patching else None,
        **({"guidance": s.guidance.model_dump()} if s.guidance else {}),
    }  # fmt: skip


def unavailable(target: str) -> str | None:
    """Why ``target`` cannot be built here (``None`` when it can): TensorRT needs its package and a GPU."""
    if target != "tensorrt":
        return None
    try:
        require("tensorrt")
    except TargetUnavailable as e:
        return str(e)
    return None if torch.cuda.is_available() else "TensorRT builds need a CUDA GPU and torch sees none"


def _denoiser(recipe: Recipe) -> Denoiser:
    try:
        return build_denoiser(recipe)
    except RecipeError:
        raise
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{_source(recipe)}: model / preconditioner: cannot build them: {e}") from e


def _up_to_date(engine_dir: Path, key: str) -> dict | None:
    """The manifest of ``engine_dir`` when it was built with content ``key``, did not fail parity,
    and its files are intact (a failed engine is always rebuilt)."""
    try:
        manifest = read_manifest(engine_dir)
        if manifest.get("content_key") != key or manifest.get("status") == "failed":
            return None
        for record in (manifest["weights"], *manifest["artifacts"].values()):
            verify_files(engine_dir, record)
    except (EngineError, KeyError):
        return None
    return manifest


def _check_replaceable(engine_dir: Path) -> None:
    if engine_dir.exists() and not (engine_dir / MANIFEST).is_file() and (not engine_dir.is_dir() or any(engine_dir.iterdir())):
        raise EngineError(f"{engine_dir}: exists and is not an engine directory (no {MANIFEST}); refusing to replace it")


def _remove_stale(engine_dir: Path) -> None:
    """Remove leftovers of builds of ``engine_dir`` whose process is gone (killed with SIGKILL)."""
    pattern = re.compile(rf"\.{re.escape(engine_dir.name)}\.(\d+)\..*(building|old)$")
    for path in engine_dir.parent.iterdir():
        if (m := pattern.fullmatch(path.name)) and not _alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _replace(tmp: Path, engine_dir: Path) -> None:
    """Rename ``tmp`` to ``engine_dir``, the old directory (if any) moved aside first, then deleted."""
    if not engine_dir.exists():
        os.rename(tmp, engine_dir)
        return
    old = engine_dir.with_name(f".{engine_dir.name}.{os.getpid()}.old")
    os.rename(engine_dir, old)
    try:
        os.rename(tmp, engine_dir)
    except BaseException:
        os.rename(old, engine_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def stage_name(fn: Finalize | tuple[str, Finalize]) -> str:
    """A finalize stage's name: the first of a ``(name, callable)`` pair, else the function's name."""
    return fn[0] if isinstance(fn, tuple) else getattr(fn, "__name__", type(fn).__name__)


def _finalize(fn: Finalize | tuple[str, Finalize], tmp: Path, manifest: dict, stages: _Stages) -> None:
    """Run one finalize stage; keep its changes whether it edited ``manifest`` or rewrote ``manifest.json``."""
    name, fn = fn if isinstance(fn, tuple) else (stage_name(fn), fn)
    written = copy.deepcopy(manifest)
    with stages(name):
        fn(tmp, manifest)
    manifest.update({k: v for k, v in read_manifest(tmp).items() if written.get(k) != v})
    manifest.setdefault("stages", {}).update(stages.times)
    write_manifest(tmp, manifest)


def build_engine(
    recipe: Recipe | str | Path,
    out_dir: str | Path | None = None,
    targets: Sequence[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    finalize: Sequence[Finalize | tuple[str, Finalize]] = (),
) -> BuildResult:
    """Build ``recipe`` (a ``Recipe`` or a YAML path) into ``out_dir`` (default :func:`engine_dir_for`).

    ``targets`` overrides ``export.targets``. A TensorRT target that cannot be built here is skipped
    (reason under ``skipped`` in the manifest, reported to ``progress`` or as a warning) unless
    nothing else is left to build (``TargetUnavailable``). When ``out_dir`` already holds a build
    with the same content key and intact files, nothing is done unless ``force``. ``finalize``
    callables ``(tmp_engine_dir, manifest)`` (or ``(stage_name, callable)`` pairs) run last, inside
    the temporary directory, after ``manifest.json`` was written there; they may edit ``manifest``
    in place or rewrite ``manifest.json`` (e.g. with ``manifest.mark``); their names are part of
    the content key. Any exception (or Ctrl-C) removes the temporary directory and leaves
    ``out_dir`` as it was.
    """
    recipe = check_recipe(resolve_recipe(load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe, targets))
    engine_dir = engine_dir_for(recipe, out_dir)
    _check_replaceable(engine_dir)
    stages, targets = _Stages(progress), sorted(recipe.export.targets, key=list(FILENAMES).index)  # onnx first
    skipped = {t: why for t in targets if (why := unavailable(t))}
    if len(skipped) == len(targets):
        raise TargetUnavailable("nothing left to build: " + "; ".join(f"{t}: {why}" for t, why in skipped.items()))
    io, schedule = io_spec(recipe), sampler_schedule(recipe)
    device, tools = device_info(recipe.export.device), versions()  # (fails early when CUDA is asked for and absent)
    gpu = device_info("cuda") if "tensorrt" in set(targets) - set(skipped) else None
    engine_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(engine_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{engine_dir.name}.{os.getpid()}.", suffix=".building", dir=engine_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would become the engine directory's mode
        with stages("load", recipe.model.class_name):
            denoiser = _denoiser(recipe)
            torch.save(backbone(denoiser).state_dict(), tmp / "weights.pt")
        weights = {"file": "weights.pt", "sha256": sha256_file(tmp / "weights.pt")}
        resolved = recipe_dict(recipe)
        key = content_key(weights["sha256"], resolved, tools, {"export": device, "tensorrt": gpu}, [stage_name(f) for f in finalize])
        if not force and (existing := _up_to_date(engine_dir, key)) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            message = f"{engine_dir} is up to date (same weights, recipe, tools and device); nothing to do (force rebuilds)"
            stages.skip("build", message)
            return BuildResult(engine_dir, existing, False, message)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        manifest = {
            "format": FORMAT, "name": recipe.name, "status": "unchecked", "content_key": key,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "recipe": resolved,
            "io": io.to_dict(), "sampler": schedule, "weights": weights, "artifacts": {}, "versions": tools,
            "device": device, "stages": stages.times, "skipped": skipped,
        }  # fmt: skip
        with stages("export", f"torch.export, {recipe.export.precision}"):
            program = export_program(denoiser, io, recipe.export.precision)
        for target in targets:  # ``skipped`` is ``manifest["skipped"]``; ``_export`` may add to it
            if target not in skipped:
                _export(target, program, io, recipe, tmp, manifest, stages)
            if target in skipped:
                stages.skip(f"export:{target}", skipped[target])
                if progress is None:
                    warnings.warn(f"{recipe.name}: target {target} skipped: {skipped[target]}", stacklevel=2)
        if not manifest["artifacts"]:
            raise TargetUnavailable("nothing was built: " + "; ".join(f"{t}: {why}" for t, why in skipped.items()))
        write_manifest(tmp, manifest)
        for fn in finalize:
            _finalize(fn, tmp, manifest, stages)
        _replace(tmp, engine_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(stages.times.values())
    return BuildResult(engine_dir, manifest, True, f"built {engine_dir} ({', '.join(manifest['artifacts'])}) in {total:.1f} s")


def _export(target: str, program: ExportedProgram, io: IOSpec, recipe: Recipe, tmp: Path, manifest: dict, stages: _Stages) -> None:
    """Lower ``program`` to ``target`` in ``tmp`` and record it, or record why it was skipped."""
    onnx = tmp / FILENAMES["onnx"] if "onnx" in manifest["artifacts"] else None
    e = recipe.export
    try:
        with stages(f"export:{target}", FILENAMES[target]):
            fields = export_target(target, program, io, tmp, precision=e.precision, opset=e.opset, device=e.device, onnx_path=onnx)
    except TargetUnavailable as err:
        manifest["skipped"][target] = str(err)
        return
    manifest["artifacts"][target] = {**fields, **file_record(tmp, list(fields["files"]))}
