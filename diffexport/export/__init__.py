"""Export: the recipe's preconditioned denoiser, traced once, lowered to each engine target.

>>> denoiser = build_denoiser(recipe); io = io_spec(recipe)
>>> program = export_program(denoiser, io, "fp32")            # the one torch.export
>>> info = export_target("onnx", program, io, out_dir)         # writes out_dir/denoiser.onnx

Every target returns the manifest fields it knows: ``file``, ``files`` (written, main first;
hash them with ``diffexport.engines.manifest.file_record``), ``precision`` and its own details.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from diffexport.lazy import lazy_getattr
from diffexport.recipes import IOSpec

if TYPE_CHECKING:
    from torch.export import ExportedProgram

# Public names -> the submodule defining them, imported on first use (PEP 562): importing
# ``diffexport.export.denoiser`` (the torch reference needs it) must not pull in torch.onnx,
# onnxscript or TensorRT.
_LAZY = {
    "INDUCTOR_CONFIGS": "aoti", "export_aoti": "aoti",
    "Denoiser": "denoiser", "build_denoiser": "denoiser", "example_inputs": "denoiser", "instantiate_model": "denoiser",
    "resolve_model": "denoiser",
    "random_global_index": "denoiser", "random_input": "denoiser",
    "export_onnx": "onnx",
    "dtype_of": "precision", "mixed_precision": "precision",
    "export_program": "program",
    "TargetUnavailable": "tensorrt", "build_tensorrt": "tensorrt", "export_torch_tensorrt": "tensorrt", "require": "tensorrt",
    "check_recipe": "validate", "validate_recipe": "validate",
    "export_openvino": "openvino",
}  # fmt: skip
GROUP_NORM_OPSET = 21  # first ONNX opset whose GroupNormalization matches torch's group_norm

__all__ = sorted({*_LAZY, "FILENAMES", "GROUP_NORM_OPSET", "TARGETS", "export_target", "precision_unsupported"})


__getattr__ = lazy_getattr(__name__, _LAZY)


FILENAMES = {"onnx": "denoiser.onnx", "aoti": "denoiser.pt2", "tensorrt": "denoiser.plan", "openvino": "denoiser.openvino.blob"}


BF16_ONNX_OPSET = 22  # first opset whose Conv, Gemm, ... take bfloat16


def precision_unsupported(target: str, precision: str, opset: int = GROUP_NORM_OPSET) -> str | None:
    """Why ``target`` cannot build a ``precision`` engine at ONNX ``opset`` (``None``: it can), known
    from the recipe alone, so validation refuses it (``targets: auto`` skips it) before any work."""
    if target == "onnx" and precision == "bf16":
        return "ONNX Runtime has no bf16 kernels (the engine could not run); bf16 engines are aoti or openvino"
    if target == "openvino" and precision == "fp16":
        return "OpenVINO's CPU plugin compiles fp32 or bf16 (its inference precision hint), not fp16"
    if target == "tensorrt" and precision == "bf16" and opset < BF16_ONNX_OPSET:
        return f"the plan is built from a bf16 ONNX graph, whose Conv and Gemm need export.opset >= {BF16_ONNX_OPSET} (got {opset})"
    return None


def _onnx(program: ExportedProgram, io: IOSpec, out_dir: Path, *, precision: str, opset: int, filename: str, **_) -> dict:
    from diffexport.export.onnx import export_onnx

    return export_onnx(program, io, out_dir / filename, precision=precision, opset=opset)


def _aoti(program: ExportedProgram, io: IOSpec, out_dir: Path, *, precision: str, device: str, filename: str, **_) -> dict:
    from diffexport.export.aoti import export_aoti

    return export_aoti(program, io, out_dir / filename, precision=precision, device=device)


def _from_onnx(program: ExportedProgram, io: IOSpec, onnx_path: Path | None, onnx_precision: str, opset: int,
               build: Callable[[Path, str | None], dict]) -> dict:
    """``build(onnx_file, source)`` on the build's own ONNX (``source``: its file name) when given,
    else on one lowered at ``onnx_precision`` to a temporary file (``source`` None)."""
    if onnx_path is not None:
        return build(onnx_path, onnx_path.name)
    from diffexport.export.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:  # no ONNX target built: lower to ONNX on the side
        path = Path(tmp) / FILENAMES["onnx"]
        export_onnx(program, io, path, precision=onnx_precision, opset=opset)
        return build(path, None)


def _tensorrt(program: ExportedProgram, io: IOSpec, out_dir: Path, *, precision: str, opset: int, onnx_path: Path | None,
              filename: str, **_) -> dict:
    from diffexport.export.tensorrt import build_tensorrt, require

    require("tensorrt")  # fail before lowering anything
    return _from_onnx(program, io, onnx_path, precision, opset,
                      lambda onnx, _: build_tensorrt(onnx, io, out_dir / filename, precision=precision))


def _openvino(program: ExportedProgram, io: IOSpec, out_dir: Path, *, precision: str, opset: int, onnx_path: Path | None,
              filename: str, **_) -> dict:
    from diffexport.export.openvino import export_openvino

    # the build's fp32 ONNX (named as ``source``: the loader may recompile it) or an fp32 one on the side
    return _from_onnx(program, io, onnx_path, "fp32", opset,
                      lambda onnx, source: export_openvino(onnx, io, out_dir / filename, precision=precision, source=source,
                                                           weights=out_dir / Path(FILENAMES["openvino"]).with_suffix(".bin")))


TARGETS: dict[str, Callable[..., dict]] = {"onnx": _onnx, "aoti": _aoti, "tensorrt": _tensorrt, "openvino": _openvino}


def export_target(
    name: str, program: ExportedProgram, io: IOSpec, out_dir: str | Path, *, precision: str = "fp32",
    opset: int = GROUP_NORM_OPSET, device: str = "cpu", onnx_path: str | Path | None = None, filename: str | None = None,
) -> dict:
    """Write target ``name``'s artifact into ``out_dir`` (file name ``filename``, default from :data:`FILENAMES`).

    ``tensorrt`` builds from ``onnx_path`` when given (the ONNX target of the same build), else
    from an ONNX lowered to a temporary file; it raises ``TargetUnavailable`` without TensorRT.
    ``openvino`` compiles the fp32 ``onnx_path`` (else an fp32 ONNX lowered from ``program``, which
    must then be an fp32 program) with ``precision`` as its inference-precision hint.
    """
    if name not in TARGETS:
        raise ValueError(f"unknown export target {name!r}; expected one of {', '.join(TARGETS)}")
    options = dict(precision=precision, opset=opset, device=device, onnx_path=Path(onnx_path) if onnx_path else None,
                   filename=filename or FILENAMES[name])
    return TARGETS[name](program, io, Path(out_dir), **options)
