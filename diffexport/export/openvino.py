"""OpenVINO target: the build's fp32 ONNX compiled for the CPU plugin, the compiled blob kept.

The blob (``core.export_model``) is what ``engines.load(dir, backend="openvino")`` imports: a few
hundred milliseconds instead of a full compile. Blobs are weightless (``CACHE_MODE: OPTIMIZE_SIZE``,
about 1.6 MB for EDM CIFAR-10 instead of 224): the weights are kept once, with the OpenVINO IR the
blobs were compiled from (``<stem>.xml``; the weights ``denoiser.openvino.bin`` are shared by the
fp32 and bf16 artifacts of a build), and the loader imports each
blob with ``ENABLE_WEIGHTLESS`` and ``WEIGHTS_PATH`` pointing at that ``.bin`` (``weights`` in the
record). Its manifest record carries everything else the loader needs: ``config`` (the compile
properties, passed again on import: the blob alone does not keep the precision hint), the OpenVINO
version that wrote it, and ``source`` (the ONNX it came from, compiled again when another OpenVINO
version cannot import the blob).

Precision is a compile hint on the same fp32 graph: ``fp32`` -> ``INFERENCE_PRECISION_HINT: f32``
(set explicitly: on CPUs with native bf16, OpenVINO's default is bf16), ``bf16`` -> ``bf16``.
The ONNX bf16 graph (explicit casts) is not used: ONNX's ``Conv`` has no bf16 type at opset 21.
OpenVINO 2026.4's CPU plugin ignores per-node precision marks (``disable_fp16_compression``), so
with the bf16 hint every op, normalisations and softmax included, runs in bf16; the fp32 islands
it keeps are the input scalings and the noise embedding. Parity decides whether that holds
(``tests/test_openvino.py``: 2e-3 on a tiny SongUNet, 1.7e-4 on EDM CIFAR-10; tolerance 2e-2).
"""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

from diffexport.export.tensorrt import TargetUnavailable
from diffexport.fileio import write_atomic
from diffexport.recipes import IOSpec

DEVICE = "CPU"
HINTS = {"fp32": "f32", "bf16": "bf16"}  # export precision -> INFERENCE_PRECISION_HINT


def compile_config(precision: str) -> dict[str, str]:
    """The compile properties of a ``precision`` (``fp32`` | ``bf16``) engine."""
    if precision not in HINTS:
        raise ValueError(f"the openvino target supports precision {' or '.join(HINTS)}, got {precision!r}")
    return {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}


def precision_unavailable(precision: str) -> str | None:
    """Why OpenVINO's CPU plugin cannot run ``precision`` on this CPU (``None``: it can). Without
    native bf16 (no AVX512-BF16 / AMX) it silently compiles a bf16 hint as f32, which would be an
    fp32 engine recorded as bf16."""
    if precision != "bf16":
        return None
    import openvino as ov

    caps = list(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    if "BF16" in caps:
        return None
    return (f"OpenVINO's CPU plugin has no bf16 on this CPU (its capabilities: {', '.join(caps)}; bf16 needs AVX512-BF16 or AMX): "
            "the bf16 hint would compile f32")


def static_batches(io: IOSpec) -> list[int]:
    """The batch sizes that get a static-shape blob: ``inputs.batch`` min, opt and max."""
    return sorted({int(io.batch.get(k, 1)) for k in ("min", "opt", "max")})


def export_openvino(onnx_path: str | Path, io: IOSpec, path: str | Path, *, precision: str = "fp32", source: str | None = None,
                    batches: list[int] | None = None, weights: str | Path | None = None) -> dict:
    """Compile the fp32 ``onnx_path`` and write the blobs next to ``path`` atomically; returns the
    artifact's manifest fields.

    ``path`` holds the model with a batch bounded to ``io.batch`` (any batch of the range); each
    of ``batches`` (default :func:`static_batches`) gets its own static-shape blob, ``static``
    in the record (OpenVINO's CPU kernels for a fixed shape were about 1.8x faster than the
    dynamic ones at batch 8 on a tiny SongUNet). ``source`` names the ONNX file of the engine
    directory the loader may recompile from (``None``: the ONNX was temporary). The blobs are compiled
    from the IR ``path`` with ``.xml``, whose weights go to ``weights`` (default: ``path`` with
    ``.bin``), shared with another precision's artifact that wrote the same bytes there (see
    :func:`write_ir`).
    """
    import openvino as ov

    path, config = Path(path), compile_config(precision)
    core = ov.Core()
    lo, hi = io.batch.get("min", 1), io.batch.get("max", -1)
    xml = path.with_suffix(".xml")
    weights = write_ir(ov, core.read_model(str(onnx_path)), xml, Path(weights) if weights else xml.with_suffix(".bin"))
    files, static = [path.name, xml.name, weights.name], {}
    ir_model = core.read_model(str(xml), str(weights))  # from the IR: the blobs then name their weights by offset in the .bin
    for batch in [None, *(batches if batches is not None else static_batches(io))]:
        model = ir_model.clone()
        dim = ov.Dimension(lo, hi) if batch is None else ov.Dimension(batch)
        model.reshape({p.get_any_name(): ov.PartialShape([dim, *p.get_partial_shape()[1:]]) for p in model.inputs})
        target = path if batch is None else path.with_name(path.name.replace(".blob", f".b{batch}.blob"))
        compiled = core.compile_model(model, DEVICE, {**config, "CACHE_MODE": "OPTIMIZE_SIZE"})  # a weightless blob
        # the build skips the candidate first (precision_unavailable); this refuses what actually compiled
        if (got := compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()) != HINTS[precision]:
            raise TargetUnavailable(f"OpenVINO compiled the {precision} hint ({HINTS[precision]}) as {got} on this CPU")
        write_atomic(target, compiled.export_model().getvalue())
        if batch is not None:
            files.append(target.name)
            static[str(batch)] = target.name
    return {"file": path.name, "files": files, "precision": precision, "device": DEVICE.lower(), "config": config,
            "static": static, "weights": weights.name, "openvino": ov.get_version(), "source": source}


def write_ir(ov, model, xml: Path, weights: Path) -> Path:
    """``model`` saved as OpenVINO IR ``xml`` and its weights (fp32, not compressed), both replaced
    atomically; returns the weights file. The weights go to ``weights`` unless that file exists with
    other bytes (then next to ``xml``, as ``.bin``): the fp32 and bf16 artifacts of one ONNX write
    the same weights (their ``.xml`` differ in generated node names only), so they share one file,
    written once, whose hash stays true."""
    tmp = xml.with_name(f".{xml.stem}.tmp.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        if weights.is_file() and not filecmp.cmp(tmp.with_suffix(".bin"), weights, shallow=False):
            weights = xml.with_suffix(".bin")
        if not weights.is_file() or weights == xml.with_suffix(".bin"):
            os.replace(tmp.with_suffix(".bin"), weights)
        os.replace(tmp, xml)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return weights
