"""``build_engine``: a recipe into an engine directory (``docs/ENGINE_FORMAT.md``), built atomically.

Stages, each timed into ``manifest["stages"]`` and reported to ``progress``: ``load`` (model and
preconditioner; ``weights.pt``), ``export`` (the one ``torch.export``), ``export:<target>`` per
target, then the ``finalize`` callables (parity, deploy) inside the temporary directory. The
temporary sibling directory replaces the engine directory only when every stage succeeded.
"""

from __future__ import annotations

import copy
import json
import math
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

from diffexport.diffusion import samplers
from diffexport.diffusion.preconditioners import rounding_spec, sigma_rounding
from diffexport.engines.base import EngineError
from diffexport.engines.manifest import (
    FORMAT, LEFTOVER, MANIFEST, content_key, device_info, file_record, engine_problems, hash_records, read_manifest, sha256_file, versions,
    write_manifest,
)  # fmt: skip
from diffexport.fileio import unwritable, write_atomic
from diffexport.engines.torch_engine import backbone
from diffexport.export import (
    FILENAMES, GROUP_NORM_OPSET, Denoiser, TargetUnavailable, build_denoiser, check_recipe, export_program, export_target,
    precision_unsupported, require,
)  # fmt: skip
from diffexport.export.validate import resolved_args, scheduler_of
from diffexport.export.worker import AotiWorker
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
    seconds: float = 0.0  # wall clock (the AOTI stages overlap the others, so the stage times add up to more)

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
        self.done(name, time.perf_counter() - start, detail)

    def done(self, name: str, seconds: float, detail: str = "") -> None:
        self.times[name] = round(seconds, 3)
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


def _json_number(v):
    """``v`` for strict JSON: non-finite floats as the strings ``"inf"`` / ``"-inf"`` / ``"nan"``."""
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def sampler_schedule(recipe: Recipe) -> dict:
    """The manifest's ``sampler`` (``docs/ENGINE_FORMAT.md``): the scheduler with every argument
    resolved (defaults included), the solver and its resolved ``solver_args``, the discretisation
    ``time_steps`` (N + 1, trailing end time), the EDM ``sigmas`` σ(t)/α(t) the engine receives,
    ``alphas``, and ``steps``: every solver step as plain coefficients (what the C++ runner reads)."""
    s = recipe.sampler
    scheduler = scheduler_of(recipe)
    cls, solver = type(scheduler), samplers.SOLVERS[s.solver]
    rounding = rounding_spec(recipe.preconditioner.class_name, recipe.preconditioner.args)  # iDDPM's levels, else None
    round_sigma = rounding and sigma_rounding(rounding["class"], rounding["args"])
    try:  # the runtime's float64 times (int64 when discrete) at the preconditioner's levels, as EDM's samplers round them
        t = samplers.round_time_steps(scheduler, scheduler.timesteps(s.num_steps, dtype=torch.float64), round_sigma)
        steps = samplers.step_table(scheduler, s.solver, t, s.solver_options, round_sigma)
    except (TypeError, ValueError) as e:  # check_recipe refuses these first
        raise RecipeError(f"{_source(recipe)}: sampler: {s.scheduler.class_name} with {s.solver}: {e}") from None
    alphas, sigmas = scheduler.alpha(t).double(), scheduler.edm_sigma(t if not t.is_floating_point() else t.double())
    solver_args = resolved_args(solver, s.solver_options, skip=1, supplied=samplers.SUPPLIED)
    return {
        "scheduler": {"class": s.scheduler.class_name, "args": resolved_args(cls, s.scheduler.args)},
        "solver": s.solver, "num_steps": s.num_steps, "solver_options": dict(s.solver_options),
        "solver_args": {k: _json_number(v) for k, v in solver_args.items()},
        "discrete": not t.is_floating_point(),
        "time_steps": t.tolist(), "sigmas": sigmas.double().tolist(), "alphas": alphas.tolist(),
        "patching": s.patching.model_dump() if s.patching else None,
        "steps": steps,
        **({"guidance": s.guidance.model_dump()} if s.guidance else {}),
        **({"round_sigma": rounding} if rounding else {}),
        **({"clip": list(s.clip)} if s.clip else {}),
    }  # fmt: skip


AUTO_TARGETS = ("onnx", "aoti", "tensorrt", "openvino")  # ``targets: auto``: each one available here
LOW_PRECISION_TARGETS = ("aoti", "openvino")  # those that run bf16 on CPU; ``precision: auto`` adds them as <target>-bf16


@dataclass(frozen=True)
class Candidate:
    """One artifact of a build: manifest key ``key`` (``aoti-bf16``), export ``target``, ``precision``."""

    key: str
    target: str
    precision: str


def candidates(recipe: Recipe) -> list[Candidate]:
    """The artifacts ``recipe`` asks for, ONNX first (OpenVINO and TensorRT build from it).

    ``targets: auto`` means every target of :data:`AUTO_TARGETS`; ``precision: auto`` builds them
    in fp32 and adds a bf16 candidate of each of :data:`LOW_PRECISION_TARGETS`.
    """
    e = recipe.export
    targets = sorted(AUTO_TARGETS if e.auto else e.targets, key=list(FILENAMES).index)
    primary = "fp32" if e.precision == "auto" else e.precision
    out = [Candidate(t, t, primary) for t in targets]
    if e.precision == "auto":
        out += [Candidate(f"{t}-bf16", t, "bf16") for t in targets if t in LOW_PRECISION_TARGETS]
    return out


def _filename(c: Candidate) -> str:
    """The artifact's file: the target's, with ``-bf16`` before the suffix for a variant (``denoiser.bf16.pt2``)."""
    name = FILENAMES[c.target]
    return name if c.key == c.target else name.replace("denoiser.", f"denoiser.{c.precision}.", 1)


def emulated_bf16(c: Candidate, device: str) -> str | None:
    """Why the ``precision: auto`` bf16 candidate ``c`` is left out on this CPU (``None``: it is
    built): without AVX512-BF16 or AMX, torch emulates bf16 (5-7x slower than fp32 on EDM CIFAR-10),
    so it could never win the ranking. An explicit ``precision: bf16`` is built anyway."""
    if c.key == c.target or c.precision != "bf16" or c.target != "aoti" or device != "cpu":
        return None
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return (f"this CPU has no native bf16 (AVX512-BF16 or AMX; torch sees {torch.backends.cpu.get_cpu_capability()}): "
            "bf16 would be emulated, several times slower than fp32")


def unavailable(target: str, precision: str = "fp32", opset: int = GROUP_NORM_OPSET) -> str | None:
    """Why ``target`` cannot be built here at ``precision`` (``None`` when it can): not at all
    (:func:`~diffexport.export.precision_unsupported`), TensorRT needs its package and a GPU,
    OpenVINO its package (and for bf16 a CPU with native bf16)."""
    if why := precision_unsupported(target, precision, opset):
        return why
    if target == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return f"the openvino package is not installed ({e}); pip install openvino"
        from diffexport.export.openvino import precision_unavailable

        return precision_unavailable(precision)
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
        if manifest.get("content_key") != key or manifest.get("status") == "failed" or engine_problems(engine_dir, manifest):
            return None
    except (EngineError, KeyError):
        return None
    return manifest


# What a build writes besides the hashed files (docs/ENGINE_FORMAT.md): only folders holding nothing
# else may be replaced or cleaned up (with the files listed in their manifest's hash records).
GENERATED_FILES = frozenset({MANIFEST, "recipe.yaml", "weights.pt", "parity.json", "parity.md", "parity.png", *FILENAMES.values()})
GENERATED_DIRS = frozenset({"triton", "triton-python", "cpp", ".cache"})  # .cache: parity reference cache
_KEY = re.compile(r"[0-9a-f]{64}")


def _foreign_files(folder: Path, manifest: dict | None) -> list[str]:
    """Files (and links) in ``folder`` that a build does not write: neither a generated name (``GENERATED_*``,
    ``denoiser.*``, temporary ``.*.tmp`` of an atomic write) nor listed in ``manifest``'s hash records."""
    listed: set[str] = set()
    for record in (manifest and _records(manifest) or {}).values():
        files = record.get("files") if isinstance(record, dict) else None
        listed |= set(files) if isinstance(files, dict) else {record.get("file")} if isinstance(record, dict) else set()
    foreign = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_dir() and not path.is_symlink():
            continue
        top = rel.parts[0]
        generated = (len(rel.parts) == 1 and (top in GENERATED_FILES or top.startswith("denoiser.") or top.endswith(".tmp"))) or top in GENERATED_DIRS
        if not generated and rel.as_posix() not in listed:
            foreign.append(rel.as_posix())
    return foreign


def _records(manifest: dict) -> dict:
    try:
        return hash_records(manifest)
    except EngineError:
        return {}


def _check_replaceable(engine_dir: Path) -> None:
    """``EngineError`` unless ``engine_dir`` is absent, an empty folder, or an engine this tool wrote:
    a valid manifest with a content key, and no file a build does not write (a user's folder that
    happens to hold a ``manifest.json`` is never replaced)."""
    if engine_dir.is_symlink() or (engine_dir.exists() and not engine_dir.is_dir()):
        raise EngineError(f"{engine_dir}: exists and is not a folder; refusing to replace it (choose another --out)")
    if not engine_dir.exists() or not any(engine_dir.iterdir()):
        return
    try:
        manifest = read_manifest(engine_dir)
    except EngineError as e:
        raise EngineError(f"{engine_dir}: exists and is not an engine directory built by diffexport ({e}); "
                          "refusing to replace it (choose another --out)") from None
    if not isinstance(manifest.get("content_key"), str) or not _KEY.fullmatch(manifest["content_key"]):
        raise EngineError(f"{engine_dir}: its {MANIFEST} has no content key, so diffexport did not write it; refusing to replace it")
    if foreign := _foreign_files(engine_dir, manifest):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise EngineError(f"{engine_dir}: holds files diffexport did not write ({shown}); refusing to replace it "
                          "(move them, or choose another --out)")


def _leftovers(engine_dir: Path) -> Iterator[tuple[Path, str, int]]:
    """``(path, "building" | "old", pid)`` of the temporary and moved-aside folders of ``engine_dir``'s builds."""
    for path in engine_dir.parent.iterdir():
        m = LEFTOVER.fullmatch(path.name)
        if m and m.group(1) == engine_dir.name and path.is_dir() and not path.is_symlink():
            yield path, m.group(3) or m.group(4), int(m.group(2))


def recover(engine_dir: Path) -> list[str]:
    """Repair after builds of ``engine_dir`` killed by SIGKILL (their process is gone): a moved-aside
    previous engine (``.NAME.<pid>.old``) is renamed back when ``engine_dir`` is missing (a crash
    between the two renames of the swap), else removed; a temporary ``.building`` folder is removed.
    Only folders holding nothing but what a build writes are removed. Returns what was done."""
    done = []
    for path, kind, pid in sorted(_leftovers(engine_dir), key=lambda item: item[1] != "old"):  # restore first
        if _alive(pid):
            continue
        if kind == "old" and not engine_dir.exists():
            os.rename(path, engine_dir)
            done.append(f"restored the previous engine {engine_dir} from {path.name} (an earlier build was interrupted during the swap)")
            continue
        try:
            manifest = read_manifest_unchecked(path)
        except EngineError:
            manifest = None
        if _foreign_files(path, manifest):
            done.append(f"left {path} in place: it holds files a build does not write")
            continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}, left by an interrupted build")
    return done


def read_manifest_unchecked(folder: Path) -> dict | None:
    """The JSON of ``folder/manifest.json`` (no checks; ``None`` when absent), for cleaning up leftovers."""
    try:
        value = json.loads((folder / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise EngineError(f"{folder / MANIFEST}: {e}") from None
    return value if isinstance(value, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _replace(tmp: Path, engine_dir: Path) -> None:
    """Rename ``tmp`` to ``engine_dir``, the old directory (if any) moved aside first, then deleted.
    Killed between the two renames, the previous engine waits in ``.NAME.<pid>.old`` and the next
    build (:func:`recover`) renames it back."""
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
    start = time.perf_counter()
    recipe = check_recipe(resolve_recipe(load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe, targets))
    engine_dir = engine_dir_for(recipe, out_dir)
    if why := unwritable(engine_dir.parent):  # (it is built beside its place, then renamed)
        raise EngineError(f"{engine_dir}: cannot build the engine there: {why}")
    _check_replaceable(engine_dir)
    stages, todo = _Stages(progress), candidates(recipe)
    skipped = {c.key: why for c in todo if (why := unavailable(c.target, c.precision, recipe.export.opset) or emulated_bf16(c, recipe.export.device))}
    if len(skipped) == len(todo):
        raise TargetUnavailable("nothing left to build: " + "; ".join(f"{t}: {why}" for t, why in skipped.items()))
    io, schedule = io_spec(recipe), sampler_schedule(recipe)
    try:  # fails early when CUDA is asked for and absent
        device, tools = device_info(recipe.export.device), versions()
    except EngineError as e:
        raise EngineError(f"{_source(recipe)}: export.device: {e}; build on a machine with a CUDA GPU, or use export.device: cpu") from None
    gpu = device_info("cuda") if any(c.target == "tensorrt" and c.key not in skipped for c in todo) else None
    engine_dir.parent.mkdir(parents=True, exist_ok=True)
    for line in recover(engine_dir):
        stages.skip("recover", line)
        if progress is None:
            warnings.warn(line, stacklevel=2)
    _check_replaceable(engine_dir)
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
        write_atomic(tmp / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
        manifest = {
            "format": FORMAT, "name": recipe.name, "status": "unchecked", "content_key": key,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "recipe": resolved,
            "recipe_file": file_record(tmp, ["recipe.yaml"]), "io": io.to_dict(), "sampler": schedule, "weights": weights, "artifacts": {}, "versions": tools,
            "device": device, "stages": stages.times, "skipped": skipped,
        }  # fmt: skip
        programs = _Programs(denoiser, io, stages)
        for precision in _precisions([c for c in todo if c.key not in skipped]):
            programs(precision)
        worker = _aoti_worker([c for c in todo if c.key not in skipped], programs, io, recipe, tmp, stages)
        try:  # the worker's compiles are collected last: the other targets are lowered meanwhile
            for c in sorted(todo, key=lambda c: worker is not None and c.key in worker.keys):
                if c.key not in skipped:  # ``skipped`` is ``manifest["skipped"]``; ``_export`` may add to it
                    _export(c, programs, io, recipe, tmp, manifest, stages, worker)
                if c.key in skipped:
                    stages.skip(f"export:{c.key}", skipped[c.key])
                    if progress is None and not recipe.export.auto:
                        warnings.warn(f"{recipe.name}: target {c.key} skipped: {skipped[c.key]}", stacklevel=2)
        finally:
            if worker is not None:
                worker.close()
        manifest["artifacts"] = {c.key: manifest["artifacts"][c.key] for c in todo if c.key in manifest["artifacts"]}
        if not manifest["artifacts"]:
            raise TargetUnavailable("nothing was built: " + "; ".join(f"{t}: {why}" for t, why in skipped.items()))
        write_manifest(tmp, manifest)
        for fn in finalize:
            _finalize(fn, tmp, manifest, stages)
        _replace(tmp, engine_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wall = time.perf_counter() - start
    return BuildResult(engine_dir, manifest, True, f"built {engine_dir} ({', '.join(manifest['artifacts'])}) in {wall:.1f} s", wall)


def _precisions(todo: list[Candidate]) -> list[str]:
    """The programs the candidates lower, the build's precision first (OpenVINO's is fp32 when no fp32 ONNX is built)."""
    fp32_onnx = any(c.target == "onnx" and c.precision == "fp32" for c in todo)
    needed = ["fp32" if c.target == "openvino" and not fp32_onnx else c.precision for c in todo if c.target != "openvino" or not fp32_onnx]
    return list(dict.fromkeys(needed))


class _Programs:
    """The one ``torch.export`` per precision: stage ``export`` for the first, ``export (bf16)`` for others
    (traced inside a target's stage when that needs one that was not planned)."""

    def __init__(self, denoiser: Denoiser, io: IOSpec, stages: _Stages):
        self.denoiser, self.io, self.stages, self.done = denoiser, io, stages, {}

    def __call__(self, precision: str) -> ExportedProgram:
        if precision not in self.done:
            with self.stages("export" if not self.done else f"export ({precision})", f"torch.export, {precision}"):
                self.done[precision] = export_program(self.denoiser, self.io, precision)
        return self.done[precision]


def _aoti_worker(todo: list[Candidate], programs: _Programs, io: IOSpec, recipe: Recipe, tmp: Path, stages: _Stages) -> AotiWorker | None:
    """An :class:`~diffexport.export.worker.AotiWorker` compiling the AOTInductor candidates of
    ``todo`` while this process lowers the others; ``None`` (compile in-process) when there are no
    others to overlap with, or when the programs cannot be handed to a worker (reported)."""
    aoti = [c for c in todo if c.target == "aoti"]
    if not aoti or len(aoti) == len(todo):
        return None
    jobs = {c.key: (programs(c.precision), tmp / _filename(c), c.precision) for c in aoti}
    work = tmp / ".aoti-worker.tmp"  # inside the build folder: cleaned up with it
    try:
        return AotiWorker(jobs, io, recipe.export.device, work)
    except Exception as e:  # noqa: BLE001 -- e.g. a program torch.export.save cannot serialise
        shutil.rmtree(work, ignore_errors=True)
        stages.skip("aoti-worker", f"AOTInductor compiles in this process: no worker process ({type(e).__name__}: {e})")
        return None


def _export(c: Candidate, programs: _Programs, io: IOSpec, recipe: Recipe, tmp: Path, manifest: dict, stages: _Stages,
            worker: AotiWorker | None = None) -> None:
    """Lower the program to candidate ``c`` in ``tmp`` (or collect it from ``worker``) and record
    it, or record why it was skipped.

    OpenVINO compiles an fp32 graph (its precision is a compile hint): the build's ONNX when that
    is fp32, else an fp32 program. With ``targets: auto`` a target whose export fails is skipped
    with the reason (the others still make an engine); named targets fail the build.
    """
    onnx = manifest["artifacts"].get("onnx")
    e = recipe.export
    fp32_graph = c.target == "openvino"
    onnx_path = tmp / onnx["file"] if onnx and (not fp32_graph or onnx["precision"] == "fp32") else None
    try:
        if worker is not None and c.key in worker.keys:
            detail = f"{_filename(c)} (compiled in a worker process beside the other targets)"
            stages.progress(f"export:{c.key}", "start", 0.0, detail)
            fields, seconds = worker.result(c.key)
            stages.done(f"export:{c.key}", seconds, detail)
        else:
            with stages(f"export:{c.key}", _filename(c)):
                program = programs("fp32" if fp32_graph else c.precision)
                fields = export_target(c.target, program, io, tmp, precision=c.precision, opset=e.opset, device=e.device,
                                       onnx_path=onnx_path, filename=_filename(c))
    except TargetUnavailable as err:
        manifest["skipped"][c.key] = str(err)
        return
    except Exception as err:  # noqa: BLE001 -- auto: one failing target does not sink the others
        if not e.auto:
            raise
        manifest["skipped"][c.key] = f"export failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        return
    manifest["artifacts"][c.key] = {**fields, **file_record(tmp, list(fields["files"]))}
