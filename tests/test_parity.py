"""Parity harness: passing engines pass, a perturbed ONNX weight fails and is located, an error in
the prediction F that D hides fails, one reference serves every candidate and is cached by
content, the build stage marks engines, the CLI exits accordingly, ``diffexport.testing`` asserts.

Engines come from conftest.py (randomised weights): ``onnx_engine_dir`` (quickstart,
unconditional, onnx) and ``built_conditional`` (image + vector conditions, onnx and aoti).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffexport.cli import app
from diffexport.cli.build import finalize_stages
from diffexport.engines import read_manifest
from diffexport.parity import PRESETS, parity_stage, run_parity, tolerances
from diffexport.parity import harness
from diffexport.parity.harness import ParityRun, Plan, call_passed, reference_key
from diffexport.recipes import load_recipe
from diffexport.testing import assert_engine_parity

REPO = Path(__file__).resolve().parents[1]
WEIGHT = "preconditioner.model.model.dec.8x8_block0.conv0.weight"  # the one perturbed_onnx_engine changes


def check_passed(report: dict, backends: set[str]) -> None:
    assert report["passed"] and set(report["backends"]) == backends
    for e in report["backends"].values():
        assert e["passed"] and e["error"] is None and "divergence" not in e
        assert len(e["per_call"]) >= 8 and max(r["rel_l2"] for r in e["per_call"]) <= PRESETS["fp32"]["per_call_rtol"]
        assert max(r["f_rel_l2"] for r in e["per_call"]) <= PRESETS["fp32"]["per_call_f_rtol"]
        assert len(e["trajectory"]["steps"]) == report["settings"]["num_steps"]
        assert e["trajectory"]["final"]["rel_l2"] <= PRESETS["fp32"]["final_rtol"]


def test_unconditional_onnx_passes_and_writes_report(onnx_engine_dir, tmp_path):
    report = run_parity(onnx_engine_dir, report_dir=tmp_path)
    check_passed(report, {"onnxruntime"})
    sigmas = report["sigmas"]
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
    assert np.allclose(np.diff(np.log(sigmas)), np.log(sigmas[1] / sigmas[0]))  # log-spaced
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is True
    md = (tmp_path / "parity.md").read_text()
    assert "PASS" in md and "F rel L2" in md
    assert (tmp_path / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_conditional_onnx_and_aoti_pass(built_conditional):
    check_passed(assert_engine_parity(built_conditional, ["onnxruntime", "aoti"]), {"onnxruntime", "aoti"})


def test_seed_unet_ddim_engine_passes(built_seed_unet):
    """The DDPM epsilon U-Net behind DDPMPreconditioner, sampled with DDIM (alpha(t) != 1, float64 tables)."""
    check_passed(assert_engine_parity(built_seed_unet, "onnxruntime"), {"onnxruntime"})


@pytest.fixture(scope="module")
def perturbed(perturbed_onnx_engine):
    """A copy of the quickstart engine with one element of one conv weight changed in its ONNX."""
    return perturbed_onnx_engine[:2]


def downstream_of(model: onnx.ModelProto, value: str) -> set[str]:
    """Names of the nodes that (transitively) consume ``value``."""
    reached, names = {value}, set()
    for node in model.graph.node:  # topological order
        if reached & set(node.input):
            names.add(node.name)
            reached.update(node.output)
    return names


def test_perturbed_weight_fails_and_the_report_names_a_node_downstream(perturbed, tmp_path):
    engine_dir, model = perturbed
    with pytest.raises(AssertionError) as err:
        assert_engine_parity(engine_dir, "onnxruntime", report_dir=tmp_path)
    report = json.loads((tmp_path / "parity.json").read_text())
    d = report["backends"]["onnxruntime"]["divergence"]
    assert d["node"] in downstream_of(model, WEIGHT)
    assert d["node"] == next(n.name for n in model.graph.node if WEIGHT in n.input)  # the conv itself, here
    assert d["op_type"] == "Conv" and d["rel_l2"] > d["rtol"]
    assert d["node"] in str(err.value) and "per-call rel L2" in str(err.value)
    assert d["node"] in (tmp_path / "parity.md").read_text()


def test_parity_stage_and_cli_mark_failure(perturbed, onnx_engine_dir, tmp_path):
    engine_dir, _ = perturbed
    manifest = read_manifest(engine_dir)
    parity_stage(engine_dir, manifest)
    assert manifest["status"] == "failed" and manifest["parity"]["backends"]["onnxruntime"]["passed"] is False
    assert (engine_dir / "parity.json").is_file()
    runner = CliRunner()
    assert runner.invoke(app, ["parity", str(engine_dir), "--report", str(tmp_path / "bad")]).exit_code == 1
    ok = runner.invoke(app, ["parity", str(onnx_engine_dir), "--report", str(tmp_path / "good")])
    assert ok.exit_code == 0, ok.output


def engine_files(engine: Path) -> dict[str, bytes]:
    """Every file of an engine directory but the reference cache, by relative path."""
    return {str(p.relative_to(engine)): p.read_bytes() for p in engine.rglob("*") if p.is_file() and ".cache" not in p.relative_to(engine).parts}


def test_unmarked_parity_leaves_the_engine_directory_as_it_was(built_lead_time, tmp_path):
    """Without --mark a check writes its report only to --report (it rewrote the engine's parity.md
    as FAIL while the manifest said ok); a --report inside the engine or unwritable is refused first."""
    engine = shutil.copytree(built_lead_time, tmp_path / "engine")
    before, runner = engine_files(engine), CliRunner()
    r = runner.invoke(app, ["parity", str(engine), "--per-call-rtol", "1e-12"])
    assert r.exit_code == 1 and "FAIL" in r.output and "report: not written (--report DIR writes parity.json/.md/.png)" in r.output, r.output
    assert engine_files(engine) == before and read_manifest(engine)["status"] == "ok"
    r = runner.invoke(app, ["parity", str(engine), "--per-call-rtol", "1e-12", "--report", str(tmp_path / "rep")])
    assert r.exit_code == 1 and f"report: {tmp_path / 'rep' / 'parity.md'}" in r.output, r.output
    assert "FAIL" in (tmp_path / "rep" / "parity.md").read_text() and engine_files(engine) == before
    for report, why in ((engine, "is inside the engine directory"), (engine / "rep", "is inside the engine directory"),
                        (Path("/proc/rep"), "cannot create files in /proc")):
        r = runner.invoke(app, ["parity", str(engine), "--report", str(report)])
        assert r.exit_code == 1 and r.output.startswith(f"error: --report {report}: {why}") and r.output.count("\n") == 1, r.output
    assert engine_files(engine) == before


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root ignores permissions; setpriv is needed to run as nobody")
def test_read_only_engine_is_checked_uncached_and_mark_is_refused_before_any_work(built_lead_time):
    """An engine folder the user cannot write (root ignores permission bits: run as nobody): the check
    passes with a note that the reference is not cached (it computed everything, then failed with
    "Permission denied" writing the report); --mark is refused before any work, naming the folder."""
    folder = Path(tempfile.mkdtemp(prefix="diffexport-read-only-"))  # not under pytest's 0700 tmp: nobody reads it
    try:
        engine, home = folder / "engine", folder / "home"
        shutil.copytree(built_lead_time, engine, ignore=shutil.ignore_patterns(".cache"))
        home.mkdir(mode=0o777)
        folder.chmod(0o755)
        home.chmod(0o777)
        for p in [engine, *engine.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        before = engine_files(engine)
        as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"] if os.geteuid() == 0 else []

        def parity(*args: str) -> tuple[int, str]:
            done = subprocess.run([*as_nobody, sys.executable, "-c", "from diffexport.cli import main; main()", "parity", str(engine), *args],
                                  capture_output=True, text=True, cwd=home, timeout=600, env={**os.environ, "HOME": str(home)})
            return done.returncode, done.stdout + done.stderr

        code, output = parity("--report", str(home / "rep"))
        assert code == 0, output
        assert f"note: {engine / '.cache' / 'parity'}: cannot create files in {engine} (Permission denied); the torch reference is " \
               "computed, not cached" in output, output
        assert "PASS" in (home / "rep" / "parity.md").read_text()
        code, output = parity("--mark")
        assert (code, output.strip()) == (1, f"error: --mark: the engine directory {engine} cannot be updated: cannot create files in {engine} "
                                             "(Permission denied)"), output
        assert engine_files(engine) == before and not (engine / ".cache").exists()
    finally:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(folder)


def test_build_with_failing_parity_exits_nonzero_and_marks_failed(tmp_path, tiny_recipe_paths):
    data = yaml.safe_load(tiny_recipe_paths["quickstart"].read_text())
    data.update(parity={"per_call_rtol": 1e-12}, deploy={})  # fp32 engines differ by ~1e-7: must fail
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "engine"
    result = CliRunner().invoke(app, ["build", str(tmp_path / "strict.yaml"), "--out", str(out), "--targets", "onnx"])
    assert result.exit_code != 0 and "parity" in result.output
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and manifest["parity"]["passed"] is False
    assert (out / "parity.md").is_file() and "FAIL" in (out / "parity.md").read_text()


def test_build_runs_parity_unless_disabled(tiny_recipe_paths):
    recipe = load_recipe(tiny_recipe_paths["quickstart"])
    assert ("parity", parity_stage) in finalize_stages(recipe)
    off = recipe.model_copy(update={"parity": recipe.parity.model_copy(update={"enabled": False})})
    assert all(fn is not parity_stage for _, fn in finalize_stages(off))


def test_tolerances_presets_and_overrides():
    assert tolerances("fp32") == PRESETS["fp32"] and set(PRESETS["fp32"]) == {"per_call_rtol", "per_call_f_rtol", "final_rtol"}
    for key in PRESETS["fp32"]:
        assert tolerances("bf16")[key] > tolerances("fp16")[key] > tolerances("fp32")[key]
    assert tolerances("fp32", {"per_call_rtol": 1e-3, "final_rtol": None}) == {**PRESETS["fp32"], "per_call_rtol": 1e-3}
    assert tolerances("fp32", {"per_call_f_rtol": 0.5})["per_call_f_rtol"] == 0.5
    assert tolerances("fp16", {"final_rtol": 0.5}, final_rtol=0.25)["final_rtol"] == 0.25
    with pytest.raises(ValueError, match="int8"):
        tolerances("int8")


class _FError:
    """The reference with its prediction F scaled by ``1 + error`` where σ < ``below`` (D = c_skip x + c_out F)."""

    def __init__(self, reference, error: float, below: float):
        self.ref, self.error, self.below = reference, error, below
        self.backend, self.io, self.device = "onnxruntime", reference.io, reference.device

    def __call__(self, x, sigma, **conditions):
        d = self.ref(x, sigma, **conditions)
        s = sigma.reshape(-1, 1, 1, 1)
        _, _, c_out, c_skip = self.ref.denoiser.preconditioner.compute_coefficients(s)
        scale = torch.where(s < self.below, 1 + self.error, 1.0)
        return c_skip * x + c_out * scale * (d - c_skip * x) / c_out


def test_half_error_in_F_at_smallest_sigma_fails_fp16_preset(onnx_engine_dir, monkeypatch, tmp_path):
    """At σ = 0.002, c_skip ≈ 1: a 50 % error in F moves D by ~1e-3, inside fp16's D tolerance;
    the F gate catches it."""
    run = ParityRun(onnx_engine_dir, cache_dir=tmp_path, locate=False, **PRESETS["fp16"])
    monkeypatch.setattr(harness, "load_candidate", lambda d, b, dev=None: _FError(run.reference.engine("cpu"), 0.5, 0.004))
    entry = run.check("onnxruntime")
    smallest = entry["per_call"][-1]
    assert smallest["sigma"] == pytest.approx(0.002)
    assert smallest["rel_l2"] < PRESETS["fp16"]["per_call_rtol"]  # what used to be gated: passes
    assert smallest["f_rel_l2"] == pytest.approx(0.5, rel=1e-3) and not call_passed(smallest, entry["tolerances"])
    assert all(call_passed(r, entry["tolerances"]) for r in entry["per_call"][:-1])  # larger σ untouched
    assert entry["passed"] is False and entry["per_call_f_worst"]["sigma"] == pytest.approx(0.002)


def test_one_reference_for_all_candidates_cached_by_content(onnx_engine_dir, tmp_path, monkeypatch):
    calls = []
    real = harness.load_candidate
    monkeypatch.setattr(harness, "load_candidate", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    run = ParityRun(onnx_engine_dir, cache_dir=tmp_path)
    first = run.report(["onnxruntime", "onnxruntime"])  # a second candidate on the same artifact
    assert run.reference.computed == ["calls", "trajectory"] and calls == ["onnxruntime"]  # memoised per backend
    again = ParityRun(onnx_engine_dir, cache_dir=tmp_path)
    second = again.report(["onnxruntime"])
    assert again.reference.computed == [] and not again.reference.engines  # cache hit: no torch model built
    assert second["backends"]["onnxruntime"]["per_call"] == first["backends"]["onnxruntime"]["per_call"]
    manifest = read_manifest(onnx_engine_dir)
    plan = Plan.of(manifest)
    key = reference_key(manifest, plan, torch.device("cpu"))
    changed = {**manifest, "weights": {**manifest["weights"], "sha256": "0" * 64}}
    assert reference_key(changed, plan, torch.device("cpu")) != key
    assert reference_key(manifest, Plan.of(manifest, seed=1), torch.device("cpu")) != key


def test_mark_of_a_ranked_auto_engine_follows_the_build_rules():
    """``parity --mark`` on a ``targets: auto`` engine ranked without parity: ok when one backend passed, the
    fastest passing one becomes the default (the fastest overall failed), earlier results are kept."""
    manifest = {"recipe": {"export": {"targets": ["auto"]}}, "default_backend": "openvino",
                "parity": {"backends": {"aoti": {"passed": True}}},
                "ranking": {"order": ["openvino", "onnxruntime", "aoti"], "failed": []}}
    new = {"passed": False, "report": "parity.json", "backends": {"openvino": {"passed": False}, "onnxruntime": {"passed": True}}}
    fields = harness.marked(manifest, new)
    assert fields["status"] == "ok" and fields["default_backend"] == "onnxruntime"
    assert fields["ranking"]["failed"] == ["openvino"] and set(fields["parity"]["backends"]) == {"openvino", "onnxruntime", "aoti"}
    fixed = harness.marked({**manifest, "recipe": {"export": {"targets": ["onnx", "openvino"]}}}, new)
    assert fixed["status"] == "failed"  # explicit targets: every checked backend must pass, as in a build
