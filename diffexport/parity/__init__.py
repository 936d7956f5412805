"""Parity of engines against the torch reference: σ sweep per call (errors of D and of the
prediction F), whole-sampler trajectory, reports, the build's parity stage, one reference shared
by every candidate and cached by content, and the first diverging ONNX node of a failing engine.
The pytest plugin is :mod:`diffexport.parity.pytest_plugin` (not imported here)."""

from diffexport.parity.harness import ParityRun, Reference, check_engine, default_backends, parity_stage, run_parity, summary
from diffexport.parity.metrics import errors
from diffexport.parity.onnx_locate import Divergence, locate_divergence
from diffexport.parity.report import write_report
from diffexport.parity.tolerances import PRESETS, tolerances

__all__ = [
    "PRESETS", "Divergence", "ParityRun", "Reference", "check_engine", "default_backends", "errors", "locate_divergence", "parity_stage",
    "run_parity", "summary", "tolerances", "write_report",
]  # fmt: skip
