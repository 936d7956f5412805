"""``manifest.json``: read, write (atomically), hash, and the content key of a build.

The format is documented in ``docs/ENGINE_FORMAT.md``; this module is its only reader and writer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
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


def file_record(engine_dir: Path, files: list[str]) -> dict[str, Any]:
    """``{"file", "sha256", "bytes", "files"}`` for an artifact made of ``files`` (the first is the main one)."""
    hashes = {name: sha256_file(engine_dir / name) for name in files}
    return {
        "file": files[0],
        "sha256": hashes[files[0]],
        "bytes": sum((engine_dir / name).stat().st_size for name in files),
        "files": hashes,
    }


def verify_files(engine_dir: Path, record: dict) -> None:
    """``EngineError`` naming the first file of ``record`` that is missing or whose sha256 differs."""
    for name, want in (record.get("files") or {record["file"]: record["sha256"]}).items():
        path = engine_dir / name
        if not path.is_file():
            raise EngineError(f"{path}: file is missing (listed in {MANIFEST})")
        if sha256_file(path) != want:
            raise EngineError(f"{path}: sha256 does not match {MANIFEST}: the file is corrupted or truncated; rebuild the engine")


def read_manifest(engine_dir: str | Path) -> dict:
    """The manifest of ``engine_dir``; ``EngineError`` naming the file when absent, invalid or of another format."""
    path = Path(engine_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: not found; is {engine_dir} an engine directory built by `diffexport build`?") from None
    except (OSError, ValueError) as e:
        raise EngineError(f"{path}: cannot read manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EngineError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    return manifest


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
