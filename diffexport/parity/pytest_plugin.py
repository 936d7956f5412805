"""pytest plugin (entry point ``pytest11: diffexport``): engine parity as named test items.

``pytest --diffexport-engine engines/quickstart`` collects, per engine directory, with no test
file of the user's::

    quickstart::manifest                               manifest, file hashes and parity verdict
    quickstart::onnxruntime::verdict                   that backend's recorded parity verdict (as engines.load decides)
    quickstart::onnxruntime::per_call[sigma=80]        one per σ of the sweep (D and F errors)
    quickstart::onnxruntime::trajectory                the whole sampler's final sample
    quickstart::onnxruntime::task                      task-level parity, where the recipe has a judge

Without test paths on the command line only the engines' items run (``pytest tests --diffexport-engine
DIR`` runs both). Options: ``--diffexport-engine DIR`` (repeatable), ``--diffexport-backend NAME`` (repeatable;
default every artifact of the engine), ``--diffexport-rtol-scale X`` (multiplies every tolerance).
Collection reads manifests only; the reference and each backend run on the first item that needs
them, once per engine and session (and are cached on disk by content, which xdist workers share).

For users' own tests: the ``diffexport_engine`` factory fixture, ``diffexport_reference`` and the
marker ``@pytest.mark.diffexport_parity(engine=..., backend=..., per_call_rtol=...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

STATE = pytest.StashKey["_Parity"]()
MARKER = "diffexport_parity"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("diffexport", "diffexport engine parity")
    group.addoption("--diffexport-engine", action="append", default=[], metavar="DIR",
                    help="Engine directory whose parity to check as test items (repeatable).")
    group.addoption("--diffexport-backend", action="append", default=[], metavar="NAME",
                    help="Backend to check (repeatable; default: every artifact of the engine).")
    group.addoption("--diffexport-rtol-scale", type=float, default=1.0, metavar="X",
                    help="Multiply the manifest's parity tolerances by X (exploration).")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(engine, backend=None, per_call_rtol=None, per_call_f_rtol=None, "
                            "final_rtol=None): fail the test unless the engine passes parity with these tolerances")
    if config.getoption("--diffexport-rtol-scale") <= 0:
        raise pytest.UsageError("--diffexport-rtol-scale: must be > 0")
    config.stash[STATE] = _Parity(config.getoption("--diffexport-rtol-scale"))
    if config.getoption("--diffexport-engine") and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = []  # no test paths named: the engines' items only, not the testpaths / current folder


class _Parity:
    """Per session: one :class:`~diffexport.parity.harness.ParityRun` per engine and tolerance
    overrides, all sharing one reference per engine."""

    def __init__(self, rtol_scale: float):
        self.rtol_scale, self.runs = rtol_scale, {}

    def run(self, engine_dir: str | Path, **overrides: float | None):
        from diffexport.parity.harness import ParityRun

        engine_dir = Path(engine_dir).resolve()
        key = (engine_dir, tuple(sorted((k, v) for k, v in overrides.items() if v is not None)))
        if key not in self.runs:
            shared = next((r.reference for (d, _), r in self.runs.items() if d == engine_dir), None)
            self.runs[key] = ParityRun(engine_dir, rtol_scale=self.rtol_scale, reference=shared, **overrides)
        return self.runs[key]


class ParityFailure(Exception):
    """A parity item's failure: its message is the whole report (no traceback)."""


def _fail(message: str):
    raise ParityFailure(message)


class _Item(pytest.Item):
    def __init__(self, *, engine_dir: Path, backend: str | None = None, check: str, index: int | None = None, **kw: Any):
        super().__init__(**kw)
        self.engine_dir, self.backend, self.check, self.index, self.broken = engine_dir, backend, check, index, ""

    def run(self):
        return self.config.stash[STATE].run(self.engine_dir)

    def runtest(self) -> None:
        import logging

        # torch's structured trace (TORCH_TRACE) logs only where its logger has handlers, and pytest's log capture adds
        # some: hundreds of empty DEBUG records per export (the divergence search) in the failure report, and their payloads
        trace = logging.getLogger("torch.__trace")
        ours = [h for h in trace.handlers if type(h).__module__.startswith("_pytest")]
        for h in ours:
            trace.removeHandler(h)
        try:
            getattr(self, f"_{self.check}")()
        finally:
            for h in ours:
                trace.addHandler(h)

    def _manifest(self) -> None:
        from diffexport.engines.base import EngineError
        from diffexport.engines.manifest import engine_problems, read_manifest
        from diffexport.engines.verdict import refusal

        try:
            manifest = read_manifest(self.engine_dir)
            problems = engine_problems(self.engine_dir, manifest)  # every hashed file, as `diffexport inspect` checks them
        except (EngineError, KeyError, TypeError) as e:
            _fail(f"{self.engine_dir}: {type(e).__name__ + ': ' if not isinstance(e, EngineError) else ''}{e}")
        if problems:
            _fail("\n".join(problems))
        message = refusal(self.engine_dir, manifest)
        if message:
            _fail(message)

    def _verdict(self) -> None:
        """The backend's recorded verdict: fails where ``engines.load(dir, backend)`` refuses it
        (its parity failed or was not run, or the engine's status is not ok)."""
        from diffexport.engines.base import EngineError
        from diffexport.engines.manifest import read_manifest
        from diffexport.engines.verdict import refusal

        try:
            manifest = read_manifest(self.engine_dir)
        except EngineError as e:
            _fail(f"{self.backend}: {e}")
        message = refusal(self.engine_dir, manifest, self.backend)
        if message:
            entry = ((manifest.get("parity") or {}).get("backends") or {}).get(self.backend)
            error = entry.get("error") if isinstance(entry, dict) else None
            _fail(f"{self.backend}: {message}" + (f" (its parity error: {error})" if error else ""))

    def _entry(self) -> dict:
        entry = self.run().check(self.backend)
        if entry.get("error"):
            _fail(f"{self.backend}: {entry['error']}")
        return entry

    def _per_call(self) -> None:
        from diffexport.parity.harness import call_passed
        from diffexport.testing import describe_call

        entry = self._entry()
        record = entry["per_call"][self.index]
        if not call_passed(record, entry["tolerances"]):
            lines = describe_call(record, entry["tolerances"])
            lines.append(f"(D max abs {record['max_abs']:.3g}, F max abs {record['f_max_abs']:.3g})")
            d = self.run().divergence(self.backend)
            if d:
                at = f" at sigma={d['sigma']:.4g}" if d.get("sigma") is not None else ""
                what = "ONNX node" if self.backend == "onnxruntime" else "module"  # module: parity.module_locate (AOTI)
                lines.append(f"first divergent {what}, located{at}: {d['summary'].removeprefix('first diverging module: ')}")
            _fail(f"{self.backend} ({entry['precision']}): " + "\n".join(lines))

    def _trajectory(self) -> None:
        from diffexport.parity.harness import nan_worst, trajectory_passed

        entry = self._entry()
        if not trajectory_passed(entry, entry["tolerances"]):
            final, steps = entry["trajectory"]["final"], entry["trajectory"]["steps"]
            worst = max(steps, key=lambda r: nan_worst(r["rel_l2"]))
            _fail(f"{self.backend} ({entry['precision']}): final-sample rel L2 {final['rel_l2']:.3g} > "
                  f"{entry['tolerances']['final_rtol']:g} (worst step {worst['step']} at sigma={worst['sigma']:.4g}: "
                  f"rel L2 {worst['rel_l2']:.3g})")

    def _task(self) -> None:
        run = self.run()
        entry = dict(self._entry())  # the task check folds its verdict into a copy
        try:
            run.task({self.backend: entry})
        except Exception as e:  # a judge that cannot be resolved or run: this item fails, the session goes on
            _fail(f"{self.backend}: task-level parity: {type(e).__name__}: {e}")
        task = entry["task"]
        if task.get("error"):
            _fail(f"{self.backend}: task-level parity: {task['error']}")
        if not task["passed"]:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in task.items() if isinstance(v, float))
            _fail(f"{self.backend}: task-level parity fails the judge's gates ({shown})")

    def _missing(self) -> None:
        pytest.skip(f"{self.engine_dir}: no artifact for backend {self.backend!r}")

    def _broken(self) -> None:
        _fail(self.broken)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ParityFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.engine_dir, None, self.nodeid


def _engine_items(session: pytest.Session, engine_dir: Path, name: str, backends: list[str]) -> list[pytest.Item]:
    """The items of one engine directory named ``name`` (a ``<name>::manifest`` item failing with
    the reason when the manifest cannot be read)."""
    from diffexport.engines.load import BACKENDS
    from diffexport.parity.harness import default_backends

    engine = _EngineNode.from_parent(session, name=name, path=engine_dir, nodeid=name)

    def item(parent: pytest.Collector, name: str, **kw: Any) -> _Item:  # the id as a string, parsed as pytest parses `--lf` ids
        return _Item.from_parent(parent, name=name, nodeid=f"{parent.nodeid}::{name}", engine_dir=engine_dir, **kw)

    items: list[pytest.Item] = [item(engine, "manifest", check="manifest")]
    try:
        run = session.config.stash[STATE].run(engine_dir)
    except Exception as e:  # an unreadable engine: the manifest item fails with the reason
        items[0].check, items[0].broken = "broken", f"{engine_dir}: {e}"
        return items
    built = default_backends(run.manifest)
    for backend in backends or built:
        node = _EngineNode.from_parent(engine, name=backend, path=engine_dir)
        if backend not in built:
            why = f"unknown backend {backend!r}" if backend not in BACKENDS else "missing"
            items.append(item(node, "artifact", backend=backend, check="missing" if backend in BACKENDS else "broken"))
            items[-1].broken = f"{engine_dir}: {why}; expected one of {', '.join(b for b in BACKENDS if b != 'torch')}"
            continue
        items.append(item(node, "verdict", backend=backend, check="verdict"))
        for i, sigma in enumerate(run.plan.sigmas):
            items.append(item(node, f"per_call[sigma={sigma:.4g}]", backend=backend, check="per_call", index=i))
        items.append(item(node, "trajectory", backend=backend, check="trajectory"))
        if run.judge():
            items.append(item(node, "task", backend=backend, check="task"))
    return items


class _EngineNode(pytest.Collector):
    """An engine directory (or one backend of it) in the collection tree; its items are made directly."""

    def collect(self):  # pragma: no cover - items are created by pytest_collection_modifyitems
        return []


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    backends, names = config.getoption("--diffexport-backend"), set()
    for engine in dict.fromkeys(Path(e).resolve() for e in config.getoption("--diffexport-engine")):
        name = engine.name if engine.name not in names else f"{engine.parent.name}-{engine.name}"  # two "quickstart"s
        names.add(name)
        found = _engine_items(session, engine, name, backends)
        # reported as collected (the terminal's "collected N items", -k's deselected count, --lf)
        session.ihook.pytest_collectreport(report=pytest.CollectReport(name, "passed", None, found))
        items.extend(found)


# --- fixtures and marker for users' own tests ---------------------------------------------------------------


@pytest.fixture
def diffexport_engine(request: pytest.FixtureRequest):
    """Factory: ``diffexport_engine("engines/x", backend="aoti", **load_options)`` is the engine,
    loaded through ``diffexport.engines.load``, when its parity verdict is ``ok``; otherwise the
    test fails with the verdict line."""
    from diffexport.engines.base import EngineError
    from diffexport.engines.manifest import read_manifest
    from diffexport.engines.verdict import require_verified
    from diffexport.parity.harness import load_candidate

    def make(engine_dir: str | Path, backend: str = "onnxruntime", **options: Any):
        try:
            require_verified(engine_dir, read_manifest(engine_dir), backend)
            return load_candidate(engine_dir, backend, **options)  # verified just above
        except EngineError as e:
            error = str(e)
        pytest.fail(error, pytrace=False)

    return make


@pytest.fixture
def diffexport_reference(request: pytest.FixtureRequest):
    """``diffexport_reference(engine_dir)``: the session's torch reference of that engine
    (:class:`~diffexport.parity.harness.Reference`: ``.engine(device)`` is the eager fp32
    denoiser, ``.calls()`` / ``.trajectory()`` its per-call sweep and trajectory), computed once."""
    state = request.config.stash[STATE]
    return lambda engine_dir: state.run(engine_dir).reference


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """A test marked ``diffexport_parity`` fails (in its call phase) unless the engine passes parity."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return
    from diffexport.engines.base import EngineError
    from diffexport.testing import describe_failures

    kw = dict(marker.kwargs)
    engine = kw.pop("engine", marker.args[0] if marker.args else None)
    backend = kw.pop("backend", None)
    unknown = set(kw) - {"per_call_rtol", "per_call_f_rtol", "final_rtol"}
    if engine is None or unknown:
        pytest.fail(f"@pytest.mark.{MARKER}: engine= is required; the other arguments are backend, per_call_rtol, "
                    f"per_call_f_rtol, final_rtol (got {sorted(marker.kwargs)})", pytrace=False)
    try:
        report = item.config.stash[STATE].run(engine, **kw).report([backend] if isinstance(backend, str) else backend)
    except EngineError as e:
        report, error = None, str(e)
    if report is None:
        pytest.fail(error, pytrace=False)
    if not report["passed"]:
        pytest.fail(describe_failures(report), pytrace=False)
