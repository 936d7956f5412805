"""Parity of an engine directory's backends against the torch reference, and the build's parity stage.

For every candidate backend: the per-call σ sweep (errors of D and of the network's prediction F)
and the whole-sampler trajectory (:mod:`.checks`), judged against :mod:`.tolerances`; when an ONNX
Runtime engine fails, the first diverging ONNX node (:mod:`.onnx_locate`).

Cost: one :class:`ParityRun` computes the reference once (:class:`Reference`: one per-call sweep,
stacked into as few calls as the batch range allows, and one trajectory) and checks every candidate
against it; the reference outputs are also cached on disk by content (:func:`reference_key`), so a
later ``diffexport parity``, a test session or another xdist worker reuses them.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffexport.engines.base import Engine, EngineError
from diffexport.engines.load import BACKENDS, load
from diffexport.engines.manifest import mark, read_manifest, sha256_json
from diffexport.fileio import write_atomic
from diffexport.parity import checks
from diffexport.parity.report import json_safe, write_report
from diffexport.parity.tolerances import tolerances
from diffexport.recipes import IOSpec
from diffexport.runtime.inputs import index_high
from diffexport.runtime.sampler import SamplerSpec

FORMAT = "diffexport-parity/2"
CACHE_FORMAT = "diffexport-parity-reference/1"
CACHE_ENV = "DIFFEXPORT_PARITY_CACHE"  # a folder for reference caches instead of ``ENGINE_DIR/.cache/parity``
TARGET_BACKEND = {target: backend for backend, target in BACKENDS.items() if target is not None}


def default_backends(manifest: dict) -> list[str]:
    """The backends that run the artifacts ``manifest`` lists (onnx -> onnxruntime, ...)."""
    return [TARGET_BACKEND[t] for t in manifest.get("artifacts", {}) if t in TARGET_BACKEND]


def load_candidate(engine_dir: str | Path, backend: str, device: str | torch.device | None = None, **options: Any) -> Engine:
    """``backend``'s engine whatever its parity verdict (parity is what sets the verdict);
    ``options`` go to :func:`~diffexport.engines.load`."""
    return load(engine_dir, backend, device=device, allow_unverified=True, **options)


@dataclass(frozen=True)
class Plan:
    """What the reference is computed for: the σ sweep, batch and seed, and the sampler."""

    sigmas: list[float]
    batch: int
    seed: int
    spec: SamplerSpec

    @classmethod
    def of(cls, manifest: dict, num_sigmas: int | None = None, batch: int | None = None, seed: int | None = None) -> Plan:
        """Settings from the arguments, else the recipe's ``parity:`` section; ``batch`` moved into
        the engine's batch range (the same for every candidate: they share the manifest's I/O)."""
        cfg = manifest["recipe"].get("parity", {})
        spec = SamplerSpec.from_manifest(manifest["sampler"])
        rng = manifest["io"].get("batch", {})
        batch = min(max(batch or cfg.get("batch", 2), int(rng.get("min", 1))), int(rng.get("max", 1 << 30)))
        seed = cfg.get("seed", 0) if seed is None else seed
        return cls(checks.sigma_sweep(spec, num_sigmas or cfg.get("num_sigmas", 8)), batch, seed, spec)

    def settings(self) -> dict:
        return {"num_sigmas": len(self.sigmas), "batch": self.batch, "seed": self.seed, "solver": self.spec.solver,
                "num_steps": self.spec.num_steps}


def reference_key(manifest: dict, plan: Plan, device: torch.device) -> str:
    """Content key of the reference outputs: everything they depend on (weights, recipe, sampler, I/O,
    the plan, device type and torch version), so a changed engine never reads a stale cache."""
    return sha256_json({
        "format": CACHE_FORMAT, "content_key": manifest.get("content_key"), "weights": manifest["weights"].get("sha256"),
        "recipe": manifest["recipe"], "sampler": manifest["sampler"], "io": manifest["io"], "sigmas": plan.sigmas,
        "batch": plan.batch, "seed": plan.seed, "device": device.type, "torch": torch.__version__,
    })  # fmt: skip


@dataclass
class Calls:
    """The per-call sweep: inputs per σ, the reference's outputs, and (c_skip, c_out) per σ."""

    inputs: list[dict[str, torch.Tensor]]
    outputs: list[torch.Tensor]
    coefs: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Trajectory:
    inputs: checks.TrajectoryInputs
    states: list[torch.Tensor]


class Reference:
    """The torch reference of one engine directory for one :class:`Plan`, on each device asked for.

    The per-call sweep and the trajectory are computed at most once per device, and read from
    (or written to) ``cache_dir`` when it is not ``None``: a cache hit builds no torch model.
    """

    def __init__(self, engine_dir: str | Path, manifest: dict, plan: Plan, cache_dir: Path | None = None):
        self.engine_dir, self.manifest, self.plan, self.cache_dir = Path(engine_dir), manifest, plan, cache_dir
        self.engines: dict[torch.device, Engine] = {}
        self.memo: dict[tuple[str, torch.device], Any] = {}
        self.computed: list[str] = []  # what was computed (not read from the cache), for tests and reports

    def engine(self, device: torch.device | str = "cpu") -> Engine:
        device = torch.device(device)
        if device not in self.engines:
            self.engines[device] = load(self.engine_dir, "torch", device=device)
        return self.engines[device]

    def run(self, what: str, device: torch.device | str, fn) -> Any:
        """``fn(reference_engine)`` computed once per ``what`` and device (in memory only), for
        further checks built on the same reference (task-level parity)."""
        device = torch.device(device)
        if (what, device) not in self.memo:
            self.memo[what, device] = fn(self.engine(device))
        return self.memo[what, device]

    def calls(self, device: torch.device | str = "cpu") -> Calls:
        """The per-call sweep on ``device``."""
        def compute(ref: Engine) -> dict:
            inputs = checks.call_inputs(ref, self.plan.sigmas, self.plan.batch, self.plan.seed, index_high(ref))
            coefs = checks.coefficients(ref, inputs)
            return {"inputs": inputs, "outputs": checks.call_outputs(ref, inputs), "c_skip": [c for c, _ in coefs],
                    "c_out": [c for _, c in coefs]}

        d = self._get("calls", torch.device(device), compute)
        return Calls(d["inputs"], d["outputs"], list(zip(d["c_skip"], d["c_out"])))

    def trajectory(self, device: torch.device | str = "cpu") -> Trajectory:
        """The whole sampler's states on ``device``, from seeded latents and conditions."""
        def compute(ref: Engine) -> dict:
            t = checks.trajectory_inputs(ref, self.plan.spec, self.plan.batch, self.plan.seed, index_high(ref))
            return {"latents": t.latents, "conditions": t.conditions, "seed": t.seed,
                    "states": checks.trajectory_states(ref, self.plan.spec, t)}

        d = self._get("trajectory", torch.device(device), compute)
        return Trajectory(checks.TrajectoryInputs(d["latents"], d["conditions"], d["seed"]), d["states"])

    def _get(self, what: str, device: torch.device, compute) -> dict:
        if (what, device) in self.memo:
            return self.memo[what, device]
        if self.cache_dir is None:
            value = compute(self.engine(device))
            self.computed.append(what)
        else:
            path = self.cache_dir / f"{what}-{reference_key(self.manifest, self.plan, device)[:40]}.pt"
            with _locked(path):  # another process (an xdist worker) computing it: wait and read its result
                value = _read_cache(path)
                if value is None:
                    value = compute(self.engine(device))
                    self.computed.append(what)
                    _write_cache(path, value)
        self.memo[what, device] = value
        return value


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` + ``.lock`` (none where the folder is read-only or
    ``fcntl`` is missing: then two processes may both compute, which is only slower)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_suffix(".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_cache(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    except Exception:  # a damaged cache entry is recomputed, never trusted
        return None


def _write_cache(path: Path, value: dict) -> None:
    import io

    buf = io.BytesIO()
    torch.save(value, buf)
    try:
        write_atomic(path, buf.getvalue())
    except OSError:  # a read-only engine directory: parity still runs, uncached
        pass


def default_cache_dir(engine_dir: Path) -> Path:
    """``$DIFFEXPORT_PARITY_CACHE`` when set, else ``ENGINE_DIR/.cache/parity`` (not in the manifest)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(engine_dir) / ".cache" / "parity"


def nan_worst(v: float) -> float:
    """Sort/compare key treating NaN as worst."""
    return math.inf if isinstance(v, float) and math.isnan(v) else v


def call_passed(record: dict, tol: dict) -> bool:
    """Whether one per-call record is inside both the D and the F tolerance."""
    return nan_worst(record["rel_l2"]) <= tol["per_call_rtol"] and nan_worst(record["f_rel_l2"]) <= tol["per_call_f_rtol"]


def trajectory_passed(entry: dict, tol: dict) -> bool:
    return bool(entry.get("trajectory")) and nan_worst(entry["trajectory"]["final"]["rel_l2"]) <= tol["final_rtol"]


class ParityRun:
    """Parity of any number of candidate backends of one engine directory against one reference.

    ``check(backend)`` runs a candidate (memoised); ``report(backends)`` assembles the report of
    several. Settings default to the recipe's ``parity:`` section, tolerances to the artifact's
    precision preset overridden by that section, then by ``per_call_rtol`` / ``per_call_f_rtol`` /
    ``final_rtol``, then multiplied by ``rtol_scale``. ``cache_dir=None`` uses
    :func:`default_cache_dir`; ``False`` disables the disk cache. ``reference``: a
    :class:`Reference` to share with other runs on the same engine and plan (else a new one).
    """

    def __init__(self, engine_dir: str | Path, *, per_call_rtol: float | None = None, per_call_f_rtol: float | None = None,
                 final_rtol: float | None = None, rtol_scale: float = 1.0, num_sigmas: int | None = None,
                 batch: int | None = None, seed: int | None = None, device: str | torch.device | None = None,
                 locate: bool = True, cache_dir: str | Path | bool | None = None, reference: Reference | None = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir)
        self.plan = Plan.of(self.manifest, num_sigmas, batch, seed)
        cache = default_cache_dir(self.engine_dir) if cache_dir is None or cache_dir is True else Path(cache_dir) if cache_dir else None
        shared = reference is not None and reference.engine_dir == self.engine_dir and reference.plan == self.plan
        self.reference = reference if shared else Reference(self.engine_dir, self.manifest, self.plan, cache)
        self.overrides = {"per_call_rtol": per_call_rtol, "per_call_f_rtol": per_call_f_rtol, "final_rtol": final_rtol}
        self.rtol_scale, self.device, self.locate = rtol_scale, device, locate
        self.entries: dict[str, dict] = {}

    def record(self, backend: str) -> dict:
        """The manifest's artifact record that ``backend`` runs ({} for none)."""
        target = BACKENDS.get(backend)
        return self.manifest.get("artifacts", {}).get(target, {}) if target else {}

    def tolerances(self, backend: str) -> dict:
        precision = self.record(backend).get("precision", self.manifest["recipe"].get("export", {}).get("precision", "fp32"))
        tol = tolerances(precision, self.manifest["recipe"].get("parity", {}), **self.overrides)
        return {k: v * self.rtol_scale for k, v in tol.items()}

    def check(self, backend: str) -> dict:
        """``backend``'s report entry: per call (D and F per σ), trajectory, verdict, error, divergence."""
        if backend in self.entries:
            return self.entries[backend]
        record = self.record(backend)
        precision = record.get("precision", self.manifest["recipe"].get("export", {}).get("precision", "fp32"))
        tol = self.tolerances(backend)
        entry: dict[str, Any] = {"target": BACKENDS.get(backend), "precision": precision, "tolerances": tol, "passed": False,
                                 "error": None}
        start = time.perf_counter()
        try:
            self._run(backend, tol, entry)
        except Exception as e:  # a backend that cannot load or run fails, the others are still checked
            entry["error"] = f"{type(e).__name__}: {e}"
        entry["seconds"] = round(time.perf_counter() - start, 3)
        self.entries[backend] = entry
        return entry

    def divergence(self, backend: str) -> dict | None:
        """For a failing ONNX Runtime backend (when ``locate``), the first diverging ONNX node, stored
        as ``entry["divergence"]`` (computed once, on demand: it re-exports the reference)."""
        entry = self.check(backend)
        if "divergence" in entry or not self.locate or entry["passed"] or not entry.get("per_call") or backend not in ("onnxruntime", "aoti"):
            return entry.get("divergence")
        start = time.perf_counter()
        try:
            entry["divergence"] = self._locate(self.record(backend), entry["tolerances"], entry)
        except Exception as e:  # the verdict stands without the diagnosis
            entry["divergence"] = {"summary": f"the first diverging ONNX node could not be located ({type(e).__name__}: {e})", "sigma": None}
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - start, 3)
        return entry["divergence"]

    def _run(self, backend: str, tol: dict, entry: dict) -> None:
        if backend not in BACKENDS:
            raise EngineError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        engine = load_candidate(self.engine_dir, backend, self.device)
        calls = self.reference.calls(engine.device)
        outs = checks.call_outputs(engine, calls.inputs)
        entry["per_call"] = checks.compare_calls(self.plan.sigmas, calls.outputs, outs, calls.inputs, calls.coefs)
        traj = self.reference.trajectory(engine.device)
        entry["trajectory"] = checks.compare_steps(self.plan.spec, traj.states, checks.trajectory_states(engine, self.plan.spec, traj.inputs))
        entry["per_call_worst"] = max(entry["per_call"], key=lambda r: nan_worst(r["rel_l2"]))
        entry["per_call_f_worst"] = max(entry["per_call"], key=lambda r: nan_worst(r["f_rel_l2"]))
        entry["passed"] = all(call_passed(r, tol) for r in entry["per_call"]) and trajectory_passed(entry, tol)

    def _locate(self, record: dict, tol: dict, entry: dict) -> dict | None:
        """The first diverging ONNX node on the per-call inputs furthest outside their tolerance."""
        from diffexport.parity.onnx_locate import locate_divergence

        def excess(r: dict) -> float:
            return max(nan_worst(r["rel_l2"]) / tol["per_call_rtol"], nan_worst(r["f_rel_l2"]) / tol["per_call_f_rtol"])

        worst = max(range(len(self.plan.sigmas)), key=lambda i: excess(entry["per_call"][i]))
        ref = self.reference.engine("cpu")
        inputs = self.reference.calls("cpu").inputs[worst]
        rtol = min(tol["per_call_rtol"], tol["per_call_f_rtol"])  # the network's activations are F-like, not D-like
        io = IOSpec.from_dict(self.manifest["io"])
        if not record["file"].endswith(".onnx"):  # AOTI: the first diverging module (parity.module_locate)
            from diffexport.parity.module_locate import locate_in_artifact

            found = locate_in_artifact(record, ref.denoiser, io, inputs, rtol)
        else:
            found = locate_divergence(self.engine_dir / record["file"], ref.denoiser, io, inputs, rtol,
                                      precision=record.get("precision", "fp32"), opset=record.get("opset", 18))
        return None if found is None else {**found.to_dict(), "sigma": self.plan.sigmas[worst], "summary": str(found)}

    def judge(self) -> dict | None:
        """The recipe's ``parity.judge`` section (task-level parity), if any."""
        return (self.manifest["recipe"].get("parity") or {}).get("judge")

    def task(self, entries: dict[str, dict]) -> dict:
        """Task-level parity of ``entries`` (:func:`diffexport.parity.task.check_task`, on this
        run's reference); it adds ``entry["task"]`` and folds its verdict into ``entry["passed"]``."""
        from diffexport.parity.task import check_task

        return check_task(self.engine_dir, self.manifest, entries, self.reference.engine, self.device)

    def report(self, backends: list[str] | None = None) -> dict:
        """The parity report of ``backends`` (default: every built artifact); ``report["passed"]``
        is True when every one passed."""
        backends = backends or default_backends(self.manifest)
        if not backends:
            raise EngineError(f"{self.engine_dir}: no artifact to check (artifacts: none)")
        report = {
            "format": FORMAT, "engine": self.manifest["name"], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": self.plan.settings(), "sigmas": self.plan.sigmas,
            "backends": {b: self.check(b) for b in backends},
        }  # fmt: skip
        for b in backends:
            self.divergence(b)
        if self.judge():
            report["task"] = self.task(report["backends"])
        report["passed"] = all(e["passed"] for e in report["backends"].values())
        return report


def check_engine(engine_dir: str | Path, backends: list[str] | None = None, **options: Any) -> dict:
    """The parity report of ``backends`` (default: every built artifact) of ``engine_dir``, all
    checked against one reference (:class:`ParityRun` for the options)."""
    return ParityRun(engine_dir, **options).report(backends)


def summary(report: dict) -> dict:
    """What the manifest keeps of a parity report."""
    backends = {}
    for name, e in report["backends"].items():
        backends[name] = {
            "passed": e["passed"], "precision": e["precision"], "tolerances": e["tolerances"],
            "per_call_rel_l2": e.get("per_call_worst", {}).get("rel_l2"),
            "per_call_f_rel_l2": e.get("per_call_f_worst", {}).get("f_rel_l2"),
            "final_rel_l2": e.get("trajectory", {}).get("final", {}).get("rel_l2"),
            **({"task": task_line(e["task"])} if e.get("task") else {}),
            **({"error": e["error"]} if e["error"] else {}),
        }  # fmt: skip
    return {"passed": report["passed"], "report": "parity.json", "backends": backends}


def task_line(task: dict) -> str:
    """One backend's task-level parity in a few words (``agreement 0.99, accuracy 1, Frechet 0.012 (pass)``)."""
    if "error" in task:
        return f"error: {task['error']}"
    words = {"agreement": "agreement", "accuracy": "accuracy", "frechet_reference": "Frechet"}
    line = ", ".join(f"{w} {task[k]:.3g}" for k, w in words.items() if isinstance(task.get(k), (int, float)))
    return f"{line} ({'pass' if task.get('passed') else 'FAIL'})"


def run_parity(engine_dir: str | Path, backends: list[str] | None = None, report_dir: str | Path | None = None,
               update_manifest: bool = False, **options: Any) -> dict:
    """Check every candidate in ``backends`` (default: every built artifact) against one reference,
    then write the report files (``parity.json``, ``.md``, ``.png``) in ``report_dir`` (none when
    None); ``update_manifest`` also writes them into the engine directory and records status and
    summary in its manifest. Without it the engine directory is left as it was (but for the reference
    cache). ``options``: those of :class:`ParityRun`."""
    if update_manifest and "torch" in (backends or []):
        raise EngineError("backend torch: the reference cannot verify an engine; check its artifacts' backends")
    report = check_engine(engine_dir, backends, **options)
    folders = dict.fromkeys(Path(f).resolve() for f in ([report_dir] if report_dir else []) + ([engine_dir] if update_manifest else []))
    for folder in folders:  # a marked run's report is also the engine's parity.json, the one its summary names
        write_report(report, folder)
    if update_manifest:
        mark(engine_dir, **marked(read_manifest(engine_dir), summary(report)))
    return report


def marked(manifest: dict, new: dict) -> dict:
    """The manifest fields ``diffexport parity --mark`` records for a run summarised by ``new``: the
    per-backend results merged over the earlier ones (a backend left out keeps its result; one never
    checked stays refused), ``status`` as a build sets it (``targets: auto``: ok when one backend
    passed, else when all did), and for a ranked engine the fastest passing backend as default."""
    backends = {**((manifest.get("parity") or {}).get("backends") or {}), **new["backends"]}
    passed = [b for b, e in backends.items() if isinstance(e, dict) and e.get("passed") is True]
    auto = manifest["recipe"].get("export", {}).get("targets") == ["auto"]
    ok = bool(passed) if auto else len(passed) == len(backends)
    fields: dict[str, Any] = {"status": "ok" if ok else "failed",
                              "parity": json_safe({**new, "passed": len(passed) == len(backends), "backends": backends})}
    ranking = manifest.get("ranking")
    if isinstance(ranking, dict) and isinstance(ranking.get("order"), list):
        candidates = dict.fromkeys((*ranking["order"], *ranking.get("failed", [])))
        fields["ranking"] = {**ranking, "failed": [b for b in candidates if b in backends and b not in passed]}
        fields["default_backend"] = next((b for b in ranking["order"] if b in passed), manifest.get("default_backend"))
    return fields


def parity_stage(tmp_engine_dir: Path, manifest: dict) -> None:
    """``build_engine`` finalize stage: check every built artifact, write the report into the engine
    directory, set ``status`` (``ok`` | ``failed``) and the ``parity`` summary in ``manifest``.

    A failing engine is kept (marked ``failed``) rather than raising, so its report can be read;
    the build command turns ``status: failed`` into a non-zero exit. A recipe with
    ``parity.enabled: false`` is left ``unchecked``.
    """
    if not manifest["recipe"].get("parity", {}).get("enabled", True):
        return
    report = run_parity(tmp_engine_dir, report_dir=tmp_engine_dir)
    manifest["status"] = "ok" if report["passed"] else "failed"
    manifest["parity"] = json_safe(summary(report))


parity_stage.stage = "parity"  # the name build_engine times it under
