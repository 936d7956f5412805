"""OpenVINO target: the build's fp32 ONNX compiled for the CPU plugin, the compiled blob kept.

The blob (``core.export_model``) is what ``engines.load(dir, backend="openvino")`` imports: a few
hundred milliseconds instead of a full compile. Its manifest record carries everything the loader
needs: ``config`` (the compile properties, passed again on import: the blob alone does not keep
the precision hint), the OpenVINO version that wrote it, and ``source`` (the ONNX it came from,
compiled again when another OpenVINO version cannot import the blob).

Precision is a compile hint on the same fp32 graph: ``fp32`` -> ``INFERENCE_PRECISION_HINT: f32``
(set explicitly: on CPUs with native bf16, OpenVINO's default is bf16), ``bf16`` -> ``bf16``.
The ONNX bf16 graph (explicit casts) is not used: ONNX's ``Conv`` has no bf16 type at opset 21.
OpenVINO 2026.4's CPU plugin ignores per-node precision marks (``disable_fp16_compression``), so
with the bf16 hint every op, normalisations and softmax included, runs in bf16; the fp32 islands
it keeps are the input scalings and the noise embedding. Parity decides whether that holds
(``tests/test_openvino.py``: 2e-3 on a tiny SongUNet, 1.7e-4 on EDM CIFAR-10; tolerance 2e-2).
"""

from __future__ import annotations

from pathlib import Path

from diffexport.fileio import write_atomic
from diffexport.recipes import IOSpec

DEVICE = "CPU"
HINTS = {"fp32": "f32", "bf16": "bf16"}  # export precision -> INFERENCE_PRECISION_HINT


def compile_config(precision: str) -> dict[str, str]:
    """The compile properties of a ``precision`` (``fp32`` | ``bf16``) engine."""
    if precision not in HINTS:
        raise ValueError(f"the openvino target supports precision {' or '.join(HINTS)}, got {precision!r}")
    return {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}


def export_openvino(onnx_path: str | Path, io: IOSpec, path: str | Path, *, precision: str = "fp32", source: str | None = None) -> dict:
    """Compile the fp32 ``onnx_path`` with a batch bounded to ``io.batch`` and write the blob to
    ``path`` atomically; returns the artifact's manifest fields. ``source`` names the ONNX file of
    the engine directory the loader may recompile from (``None``: the ONNX was temporary)."""
    import openvino as ov

    path, config = Path(path), compile_config(precision)
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    lo, hi = io.batch.get("min", 1), io.batch.get("max", -1)
    model.reshape({p.get_any_name(): ov.PartialShape([ov.Dimension(lo, hi), *p.get_partial_shape()[1:]]) for p in model.inputs})
    compiled = core.compile_model(model, DEVICE, config)
    write_atomic(path, compiled.export_model().getvalue())
    return {"file": path.name, "files": [path.name], "precision": precision, "device": DEVICE.lower(), "config": config,
            "openvino": ov.get_version(), "source": source}
