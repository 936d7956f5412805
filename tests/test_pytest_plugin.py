"""The pytest plugin (``diffexport.parity.pytest_plugin``) run by pytest's own ``pytester``: named items
per engine/backend/σ, failing ids that say where, clear error items for broken engines, junit XML,
``-k``/``-x``/xdist, and the fixtures and marker for users' own tests.

Engines from conftest.py: ``built_quickstart`` (ONNX, parity ok) and ``perturbed_onnx_engine``.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import xml.etree.ElementTree as ET

import pytest

from diffexport.engines.manifest import mark, read_manifest, write_manifest
from diffexport.parity import run_parity

pytest_plugins = ["pytester"]
PLUGIN = "diffexport.parity.pytest_plugin"
SIGMAS = ["80", "17.61", "3.875", "0.8527", "0.1876", "0.0413", "0.009088", "0.002"]  # the quickstart sweep (8 σ)


def _plugin_args() -> list[str]:
    """``-p PLUGIN`` unless the installed package already registers it (pytest11 entry point)."""
    installed = any(ep.value == PLUGIN for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", PLUGIN]


def run(pytester: pytest.Pytester, *args, subprocess: bool = False, cache: bool = False) -> pytest.RunResult:
    argv = [*_plugin_args(), *([] if cache else ["-p", "no:cacheprovider"]), "-v", *map(str, args)]
    return pytester.runpytest_subprocess(*argv) if subprocess else pytester.runpytest_inprocess(*argv)


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """``{item id: PASSED | FAILED | SKIPPED | ERROR}`` from ``-v`` output."""
    out = {}
    for line in result.outlines:
        for word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            if f" {word}" in line and "::" in line:
                nodeid = line.split(f" {word}")[0].split("] ")[-1].strip()
                out[nodeid.split("/")[-1]] = word
    return out


@pytest.fixture(scope="module")
def good(built_quickstart, tmp_path_factory):
    """A private copy of the quickstart engine, verified (``status: ok``) by the harness; its
    reference cache, filled here, is this module's own."""
    engine_dir = tmp_path_factory.mktemp("plugin") / "quickstart"
    shutil.copytree(built_quickstart, engine_dir)
    assert run_parity(engine_dir, update_manifest=True)["passed"]
    return engine_dir


def test_good_engine_items_pass_and_junit_has_one_testcase_each(pytester, good, tmp_path):
    xml = tmp_path / "junit.xml"
    result = run(pytester, "--diffexport-engine", good, f"--junitxml={xml}")
    result.assert_outcomes(passed=2 + len(SIGMAS) + 1)
    got = outcomes(result)
    assert got == {"quickstart::manifest": "PASSED", "quickstart::onnxruntime::verdict": "PASSED", "quickstart::onnxruntime::trajectory": "PASSED",
                   **{f"quickstart::onnxruntime::per_call[sigma={s}]": "PASSED" for s in SIGMAS}}
    cases = ET.parse(xml).getroot().iter("testcase")
    names = sorted(f"{c.get('classname')}::{c.get('name')}" for c in cases)
    assert names == sorted(n.replace("quickstart::onnxruntime::", "quickstart.onnxruntime::") for n in got)


@pytest.fixture(scope="module")
def perturbed(perturbed_onnx_engine, tmp_path_factory):
    """The perturbed engine marked ``status: ok``, as a build that passed: only its numbers are wrong."""
    engine_dir = tmp_path_factory.mktemp("plugin") / "perturbed"
    shutil.copytree(perturbed_onnx_engine[0], engine_dir)
    mark(engine_dir, "ok")
    return engine_dir


def test_engine_items_only_unless_test_paths_are_named(pytester, good):
    """``pytest --diffexport-engine DIR`` runs the engine's items, not the tests around it (in a
    repository with ``testpaths`` that was the whole suite); named paths run both."""
    pytester.makepyfile(test_mine="def test_mine():\n    pass\n")
    pytester.makeini("[pytest]\ntestpaths = .\n")
    result = run(pytester, "--diffexport-engine", good, "-k", "manifest or mine")
    assert outcomes(result) == {"quickstart::manifest": "PASSED"}
    result = run(pytester, ".", "--diffexport-engine", good, "-k", "manifest or mine")
    assert outcomes(result) == {"quickstart::manifest": "PASSED", "test_mine.py::test_mine": "PASSED"}


def test_perturbed_weight_fails_with_ids_naming_sigma_and_backend(pytester, perturbed):
    engine_dir = perturbed
    result = run(pytester, "--diffexport-engine", engine_dir)
    got = outcomes(result)
    failed = sorted(k for k, v in got.items() if v == "FAILED")
    assert failed and all(k.startswith("perturbed::onnxruntime::") for k in failed)
    assert got["perturbed::manifest"] == "PASSED"  # hashes re-signed: only the numbers differ
    assert any("per_call[sigma=" in k for k in failed)
    text = result.stdout.str()
    assert "per-call rel L2 of" in text and "first divergent ONNX node, located at sigma=" in text and "Conv" in text
    assert "Traceback" not in text and "torch.__trace" not in text  # torch.export's empty DEBUG records are no report


def test_tampered_and_failed_engines_give_clear_error_items(pytester, good, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    (tampered / "denoiser.onnx").write_bytes(b"not an onnx file")
    failed = tmp_path / "failed"
    shutil.copytree(good, failed)
    mark(failed, "failed")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    result = run(pytester, "--diffexport-engine", tampered, "--diffexport-engine", failed, "--diffexport-engine", broken,
                 "--diffexport-engine", tmp_path / "absent")
    got = outcomes(result)
    assert got["tampered::manifest"] == "FAILED" and got["tampered::onnxruntime::trajectory"] == "FAILED"
    assert got["failed::manifest"] == "FAILED" and got["failed::onnxruntime::trajectory"] == "PASSED"
    assert got["failed::onnxruntime::verdict"] == "FAILED" and got["tampered::onnxruntime::verdict"] == "PASSED"  # verdict, not hashes
    assert got["broken::manifest"] == "FAILED" and got["absent::manifest"] == "FAILED"
    text = result.stdout.str()
    assert "sha256 does not match" in text and "status failed" in text and "manifest.json" in text
    assert result.ret == pytest.ExitCode.TESTS_FAILED and "INTERNALERROR" not in text and "Traceback" not in text


def test_each_backend_has_its_own_verdict_item(pytester, good, tmp_path):
    """An engine whose status is ok (a ``targets: auto`` build) may still hold a backend that failed parity
    or was never checked; its ``manifest`` item passed. The backend's ``verdict`` item fails, naming the
    backend and the reason, exactly where ``engines.load`` refuses it; the passing backend's item passes."""
    from diffexport.engines.load import load
    from diffexport.engines.verdict import UnverifiedEngine

    engines = []
    for name, edit in (("failed_backend", lambda b: b["onnxruntime"].update(passed=False, error="RuntimeError: boom")),
                       ("unchecked_backend", lambda b: b.pop("onnxruntime"))):
        engine_dir = tmp_path / name
        shutil.copytree(good, engine_dir)
        manifest = read_manifest(engine_dir)
        edit(manifest["parity"]["backends"])
        assert manifest["status"] == "ok"
        write_manifest(engine_dir, manifest)
        engines += ["--diffexport-engine", engine_dir]
        with pytest.raises(UnverifiedEngine):
            load(engine_dir, "onnxruntime")
    result = run(pytester, *engines, "--diffexport-engine", good, "-k", "manifest or verdict")
    assert outcomes(result) == {"failed_backend::manifest": "PASSED", "failed_backend::onnxruntime::verdict": "FAILED",
                                "unchecked_backend::manifest": "PASSED", "unchecked_backend::onnxruntime::verdict": "FAILED",
                                "quickstart::manifest": "PASSED", "quickstart::onnxruntime::verdict": "PASSED"}
    text = result.stdout.str()
    assert "onnxruntime: engine " in text and "parity failed for backend onnxruntime" in text and "(its parity error: RuntimeError: boom)" in text
    assert "parity was not run for backend onnxruntime" in text and "Traceback" not in text


def test_k_selects_a_backend_x_stops_and_rtol_scale_applies(pytester, good):
    args = ["--diffexport-engine", good, "--diffexport-backend", "onnxruntime", "--diffexport-backend", "tensorrt"]
    result = run(pytester, *args, "-k", "tensorrt")
    assert outcomes(result) == {"quickstart::tensorrt::artifact": "SKIPPED"}
    result = run(pytester, *args, "-k", "onnxruntime and trajectory")
    assert outcomes(result) == {"quickstart::onnxruntime::trajectory": "PASSED"}
    result = run(pytester, "--diffexport-engine", good, "--diffexport-rtol-scale", "1e-9", "-x")
    result.assert_outcomes(passed=2, failed=1)  # manifest, verdict, then per_call[sigma=80]: ~1e-7 > 1e-14; -x stops there
    assert "1e-14" in result.stdout.str()


def test_collected_count_and_last_failed_rerun(pytester, good):
    """The items count as collected (``-k`` reports them deselected, never a negative selection), and
    ``--lf`` reruns exactly the failed ``per_call[sigma=...]`` item (its id parses as pytest's own)."""
    result = run(pytester, "--diffexport-engine", good, "-k", "trajectory")
    result.stdout.fnmatch_lines([f"*collected {3 + len(SIGMAS)} items / {2 + len(SIGMAS)} deselected / 1 selected"])
    result = run(pytester, "--diffexport-engine", good, "--diffexport-rtol-scale", "1e-9", "-x", cache=True)
    result.assert_outcomes(passed=2, failed=1)
    result = run(pytester, "--diffexport-engine", good, "--diffexport-rtol-scale", "1e-9", "--lf", cache=True)
    assert outcomes(result) == {f"quickstart::onnxruntime::per_call[sigma={SIGMAS[0]}]": "FAILED"}
    result.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure*"])


def test_fixtures_and_marker_in_users_tests(pytester, good, tmp_path):
    failed = tmp_path / "failed"
    shutil.copytree(good, failed)
    mark(failed, "failed")
    pytester.makepyfile(f"""
        import pytest

        def test_factory(diffexport_engine):
            engine = diffexport_engine(r"{good}", backend="onnxruntime")
            assert engine.backend == "onnxruntime"

        def test_factory_refuses_failed(diffexport_engine):
            diffexport_engine(r"{failed}")

        def test_reference(diffexport_reference):
            assert diffexport_reference(r"{good}").engine().backend == "torch"

        @pytest.mark.diffexport_parity(engine=r"{good}", backend="onnxruntime", per_call_rtol=1e-4)
        def test_marked_good():
            pass

        @pytest.mark.diffexport_parity(engine=r"{good}", per_call_f_rtol=1e-12)
        def test_marked_too_strict():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=3, failed=2)
    got = outcomes(result)
    assert got["test_fixtures_and_marker_in_users_tests.py::test_factory_refuses_failed"] == "FAILED"
    assert got["test_fixtures_and_marker_in_users_tests.py::test_marked_too_strict"] == "FAILED"
    text = result.stdout.str()
    assert "is not verified: status failed" in text and "per-call rel L2 of F" in text


def test_xdist_two_workers(pytester, good):
    pytest.importorskip("xdist")
    result = run(pytester, "--diffexport-engine", good, "-n", "2", subprocess=True)
    result.assert_outcomes(passed=2 + len(SIGMAS) + 1)


def test_task_item_where_the_recipe_has_a_judge(pytester, good, tmp_path):
    """``parity.judge`` in the manifest's recipe adds ``<engine>::<backend>::task`` (diffexport.parity.task)."""
    pytester.makepyfile(tiny_judge="def judge(x):\n    return (x.mean(dim=(1, 2, 3)) > 0).long()\n")
    pytester.syspathinsert()
    engines = []
    for name, judge in (("judged", "tiny_judge:judge"), ("misjudged", "no_such_module:judge")):
        engine_dir = tmp_path / name
        shutil.copytree(good, engine_dir)
        manifest = read_manifest(engine_dir)
        manifest["recipe"]["parity"]["judge"] = {"name": judge, "samples": 4, "min_agreement": 0.5}
        write_manifest(engine_dir, manifest)
        engines += ["--diffexport-engine", engine_dir]
    result = run(pytester, *engines, "-k", "task")
    assert outcomes(result) == {"judged::onnxruntime::task": "PASSED", "misjudged::onnxruntime::task": "FAILED"}
    assert "task-level parity" in result.stdout.str() and "no_such_module" in result.stdout.str()
