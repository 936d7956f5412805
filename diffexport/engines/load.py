"""``load(engine_dir, backend)``: an engine directory's artifact, hash-checked, behind the ``Engine`` call."""

from __future__ import annotations

from pathlib import Path

import torch

from diffexport.engines.base import Engine, EngineError, artifact_path
from diffexport.engines.manifest import inside, read_manifest, verify_record
from diffexport.engines.verdict import require_verified
from diffexport.recipes import IOSpec

# backend -> the artifact (manifest key) it runs; ``torch`` runs weights.pt. ``<backend>-bf16``: the
# bf16 candidate of a ``precision: auto`` build, run by the same runtime.
BACKENDS: dict[str, str | None] = {
    "onnxruntime": "onnx", "aoti": "aoti", "tensorrt": "tensorrt", "openvino": "openvino",
    "aoti-bf16": "aoti-bf16", "openvino-bf16": "openvino-bf16", "torch": None,
}  # fmt: skip


def default_backend(manifest: dict) -> str | None:
    """The backend ``load`` uses when none is named: the build's ranking winner (``default_backend``,
    ``targets: auto``), else the first built of ``onnxruntime``, ``aoti``, ... (None: no artifact)."""
    built = manifest.get("artifacts", {})
    chosen = manifest.get("default_backend")
    if chosen in BACKENDS and BACKENDS[chosen] in built:
        return chosen
    return next((b for b, t in BACKENDS.items() if t is not None and t in built), None)


def load(engine_dir: str | Path, backend: str | None = None, device: str | torch.device | None = None,
         allow_unverified: bool = False, **options) -> Engine:
    """The engine in ``engine_dir`` run by ``backend`` (``onnxruntime``, ``aoti``, ``tensorrt``,
    ``openvino``, a ``-bf16`` candidate, or ``torch``, the eager reference) on ``device`` (default:
    where the artifact runs). No ``backend``: :func:`default_backend` (the fastest verified one
    of a ``targets: auto`` build).

    An engine whose parity verdict is not ``ok`` (or failed for ``backend``) is refused with
    :class:`~diffexport.engines.verdict.UnverifiedEngine` unless ``allow_unverified``. The files it
    runs are checked against their sha256 in the manifest first; ``options`` go to the backend
    (e.g. ``threads=`` for ONNX Runtime and OpenVINO). ``EngineError`` names the file at fault.
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if backend is None and (backend := default_backend(manifest)) is None:
        raise EngineError(f"{engine_dir}: no artifact was built; use backend 'torch' for the eager reference")
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    target = BACKENDS[backend]
    if target is not None:
        artifact_path(engine_dir, manifest, target)  # an artifact that was not built is named as such, not as unverified
    require_verified(engine_dir, manifest, backend, allow_unverified)
    device = check_device(device)
    io = IOSpec.from_dict(manifest["io"])
    if target is None:
        verify_record(engine_dir, manifest["weights"], "weights")
        if "recipe_file" not in manifest:
            raise EngineError(f"{engine_dir}: recipe.yaml is not hashed in the manifest (built by an older diffexport); rebuild the engine")
        verify_record(engine_dir, manifest["recipe_file"], "recipe_file")
        from diffexport.engines.torch_engine import TorchEngine

        return TorchEngine(engine_dir, io, device)
    path = artifact_path(engine_dir, manifest, target)
    record = manifest["artifacts"][target]
    verify_record(engine_dir, record, f"artifacts.{target}")
    if backend == "onnxruntime":
        from diffexport.engines.onnxruntime import OnnxRuntimeEngine

        if device is not None and "providers" not in options:
            cuda = torch.device(device).type == "cuda"
            options["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        return OnnxRuntimeEngine(path, io, **options)
    if backend.startswith("openvino"):
        from diffexport.engines.openvino import OpenVINOEngine

        if device is not None and torch.device(device).type != "cpu":
            raise EngineError(f"{path}: the OpenVINO engine runs on the CPU, not {device}")
        source = inside(engine_dir, record["source"]) if record.get("source") else None
        records = [r.get("files") for r in manifest["artifacts"].values() if isinstance(r, dict)]
        hashed = [files.get(record.get("source")) for files in records if isinstance(files, dict)]
        return OpenVINOEngine(path, io, record, source=source, source_sha256=next(filter(None, hashed), None), **options)
    if backend.startswith("aoti"):
        from diffexport.engines.aoti import AOTIEngine

        return AOTIEngine(path, io, device, compiled_for=record.get("device", "cpu"))
    from diffexport.engines.tensorrt import TensorRTEngine

    return TensorRTEngine(path, io, device, compute_capability=record.get("compute_capability"), built_with=record.get("tensorrt"))


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device``; ``EngineError`` for a name torch does not know or a CUDA
    device this machine does not have (never a silent fall-back to the CPU)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EngineError(f"--device {device!r}: not a torch device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise EngineError(f"--device {device}: engines run on cpu or cuda[:N], got {device.type}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EngineError(f"--device {device}: CUDA is not available on this machine (torch sees no GPU); use --device cpu")
        if device.index is not None and device.index >= count:
            raise EngineError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device
