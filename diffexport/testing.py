"""Parity assertions for users' own test suites.

>>> from diffexport.testing import assert_engine_parity
>>> def test_my_engine():
...     assert_engine_parity("engines/my-model", backend="onnxruntime")
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffexport.parity.harness import check_engine
from diffexport.parity.report import write_report

__all__ = ["assert_engine_parity", "describe_failures"]


def describe_failures(report: dict) -> str:
    """One line per failing backend: what exceeded which tolerance, and the first diverging ONNX node."""
    lines = [f"engine '{report['engine']}' fails parity against the torch reference:"]
    for name, e in report["backends"].items():
        if e["passed"]:
            continue
        tol, problems = e["tolerances"], []
        if e.get("error"):
            problems.append(e["error"])
        worst = e.get("per_call_worst")
        if worst and not worst["rel_l2"] <= tol["per_call_rtol"]:
            problems.append(f"per-call rel L2 {worst['rel_l2']:.3g} > {tol['per_call_rtol']:g} at sigma={worst['sigma']:.4g}")
        final = e.get("trajectory", {}).get("final")
        if final and not final["rel_l2"] <= tol["final_rtol"]:
            problems.append(f"final-sample rel L2 {final['rel_l2']:.3g} > {tol['final_rtol']:g}")
        if e.get("divergence"):
            problems.append(e["divergence"]["summary"])
        lines.append(f"  {name} ({e['precision']}): " + "; ".join(problems))
    return "\n".join(lines)


def assert_engine_parity(
    engine_dir: str | Path,
    backend: str | list[str] | None = None,
    per_call_rtol: float | None = None,
    final_rtol: float | None = None,
    *,
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
    report = check_engine(engine_dir, backends, per_call_rtol=per_call_rtol, final_rtol=final_rtol,
                          num_sigmas=num_sigmas, batch=batch, seed=seed, device=device)
    if report_dir is not None:
        write_report(report, Path(report_dir))
    if not report["passed"]:
        raise AssertionError(describe_failures(report))
    return report
