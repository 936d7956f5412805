"""TensorRT target: ``denoiser.plan`` built from the ONNX graph, or a torch-tensorrt program.

The network is **strongly typed**: every tensor's dtype comes from the ONNX graph, where
:mod:`diffexport.export.precision` decided it (TensorRT 11 drops the FP16/BF16 builder flags).
One optimisation profile spans ``inputs.batch`` (min/opt/max) for every input. Tactic timings
persist in a cache file per TensorRT version and GPU, loaded before and saved after each build.
``tensorrt`` (and ``torch_tensorrt``) are imported lazily; without them ``TargetUnavailable``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import torch
from torch.export import ExportedProgram

from diffexport.fileio import write_atomic
from diffexport.recipes import IOSpec

INSTALL_HINT = "pip install 'diffexport[tensorrt]'"


class TargetUnavailable(RuntimeError):
    """A target whose toolchain (package or device) is missing here; the message says what to install."""


def require(package: str) -> ModuleType:
    """Import ``package`` or raise ``TargetUnavailable`` naming it and the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise TargetUnavailable(f"the Python package '{package}' is not installed ({e}); {INSTALL_HINT}") from None


def _cuda_device() -> tuple[str, str]:
    """(name, compute capability) of the current CUDA device; ``TargetUnavailable`` without one."""
    if not torch.cuda.is_available():
        raise TargetUnavailable("TensorRT builds need a CUDA GPU and torch sees none")
    return torch.cuda.get_device_name(), "{}.{}".format(*torch.cuda.get_device_capability())


def profile_shapes(io: IOSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``{input: (min, opt, max) shape}`` from the dynamic batch range of ``io``."""
    b = io.batch
    return {s.name: tuple((n, *s.shape[1:]) for n in (b["min"], b["opt"], b["max"])) for s in io.inputs}


def default_timing_cache(trt_version: str, compute_capability: str) -> Path:
    """``$DIFFEXPORT_CACHE`` (default ``~/.cache/diffexport``) ``/tensorrt-<version>-sm<cc>.timing``."""
    root = Path(os.environ.get("DIFFEXPORT_CACHE", Path.home() / ".cache" / "diffexport"))
    return root / f"tensorrt-{trt_version}-sm{compute_capability.replace('.', '')}.timing"


def build_tensorrt(
    onnx_path: str | Path, io: IOSpec, path: str | Path, *, precision: str = "fp32", timing_cache: str | Path | None = None,
    workspace_bytes: int | None = None,
) -> dict:
    """Parse ``onnx_path`` into a strongly typed network, build and serialize ``path`` (the plan);
    returns the manifest fields (device name, compute capability, TensorRT version)."""
    trt = require("tensorrt")
    device, cc = _cuda_device()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(io).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, cc)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):  # corrupt or another GPU's: start afresh
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    path = Path(path)
    write_atomic(path, bytes(plan))
    write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return {
        "file": path.name, "files": [path.name], "precision": precision, "device": device,
        "compute_capability": cc, "tensorrt": trt.__version__,
    }  # fmt: skip


def export_torch_tensorrt(program: ExportedProgram, io: IOSpec, path: str | Path, *, precision: str = "fp32") -> dict:
    """The torch-tensorrt alternative: ``torch_tensorrt.dynamo.compile`` of the (dtype-explicit)
    program on the GPU, saved with ``torch_tensorrt.save`` as an ExportedProgram (``.ep``)."""
    torch_trt = require("torch_tensorrt")
    device, cc = _cuda_device()
    program = torch.export.passes.move_to_device_pass(program, "cuda")
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    inputs = [
        torch_trt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=dtypes[s.dtype])
        for s, (lo, opt, hi) in zip(io.inputs, profile_shapes(io).values())
    ]
    module = torch_trt.dynamo.compile(program, arg_inputs=inputs, use_explicit_typing=True, min_block_size=1)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        # save() wants example tensors (older releases reject Input specs); retrace=False keeps the
        # compiled graph's symbolic batch instead of re-exporting it specialised to these shapes
        shapes = profile_shapes(io).values()
        examples = [torch.zeros(opt, dtype=dtypes[s.dtype], device="cuda") for s, (_, opt, _) in zip(io.inputs, shapes)]
        torch_trt.save(module, str(tmp), output_format="exported_program", inputs=examples, retrace=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "files": [path.name], "precision": precision, "device": device, "compute_capability": cc,
            "torch_tensorrt": torch_trt.__version__}  # fmt: skip
