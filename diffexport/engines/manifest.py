"""``manifest.json``: read, write (atomically), hash, and the content key of a build.

The format is documented in ``docs/ENGINE_FORMAT.md``; this module is its only reader and writer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import diffexport
from diffexport.engines.base import EngineError
from diffexport.fileio import write_atomic

FORMAT = "diffexport-engine/1"
MANIFEST = "manifest.json"
STATUSES = ("ok", "failed", "unchecked")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of ``value`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the tools that shape an engine (``None``: not installed)."""
    trt = next((v for d in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12") if (v := _version(d))), None)
    return {
        "diffexport": diffexport.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "tensorrt": trt,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """``{"type", "name", "compute_capability"}`` of ``device`` (capability ``"9.0"`` on CUDA, else None)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {device} requested but CUDA is not available")
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    return {"type": device.type, "name": _cpu_name(), "compute_capability": None}


_SOURCE_SUFFIXES = frozenset({".py", ".cpp", ".cc", ".h", ".hpp", ".txt", ".cmake", ".pbtxt", ".json", ".yaml"})


@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """Hex sha256 of diffexport's own source files (Python, C++, CMake; by relative path; hidden and
    ``build`` folders left out), so a changed exporter (an upgrade, an edit) makes a different content key."""
    root = Path(diffexport.__file__).resolve().parent
    h = hashlib.sha256()
    def source(p: Path) -> bool:
        parts = p.relative_to(root).parts
        return p.is_file() and p.suffix in _SOURCE_SUFFIXES and not any(x.startswith(".") or x in ("__pycache__", "build") for x in parts)

    for path in sorted(filter(source, root.rglob("*"))):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def content_key(weights_sha: str, resolved_recipe: dict, versions: dict, device: dict, stages: Sequence[str] = (),
                source: str | None = None) -> str:
    """What makes two builds identical: weights, resolved recipe (targets included), tools, device,
    the names of the finalize ``stages`` that ran (parity, deploy), and diffexport's own ``source``
    (default :func:`source_sha256`)."""
    return sha256_json({"weights": weights_sha, "recipe": resolved_recipe, "versions": versions, "device": device,
                        "stages": list(stages), "source": source or source_sha256()})


def inside(engine_dir: str | Path, name: str) -> Path:
    """``engine_dir / name`` resolved; ``EngineError`` when ``name`` is absolute, not a string, or
    resolves (through ``..`` or a symlink) outside the engine directory."""
    root = Path(engine_dir).resolve()
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise EngineError(f"{Path(engine_dir) / MANIFEST}: file path {name!r} must be relative to the engine directory")
    path = (root / name).resolve()
    if path != root and root not in path.parents:
        raise EngineError(f"{Path(engine_dir) / MANIFEST}: file path {name!r} leaves the engine directory {root}; refused")
    return path


def file_record(engine_dir: Path, files: list[str]) -> dict[str, Any]:
    """``{"file", "sha256", "bytes", "files"}`` for an artifact made of ``files`` (the first is the main one)."""
    hashes = {name: sha256_file(inside(engine_dir, name)) for name in files}
    return {
        "file": files[0],
        "sha256": hashes[files[0]],
        "bytes": sum(inside(engine_dir, name).stat().st_size for name in files),
        "files": hashes,
    }


CACHE_DIR = "__pycache__"  # Python's bytecode cache, written when a hashed model.py is imported: not hashed, not an unlisted file


def hash_tree(engine_dir: str | Path, subdir: str) -> dict[str, Any]:
    """``{"dir", "files": {path: sha256}, "bytes"}`` of every file under ``engine_dir/subdir`` (paths
    relative to ``engine_dir``, sorted). Symlinks and anything but files and folders are refused."""
    engine_dir = Path(engine_dir)
    root = inside(engine_dir, subdir)
    if not root.is_dir():
        raise EngineError(f"{root}: not a folder; nothing to hash")
    files, total = {}, 0
    for path in sorted(root.rglob("*")):
        if CACHE_DIR in path.relative_to(root).parts:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise EngineError(f"{path}: symlinks and special files are not allowed in an engine directory")
        if path.is_file():
            name = path.relative_to(engine_dir.resolve()).as_posix()
            files[name], total = sha256_file(path), total + path.stat().st_size
    return {"dir": Path(subdir).as_posix(), "files": files, "bytes": total}


def record_tree(engine_dir: str | Path, manifest: dict, subdir: str, key: str | None = None) -> dict[str, Any]:
    """:func:`hash_tree` of ``subdir`` stored as ``manifest["hashes"][key or subdir]``; returns it."""
    record = hash_tree(engine_dir, subdir)
    manifest.setdefault("hashes", {})[key or subdir] = record
    return record


def _record_files(record: Any, where: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise EngineError(f"{where}: expected a file record {{file, sha256}}, got {type(record).__name__}")
    files = record.get("files")
    if files is None and "file" in record and "sha256" in record:
        files = {record["file"]: record["sha256"]}
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise EngineError(f"{where}: 'files' must map relative paths to sha256 hex strings")
    return files


def verify_record(engine_dir: str | Path, record: dict, where: str = MANIFEST) -> None:
    """``EngineError`` naming the first file of ``record`` that is missing, outside the engine
    directory, or whose sha256 differs; for a tree record (``"dir"``) also any unlisted file."""
    engine_dir = Path(engine_dir)
    files = _record_files(record, f"{engine_dir / MANIFEST}: {where}")
    if isinstance(record.get("file"), str) and record["file"] not in files:
        raise EngineError(f"{engine_dir / MANIFEST}: {where}: file {record['file']!r} is not among its hashed files")
    for name, want in files.items():
        path = inside(engine_dir, name)
        if not path.is_file():
            raise EngineError(f"{engine_dir / name}: file is missing (listed in {MANIFEST} {where})")
        if sha256_file(path) != want:
            raise EngineError(f"{engine_dir / name}: sha256 does not match {MANIFEST} ({where}): the file was changed, corrupted or truncated; rebuild the engine")
    if "dir" in record:
        root = inside(engine_dir, record["dir"])
        listed = {inside(engine_dir, name) for name in files}
        for path in sorted(root.rglob("*")) if root.is_dir() else ():
            if CACHE_DIR in path.relative_to(root).parts:
                continue
            if (path.is_file() or path.is_symlink()) and path.resolve() not in listed:
                raise EngineError(f"{path}: file is not listed in {MANIFEST} ({where}); it was added after the build; rebuild the engine")


def verify_files(engine_dir: Path, record: dict) -> None:
    """Alias of :func:`verify_record` (kept for existing callers)."""
    verify_record(engine_dir, record)


def hash_records(manifest: dict) -> dict[str, dict]:
    """Every hash record of ``manifest`` by where it sits: ``weights``, ``recipe_file``,
    ``artifacts.<target>`` and ``hashes.<key>`` (the deploy folders)."""
    records: dict[str, Any] = {}
    for key in ("weights", "recipe_file"):
        if key in manifest:
            records[key] = manifest[key]
    for group in ("artifacts", "hashes"):
        value = manifest.get(group) or {}
        if not isinstance(value, dict):
            raise EngineError(f"{MANIFEST}: {group} must be an object, got {type(value).__name__}")
        records.update({f"{group}.{k}": v for k, v in value.items()})
    return records


def engine_problems(engine_dir: str | Path, manifest: dict) -> list[str]:
    """One line per hash record of ``manifest`` that does not verify (empty: everything intact)."""
    problems = []
    for where, record in hash_records(manifest).items():
        try:
            verify_record(engine_dir, record, where)
        except (EngineError, OSError) as e:
            problems.append(str(e))
    if "recipe_file" not in manifest:
        problems.append(f"{Path(engine_dir) / MANIFEST}: recipe.yaml is not hashed (recipe_file missing); rebuild the engine")
    return problems


# top-level fields every consumer reads, and their JSON types
REQUIRED = {"name": str, "status": str, "recipe": dict, "io": dict, "sampler": dict, "weights": dict, "artifacts": dict}


def read_manifest(engine_dir: str | Path) -> dict:
    """The manifest of ``engine_dir``, checked by :func:`check_manifest`; ``EngineError`` naming the
    file when absent, invalid, of another format, or inconsistent."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if _is_leftover(engine_dir):
        raise EngineError(f"{engine_dir}: a leftover of an interrupted build (hidden .building/.old folder), not an engine; "
                          "rebuild, or delete it")
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise EngineError(f"{path}: not found; is {engine_dir} an engine directory built by `diffexport build`?") from None
    except IsADirectoryError:
        raise EngineError(f"{path}: is a folder, not a manifest file") from None
    except (OSError, ValueError, RecursionError) as e:
        raise EngineError(f"{path}: cannot read manifest ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EngineError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    check_manifest(path, manifest)
    return manifest


def _is_leftover(engine_dir: Path) -> bool:
    """Whether ``engine_dir`` is another process's temporary build folder (``.NAME.<pid>.*.building``,
    an interrupted or running build) or a moved-aside old engine (``.NAME.<pid>.old``). The build's
    own stages (parity, deploy) run in the building process and may read its folder."""
    m = LEFTOVER.fullmatch(engine_dir.absolute().name)
    return bool(m) and int(m.group(2)) != os.getpid()


# ``.NAME.<pid>.<anything>.building`` (a build's temporary folder) or ``.NAME.<pid>.old`` (a moved-aside
# engine): groups name, pid, and "building" or "old"
LEFTOVER = re.compile(r"\.(.+)\.(\d+)\.(?:.*\.(building)|(old))")


def check_manifest(path: Path, manifest: dict) -> None:
    """``EngineError`` naming the field when a required field is missing or of the wrong type, the
    status is unknown, or ``io`` is not the contract that follows from ``recipe``. An ``io`` without
    the ranges of its index inputs (older manifests) gets them from the recipe, in ``manifest``."""
    from diffexport.recipes import IOSpec, RecipeError, io_spec, parse_recipe

    for key, kind in REQUIRED.items():
        if key not in manifest:
            raise EngineError(f"{path}: field '{key}' is missing; the manifest is damaged or edited, rebuild the engine")
        if not isinstance(manifest[key], kind):
            raise EngineError(f"{path}: field '{key}' must be a JSON {'object' if kind is dict else 'string'}, got {type(manifest[key]).__name__}")
    if manifest["status"] not in STATUSES:
        raise EngineError(f"{path}: status {manifest['status']!r} is not one of {', '.join(STATUSES)}")
    try:
        io = IOSpec.from_dict(manifest["io"])
        recipe = parse_recipe(manifest["recipe"], f"{path}: recipe")
        if recipe.model.class_name is None:  # a build writes the class and args it built (from the checkpoint's args.json)
            raise RecipeError("model.class: missing; the manifest's recipe is the resolved one")
        want = io_spec(recipe).to_dict()
    except RecipeError as e:
        raise EngineError(f"{path}: field 'recipe' is not a valid recipe: {str(e).splitlines()[-1].strip()}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EngineError(f"{path}: field 'io' is invalid ({type(e).__name__}: {e})") from None
    got = io.to_dict()
    if got != want and got == _without_index_ranges(want):  # written before io recorded them: from the recipe
        manifest["io"] = got = want
    if got != want:
        raise EngineError(f"{path}: field 'io' does not match the engine's recipe (expected {json.dumps(want, separators=(',', ':'))[:300]}); "
                          "the manifest was edited, rebuild the engine")
    _check_sampler(path, manifest["sampler"], recipe)


def _without_index_ranges(io: dict) -> dict:
    """``io`` without the ``high`` of its index inputs (the form manifests had before they recorded it)."""
    return {**io, "inputs": [{k: v for k, v in s.items() if k != "high"} for s in io["inputs"]]}


def _finite_list(value: Any, length: int | None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _check_sampler(path: Path, sampler: dict, recipe: Any) -> None:
    """``EngineError`` unless ``sampler`` is the one of ``recipe``: same scheduler class (its args a
    superset of the recipe's, constructible), solver, steps, options, patching and the preconditioner's
    ``round_sigma``, with N + 1 finite ``time_steps`` / ``sigmas`` (≥ 0)."""
    from diffexport.diffusion import noise_schedulers, samplers

    def bad(field: str, why: str) -> EngineError:
        return EngineError(f"{path}: field 'sampler.{field}' {why}; the manifest is damaged or edited, rebuild the engine")

    want = recipe.sampler
    scheduler = sampler.get("scheduler")
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("args", {}), dict):
        raise bad("scheduler", "must be an object {class, args}")
    if scheduler.get("class") != want.scheduler.class_name:
        raise bad("scheduler.class", f"is {scheduler.get('class')!r}, but the recipe says {want.scheduler.class_name!r}")
    args = scheduler.get("args", {})
    if any(k not in args or args[k] != v for k, v in want.scheduler.args.items()):
        raise bad("scheduler.args", f"differ from the recipe's {want.scheduler.args}")
    try:
        getattr(noise_schedulers, want.scheduler.class_name)(**args)
    except Exception as e:  # noqa: BLE001 (any constructor refusal)
        raise bad("scheduler.args", f"are refused by {want.scheduler.class_name} ({type(e).__name__}: {e})") from None
    for field, value in (("solver", want.solver), ("num_steps", want.num_steps), ("solver_options", dict(want.solver_options)),
                         ("patching", want.patching.model_dump() if want.patching else None)):
        if sampler.get(field, None if field == "patching" else ...) != value:
            raise bad(field, f"is {sampler.get(field)!r}, but the recipe says {value!r}")
    if want.solver not in samplers.SOLVERS:
        raise bad("solver", f"{want.solver!r} is not one of {', '.join(samplers.SOLVERS)}")
    from diffexport.diffusion.preconditioners import rounding_spec

    try:
        rounding = rounding_spec(recipe.preconditioner.class_name, recipe.preconditioner.args)
    except (TypeError, ValueError) as e:
        raise bad("round_sigma", f"cannot follow from the recipe's preconditioner ({e})") from None
    if sampler.get("round_sigma") != rounding:  # the preconditioner's noise levels, for churned ones
        raise bad("round_sigma", f"is {sampler.get('round_sigma')!r}, but the recipe's preconditioner gives {rounding!r}")
    n = want.num_steps + 1
    if not _finite_list(sampler.get("sigmas"), n) or any(v < 0 for v in sampler["sigmas"]):
        raise bad("sigmas", f"must be {n} finite numbers >= 0")
    for field in ("time_steps", "alphas"):
        if field in sampler and not _finite_list(sampler[field], n):
            raise bad(field, f"must be {n} finite numbers")


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    write_atomic(path, (json.dumps(value, indent=2, allow_nan=False) + "\n").encode())


def write_manifest(engine_dir: str | Path, manifest: dict) -> None:
    """Write ``manifest.json`` in ``engine_dir`` atomically."""
    write_json(Path(engine_dir) / MANIFEST, manifest)


def mark(engine_dir: str | Path, status: str | None = None, parity: dict | None = None, **fields: Any) -> dict:
    """Update ``status`` (ok | failed | unchecked), the ``parity`` summary and any other top-level
    ``fields`` of an engine's manifest, atomically; returns the new manifest."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    manifest = read_manifest(engine_dir)
    updates = {"status": status, "parity": parity, **fields}
    manifest.update({k: v for k, v in updates.items() if v is not None})
    write_manifest(engine_dir, manifest)
    return manifest
