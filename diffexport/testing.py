"""Parity assertions for users' own test suites (the pytest plugin, :mod:`diffexport.parity.pytest_plugin`,
is built on the same code).

>>> from diffexport.testing import assert_engine_parity
>>> def test_my_engine():
...     assert_engine_parity("engines/my-model", backend="onnxruntime")
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffexport.parity.harness import check_engine, nan_worst
from diffexport.parity.report import write_report

__all__ = ["assert_engine_parity", "describe_backend", "describe_call", "describe_failures"]


def _over(value: float, tol: float) -> bool:
    return nan_worst(value) > tol


def describe_call(record: dict, tol: dict, spaces: str = "DF") -> list[str]:
    """What of one per-call record exceeds its tolerance (of D and/or of F, among ``spaces``), as phrases."""
    at = f"at sigma={record['sigma']:.4g}"
    out = []
    if "D" in spaces and _over(record["rel_l2"], tol["per_call_rtol"]):
        out.append(f"per-call rel L2 of D {record['rel_l2']:.3g} > {tol['per_call_rtol']:g} {at}")
    if "F" in spaces and _over(record["f_rel_l2"], tol["per_call_f_rtol"]):
        out.append(f"per-call rel L2 of F = (D - c_skip x)/c_out {record['f_rel_l2']:.3g} > {tol['per_call_f_rtol']:g} {at}")
    return out


def describe_backend(entry: dict) -> list[str]:
    """Why a backend's entry fails: error, worst per-call D and F, final sample, first diverging node."""
    tol, problems = entry["tolerances"], []
    if entry.get("error"):
        problems.append(entry["error"])
    for key, space in (("per_call_worst", "D"), ("per_call_f_worst", "F")):  # the worst σ of each
        if entry.get(key):
            problems += describe_call(entry[key], tol, space)
    final = entry.get("trajectory", {}).get("final")
    if final and _over(final["rel_l2"], tol["final_rtol"]):
        problems.append(f"final-sample rel L2 {final['rel_l2']:.3g} > {tol['final_rtol']:g}")
    if entry.get("divergence"):
        problems.append(entry["divergence"]["summary"])
    return problems


def describe_failures(report: dict) -> str:
    """One line per failing backend: what exceeded which tolerance, and the first diverging ONNX node."""
    lines = [f"engine '{report['engine']}' fails parity against the torch reference:"]
    for name, e in report["backends"].items():
        if not e["passed"]:
            lines.append(f"  {name} ({e['precision']}): " + "; ".join(describe_backend(e)))
    return "\n".join(lines)


def assert_engine_parity(
    engine_dir: str | Path,
    backend: str | list[str] | None = None,
    per_call_rtol: float | None = None,
    final_rtol: float | None = None,
    *,
    per_call_f_rtol: float | None = None,
    num_sigmas: int | None = None,
    batch: int | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    report_dir: str | Path | None = None,
) -> dict:
    """Check ``backend`` (a name, a list, or None for every built artifact) of ``engine_dir`` against
    the torch reference; ``AssertionError`` with a readable summary when any check fails.

    Tolerances default to the artifact precision's preset and the recipe's ``parity:`` section;
    ``report_dir`` also writes ``parity.json``/``.md``/``.png`` there. Returns the report.
    """
    backends = [backend] if isinstance(backend, str) else backend
    report = check_engine(engine_dir, backends, per_call_rtol=per_call_rtol, per_call_f_rtol=per_call_f_rtol,
                          final_rtol=final_rtol, num_sigmas=num_sigmas, batch=batch, seed=seed, device=device)
    if report_dir is not None:
        write_report(report, Path(report_dir))
    if not report["passed"]:
        raise AssertionError(describe_failures(report))
    return report
