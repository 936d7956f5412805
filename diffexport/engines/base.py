"""The one ``Engine`` protocol every backend implements, and its shared input checks."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from diffexport.recipes import IOSpec, TensorSpec

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


class EngineError(RuntimeError):
    """An engine that cannot be loaded or called; the message names the file or tensor."""


@runtime_checkable
class Engine(Protocol):
    """A built denoiser: ``engine(x, sigma, **conditions) -> denoised`` on torch tensors.

    ``backend`` names the runtime (``torch``, ``onnxruntime``, ``aoti``, ``tensorrt``);
    ``io`` is the manifest's I/O contract; ``device`` is where inputs are expected.
    """

    backend: str
    io: IOSpec
    device: torch.device

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor: ...


def check_inputs(io: IOSpec, backend: str, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The inputs in engine order, after checking names, dtypes, ranks, sizes and batch range."""
    names = [s.name for s in io.inputs]
    unknown = sorted(set(tensors) - set(names))
    missing = [n for n in names if n not in tensors]
    if unknown or missing:
        raise EngineError(f"{backend}: inputs expected {names}; missing {missing or '-'}, unexpected {unknown or '-'}")
    batch = tensors["x"].shape[0] if tensors["x"].ndim else -1
    lo, hi = io.batch.get("min", 1), io.batch.get("max", batch)
    if not lo <= batch <= hi:
        raise EngineError(f"{backend}: batch {batch} of input 'x' is outside the engine's range [{lo}, {hi}]")
    return [_check(spec, tensors[spec.name], batch, backend) for spec in io.inputs]


def _check(spec: TensorSpec, t: torch.Tensor, batch: int, backend: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise EngineError(f"{backend}: input '{spec.name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != _DTYPES[spec.dtype]:
        raise EngineError(f"{backend}: input '{spec.name}' must be {spec.dtype}, got {str(t.dtype).removeprefix('torch.')}")
    want = [batch, *spec.shape[1:]]
    if list(t.shape) != want:
        raise EngineError(f"{backend}: input '{spec.name}' must have shape {want} (batch {batch}), got {list(t.shape)}")
    if t.device.type == "cpu" and (why := index_range_error(spec, t)):  # (no device sync: a CUDA graph may be capturing)
        raise EngineError(f"{backend}: input {why}")
    return t


def index_range_error(spec: TensorSpec, t: torch.Tensor) -> str | None:
    """``"'NAME' holds V at row R, outside its range [0, HIGH)"`` when the ``index`` input ``t`` of
    ``spec`` has a value below 0 or (with ``spec.high``) at or above ``spec.high``; None otherwise."""
    if spec.kind != "index" or t.numel() == 0:
        return None
    flat = t.reshape(-1)
    bad = (flat < 0) | (flat >= spec.high) if spec.high is not None else flat < 0
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    at = f" at row {i}" if t.ndim == 1 else ""
    allowed = f"outside its range [0, {spec.high})" if spec.high is not None else "but must be >= 0"
    return f"'{spec.name}' holds {int(flat[i])}{at}, {allowed}"


def artifact_path(engine_dir: Path, manifest: dict, target: str) -> Path:
    """Path of ``target``'s artifact in ``engine_dir``; ``EngineError`` when it was not built."""
    art = manifest.get("artifacts", {}).get(target)
    if not art:
        built = ", ".join(manifest.get("artifacts", {})) or "none"
        raise EngineError(f"{engine_dir}: no '{target}' artifact in this engine (built: {built})")
    return engine_dir / art["file"]
