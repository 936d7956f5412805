"""Parity of engines against the torch reference: σ sweep per call, whole-sampler trajectory,
reports, the build's parity stage, and the first diverging ONNX node of a failing engine."""

from diffexport.parity.harness import check_engine, default_backends, parity_stage, run_parity, summary
from diffexport.parity.metrics import errors
from diffexport.parity.onnx_locate import Divergence, locate_divergence
from diffexport.parity.report import write_report
from diffexport.parity.tolerances import PRESETS, tolerances

__all__ = [
    "PRESETS", "Divergence", "check_engine", "default_backends", "errors", "locate_divergence", "parity_stage",
    "run_parity", "summary", "tolerances", "write_report",
]  # fmt: skip
