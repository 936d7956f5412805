"""Parity of an engine directory's backends against the torch reference, and the build's parity stage.

For every backend: the per-call σ sweep and the whole-sampler trajectory (:mod:`.checks`), judged
against :mod:`.tolerances`; when an ONNX Runtime engine fails, the first diverging ONNX node
(:mod:`.onnx_locate`). The reference runs once per device and is reused for every backend.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from diffexport.engines.base import EngineError
from diffexport.engines.load import BACKENDS, load
from diffexport.engines.manifest import mark, read_manifest
from diffexport.parity import checks
from diffexport.parity.report import json_safe, write_report
from diffexport.parity.tolerances import tolerances
from diffexport.recipes import IOSpec
from diffexport.runtime.batching import clamp_batch
from diffexport.runtime.inputs import index_high
from diffexport.runtime.sampler import SamplerSpec

FORMAT = "diffexport-parity/1"
TARGET_BACKEND = {target: backend for backend, target in BACKENDS.items() if target is not None}


def default_backends(manifest: dict) -> list[str]:
    """The backends that run the artifacts ``manifest`` lists (onnx -> onnxruntime, ...)."""
    return [TARGET_BACKEND[t] for t in manifest.get("artifacts", {}) if t in TARGET_BACKEND]


class _Reference:
    """The torch reference on each device it is asked for, with its outputs cached per device."""

    def __init__(self, engine_dir: Path):
        self.engine_dir, self.engines, self.cache = engine_dir, {}, {}

    def engine(self, device: torch.device):
        if device not in self.engines:
            self.engines[device] = load(self.engine_dir, "torch", device=device)
        return self.engines[device]

    def run(self, what: str, device: torch.device, fn) -> Any:
        if (what, device) not in self.cache:
            self.cache[what, device] = fn(self.engine(device))
        return self.cache[what, device]


def check_engine(
    engine_dir: str | Path,
    backends: list[str] | None = None,
    *,
    per_call_rtol: float | None = None,
    final_rtol: float | None = None,
    num_sigmas: int | None = None,
    batch: int | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    locate: bool = True,
) -> dict:
    """The parity report of ``backends`` (default: every built artifact) of ``engine_dir``.

    Settings default to the recipe's ``parity:`` section, tolerances to the artifact's precision
    preset overridden by that section, then by ``per_call_rtol`` / ``final_rtol``. A backend that
    cannot be loaded or run fails with its error in the report. ``report["passed"]`` is True when
    every backend passed.
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    cfg = manifest["recipe"].get("parity", {})
    num_sigmas = num_sigmas or cfg.get("num_sigmas", 8)
    batch, seed = batch or cfg.get("batch", 2), cfg.get("seed", 0) if seed is None else seed
    backends = backends or default_backends(manifest)
    if not backends:
        raise EngineError(f"{engine_dir}: no artifact to check (artifacts: none)")
    spec = SamplerSpec.from_manifest(manifest["sampler"])
    sigmas = checks.sigma_sweep(spec, num_sigmas)
    reference = _Reference(engine_dir)
    report = {
        "format": FORMAT, "engine": manifest["name"], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"num_sigmas": num_sigmas, "batch": batch, "seed": seed, "solver": spec.solver, "num_steps": spec.num_steps},
        "sigmas": sigmas, "backends": {},
    }  # fmt: skip
    for backend in backends:
        target = BACKENDS.get(backend)
        record = manifest.get("artifacts", {}).get(target, {}) if target else {}
        precision = record.get("precision", manifest["recipe"].get("export", {}).get("precision", "fp32"))
        tol = tolerances(precision, cfg, per_call_rtol=per_call_rtol, final_rtol=final_rtol)
        entry: dict[str, Any] = {"target": target, "precision": precision, "tolerances": tol, "passed": False, "error": None}
        report["backends"][backend] = entry
        start = time.perf_counter()
        try:
            _check_backend(engine_dir, backend, device, reference, spec, sigmas, batch, seed, tol, entry)
        except Exception as e:  # a backend that cannot load or run fails, the others are still checked
            entry["error"] = f"{type(e).__name__}: {e}"
        if locate and not entry["passed"] and entry.get("per_call") and backend == "onnxruntime":
            try:
                entry["divergence"] = _locate(engine_dir, manifest, record, reference, sigmas, batch, seed, tol, entry)
            except Exception as e:  # the verdict stands without the diagnosis
                entry["divergence"] = {"summary": f"the first diverging ONNX node could not be located ({type(e).__name__}: {e})", "sigma": None}
        entry["seconds"] = round(time.perf_counter() - start, 3)
    if cfg.get("judge"):  # task-level parity: what the samples depict (diffexport.parity.task)
        from diffexport.parity.task import check_task

        report["task"] = check_task(engine_dir, manifest, report["backends"], reference, device)
    report["passed"] = all(e["passed"] for e in report["backends"].values())
    return report


def _check_backend(engine_dir: Path, backend: str, device, reference: _Reference, spec: SamplerSpec, sigmas: list[float],
                   batch: int, seed: int, tol: dict, entry: dict) -> None:
    engine = load(engine_dir, backend, device=device)
    high = index_high(reference.engine(engine.device))
    batch = clamp_batch(engine, batch)
    inputs = checks.call_inputs(engine, sigmas, batch, seed, high)
    refs = reference.run(f"calls:{batch}", engine.device, lambda ref: checks.call_outputs(ref, inputs))
    entry["per_call"] = checks.compare_calls(sigmas, refs, checks.call_outputs(engine, inputs))
    traj_inputs = checks.trajectory_inputs(engine, spec, batch, seed, high)
    ref_states = reference.run(f"trajectory:{batch}", engine.device, lambda ref: checks.trajectory_states(ref, spec, traj_inputs))
    entry["trajectory"] = checks.compare_steps(spec, ref_states, checks.trajectory_states(engine, spec, traj_inputs))
    worst = max(entry["per_call"], key=lambda r: _key(r["rel_l2"]))
    entry["per_call_worst"] = worst
    entry["passed"] = _key(worst["rel_l2"]) <= tol["per_call_rtol"] and _key(entry["trajectory"]["final"]["rel_l2"]) <= tol["final_rtol"]


def _key(v: float) -> float:
    """Sort/compare key treating NaN as worst."""
    return math.inf if math.isnan(v) else v


def _locate(engine_dir: Path, manifest: dict, record: dict, reference: _Reference, sigmas: list[float], batch: int, seed: int,
            tol: dict, entry: dict) -> dict | None:
    """The first diverging ONNX node on the worst per-call inputs (None: no single node exceeds the tolerance)."""
    from diffexport.parity.onnx_locate import locate_divergence

    ref = reference.engine(torch.device("cpu"))
    io = IOSpec.from_dict(manifest["io"])
    worst = max(range(len(sigmas)), key=lambda i: _key(entry["per_call"][i]["rel_l2"]))
    inputs = checks.call_inputs(ref, sigmas, clamp_batch(ref, batch), seed, index_high(ref))[worst]
    found = locate_divergence(engine_dir / record["file"], ref.denoiser, io, inputs, tol["per_call_rtol"],
                              precision=record.get("precision", "fp32"), opset=record.get("opset", 18))
    return None if found is None else {**found.to_dict(), "sigma": sigmas[worst], "summary": str(found)}


def summary(report: dict) -> dict:
    """What the manifest keeps of a parity report."""
    backends = {}
    for name, e in report["backends"].items():
        backends[name] = {
            "passed": e["passed"], "precision": e["precision"], "tolerances": e["tolerances"],
            "per_call_rel_l2": e.get("per_call_worst", {}).get("rel_l2"),
            "final_rel_l2": e.get("trajectory", {}).get("final", {}).get("rel_l2"),
            **({"error": e["error"]} if e["error"] else {}),
        }  # fmt: skip
    return {"passed": report["passed"], "report": "parity.json", "backends": backends}


def run_parity(engine_dir: str | Path, backends: list[str] | None = None, report_dir: str | Path | None = None,
               update_manifest: bool = False, **options: Any) -> dict:
    """:func:`check_engine`, then the report files (``parity.json``, ``.md``, ``.png``) in ``report_dir``
    (default: the engine directory); ``update_manifest`` also records status and summary there."""
    report = check_engine(engine_dir, backends, **options)
    write_report(report, Path(report_dir) if report_dir is not None else Path(engine_dir))
    if update_manifest:
        mark(engine_dir, "ok" if report["passed"] else "failed", json_safe(summary(report)))
    return report


def parity_stage(tmp_engine_dir: Path, manifest: dict) -> None:
    """``build_engine`` finalize stage: check every built artifact, write the report into the engine
    directory, set ``status`` (``ok`` | ``failed``) and the ``parity`` summary in ``manifest``.

    A failing engine is kept (marked ``failed``) rather than raising, so its report can be read;
    the build command turns ``status: failed`` into a non-zero exit. A recipe with
    ``parity.enabled: false`` is left ``unchecked``.
    """
    if not manifest["recipe"].get("parity", {}).get("enabled", True):
        return
    report = run_parity(tmp_engine_dir)
    manifest["status"] = "ok" if report["passed"] else "failed"
    manifest["parity"] = json_safe(summary(report))


parity_stage.stage = "parity"  # the name build_engine times it under
