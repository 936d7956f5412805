"""``load(engine_dir, backend)``: an engine directory's artifact, hash-checked, behind the ``Engine`` call."""

from __future__ import annotations

from pathlib import Path

import torch

from diffexport.engines.base import Engine, EngineError, artifact_path
from diffexport.engines.manifest import read_manifest, verify_files
from diffexport.recipes import IOSpec

# backend -> the artifact (manifest target) it runs; ``torch`` runs weights.pt
BACKENDS: dict[str, str | None] = {"onnxruntime": "onnx", "aoti": "aoti", "tensorrt": "tensorrt", "torch": None}


def load(engine_dir: str | Path, backend: str = "onnxruntime", device: str | torch.device | None = None, **options) -> Engine:
    """The engine in ``engine_dir`` run by ``backend`` (``onnxruntime``, ``aoti``, ``tensorrt`` or
    ``torch``, the eager reference) on ``device`` (default: where the artifact runs).

    The files it runs are checked against their sha256 in the manifest first; ``options`` go to
    the backend (e.g. ``threads=`` for ONNX Runtime). ``EngineError`` names the file at fault.
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    io = IOSpec.from_dict(manifest["io"])
    target = BACKENDS[backend]
    if target is None:
        verify_files(engine_dir, manifest["weights"])
        from diffexport.engines.torch_engine import TorchEngine

        return TorchEngine(engine_dir, io, device)
    path = artifact_path(engine_dir, manifest, target)
    record = manifest["artifacts"][target]
    verify_files(engine_dir, record)
    if backend == "onnxruntime":
        from diffexport.engines.onnxruntime import OnnxRuntimeEngine

        if device is not None and "providers" not in options:
            cuda = torch.device(device).type == "cuda"
            options["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        return OnnxRuntimeEngine(path, io, **options)
    if backend == "aoti":
        from diffexport.engines.aoti import AOTIEngine

        return AOTIEngine(path, io, device, compiled_for=record.get("device", "cpu"))
    from diffexport.engines.tensorrt import TensorRTEngine

    return TensorRTEngine(path, io, device, compute_capability=record.get("compute_capability"))
