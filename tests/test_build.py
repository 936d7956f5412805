"""``build_engine`` and ``diffexport build | inspect``: manifest contents, content key, atomicity.

Engines come from the session fixtures of ``conftest.py``; the few rebuilds here are ONNX-only.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffexport.cli import app
from diffexport.engines import EngineError, build_engine, mark, read_manifest
from diffexport.engines.manifest import sha256_file
from diffexport.export import TargetUnavailable
from diffexport.models import get_model_class
from diffexport.models.init import randomize_
from diffexport.parity import parity_stage
from diffexport.recipes import RecipeError, io_spec, load_recipe

pytestmark = pytest.mark.slow
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative names)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# --- the manifest -----------------------------------------------------------------------------


def test_manifest_follows_engine_format(built_conditional: Path):
    m = read_manifest(built_conditional)
    assert m["format"] == "diffexport-engine/1" and m["name"] == "tiny-conditional" and m["status"] == "ok"  # built with parity
    assert re.fullmatch(r"[0-9a-f]{64}", m["content_key"]) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["created"])
    recipe = load_recipe(built_conditional / "recipe.yaml")  # the resolved recipe, as built
    assert yaml.safe_load((built_conditional / "recipe.yaml").read_text()) == m["recipe"]
    assert m["io"] == io_spec(recipe).to_dict()
    assert [s["name"] for s in m["io"]["inputs"]] == ["x", "sigma", "cond", "class_labels"]

    s, n = m["sampler"], recipe.sampler.num_steps
    lo, hi, rho = 0.002, 80.0, 7.0
    edm = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)] + [0.0]
    assert len(s["time_steps"]) == len(s["sigmas"]) == len(s["alphas"]) == n + 1
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(s["sigmas"], edm)) and s["sigmas"][-1] == 0.0
    assert s["alphas"] == [1.0] * (n + 1) and s["solver"] == "heun" and s["patching"] is None

    assert set(m["artifacts"]) == {"onnx", "aoti"} and m["skipped"] == {}
    for target, art in m["artifacts"].items():
        path = built_conditional / art["file"]
        assert art["sha256"] == sha256_file(path) and art["bytes"] == sum((built_conditional / f).stat().st_size for f in art["files"])
        assert art["files"][art["file"]] == art["sha256"] and art["precision"] == "fp32"
    assert m["artifacts"]["aoti"]["device"] == "cpu" and m["artifacts"]["onnx"]["opset"] == recipe.export.opset
    assert m["weights"] == {"file": "weights.pt", "sha256": sha256_file(built_conditional / "weights.pt")}
    assert m["recipe_file"]["files"] == {"recipe.yaml": sha256_file(built_conditional / "recipe.yaml")}
    assert m["versions"]["torch"] == torch.__version__ and m["device"]["type"] == "cpu"
    assert set(m["stages"]) == {"load", "export", "export:onnx", "export:aoti", "parity"} and all(t > 0 for t in m["stages"].values())
    assert leftovers(built_conditional) == []


def test_weights_pt_is_the_seeded_models_state_dict(built_dhariwal: Path):
    recipe = load_recipe(built_dhariwal / "recipe.yaml")
    model = randomize_(get_model_class(recipe.model.class_name)(**recipe.model.args), recipe.model.init.seed)
    saved = torch.load(built_dhariwal / "weights.pt", weights_only=True)
    expected = model.state_dict()
    assert list(saved) == list(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


# --- content key, force, atomicity ------------------------------------------------------------


def test_second_build_is_a_noop(built_quickstart: Path, tiny_recipe_paths):
    before = snapshot(built_quickstart)
    stale = built_quickstart.with_name(f".{built_quickstart.name}.{2**22 + 1}.x.building")  # a dead process' leftover
    stale.mkdir()
    events = []
    result = build_engine(tiny_recipe_paths["quickstart"], built_quickstart, ["onnx"], progress=lambda *e: events.append(e[:2]),
                          finalize=[("parity", parity_stage)])
    assert not result.built and "up to date" in result.message
    assert events == [("recover", "skip"), ("load", "start"), ("load", "done"), ("build", "skip")]
    assert snapshot(built_quickstart) == before and leftovers(built_quickstart) == []


class Injected(Exception):
    pass


def _raise_at(stage: str, exc: BaseException):
    def progress(name: str, event: str, seconds: float, detail: str) -> None:
        if name == stage and event == "start":
            raise exc

    return progress


@pytest.mark.parametrize("change", ["damaged artifact", "recipe edited", "different finalize stages"])
def test_changes_are_not_a_noop_and_interrupts_keep_the_old_engine(tmp_path: Path, built_quickstart: Path, tiny_recipe_paths, change: str):
    """Each change makes the build go on to export, where an injected error (or Ctrl-C) stops it:
    the previous engine directory is left exactly as it was and no temporary directory remains."""
    engine_dir = shutil.copytree(built_quickstart, tmp_path / "quickstart")
    recipe, finalize = load_recipe(tiny_recipe_paths["quickstart"]), ()
    if change == "damaged artifact":
        (engine_dir / "denoiser.onnx").write_bytes(b"truncated")
    elif change == "recipe edited":
        recipe = recipe.model_copy(update={"sampler": recipe.sampler.model_copy(update={"num_steps": 7})})
    else:
        finalize = [("deploy:triton", lambda d, m: None)]
    before = snapshot(engine_dir)
    for exc in (Injected("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            build_engine(recipe, engine_dir, ["onnx"], progress=_raise_at("export", exc), finalize=finalize)
        assert snapshot(engine_dir) == before and leftovers(engine_dir) == []


def test_interrupt_inside_a_target_stage_keeps_the_old_engine(tmp_path: Path, built_quickstart: Path, tiny_recipe_paths):
    engine_dir = shutil.copytree(built_quickstart, tmp_path / "quickstart")
    before = snapshot(engine_dir)
    with pytest.raises(Injected):
        build_engine(tiny_recipe_paths["quickstart"], engine_dir, ["onnx"], force=True, progress=_raise_at("export:onnx", Injected()))
    assert snapshot(engine_dir) == before and leftovers(engine_dir) == []


def test_ctrl_c_while_the_aoti_worker_compiles_kills_it_and_keeps_the_old_engine(tmp_path: Path, built_quickstart: Path,
                                                                                 tiny_recipe_paths, monkeypatch):
    import diffexport.engines.build as build

    started = []

    class Recorded(build.AotiWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(build, "AotiWorker", Recorded)
    engine_dir = shutil.copytree(built_quickstart, tmp_path / "quickstart")
    before = snapshot(engine_dir)
    with pytest.raises(KeyboardInterrupt):  # ONNX is lowered while the worker compiles AOTI
        build_engine(tiny_recipe_paths["quickstart"], engine_dir, ["onnx", "aoti"], force=True,
                     progress=_raise_at("export:onnx", KeyboardInterrupt()))
    assert len(started) == 1 and all(p.returncode is not None for p in started[0].processes)
    assert snapshot(engine_dir) == before and leftovers(engine_dir) == []


def test_aoti_compiles_in_process_when_its_program_cannot_go_to_a_worker(tmp_path: Path, tiny_recipe_paths, monkeypatch):
    import diffexport.export.worker as worker

    def unsaveable(*args, **kwargs):
        raise TypeError("cannot serialise this program")

    monkeypatch.setattr(worker.torch.export, "save", unsaveable)
    events = []
    result = build_engine(tiny_recipe_paths["quickstart"], tmp_path / "e", ["onnx", "aoti"],
                          progress=lambda stage, event, seconds, detail: events.append((stage, event, detail)))
    assert set(result.manifest["artifacts"]) == {"onnx", "aoti"} and (tmp_path / "e" / "denoiser.pt2").is_file()
    assert [e for e in events if e[0] == "aoti-worker"] == [("aoti-worker", "skip",
            "AOTInductor compiles in this process: no worker process (TypeError: cannot serialise this program)")]
    assert ("export:aoti", "done", "denoiser.pt2") in events and leftovers(tmp_path / "e") == []


def test_force_rebuilds_skips_missing_tensorrt_and_runs_finalize(tmp_path: Path, built_quickstart: Path, tiny_recipe_paths):
    engine_dir = shutil.copytree(built_quickstart, tmp_path / "quickstart")
    old = read_manifest(engine_dir)
    seen = {}

    def note(tmp: Path, manifest: dict) -> None:  # edits the manifest in place
        seen["dir"], seen["files"] = tmp, sorted(p.name for p in tmp.iterdir())
        manifest["deploy"] = {"note": "in place"}

    def parity(tmp: Path, manifest: dict) -> None:  # rewrites manifest.json, as the parity stage does
        mark(tmp, status="ok", parity={"max_rel_l2": 1e-7})

    targets = ["onnx"] if HAS_TENSORRT else ["onnx", "tensorrt"]
    with pytest.warns(UserWarning, match="Python package 'tensorrt'") if not HAS_TENSORRT else nullcontext():
        result = build_engine(tiny_recipe_paths["quickstart"], engine_dir, targets, force=True, finalize=[note, ("parity", parity)])
    m = read_manifest(engine_dir)
    assert result.built and m == result.manifest and m["created"] >= old["created"]
    assert seen["dir"] != engine_dir and seen["files"] == ["denoiser.onnx", "manifest.json", "recipe.yaml", "weights.pt"]
    assert m["status"] == "ok" and m["parity"] == {"max_rel_l2": 1e-7} and m["deploy"] == {"note": "in place"}
    assert {"note", "parity"} <= set(m["stages"])
    assert m["content_key"] != old["content_key"]  # other targets and stages
    assert m["weights"] == old["weights"] and m["artifacts"]["onnx"]["sha256"] == sha256_file(engine_dir / "denoiser.onnx")
    if not HAS_TENSORRT:
        assert "tensorrt" in m["skipped"] and "'tensorrt'" in m["skipped"]["tensorrt"] and "tensorrt" not in m["artifacts"]
    assert leftovers(engine_dir) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_export_device_without_a_gpu_names_file_and_field(tmp_path: Path, tiny_recipe_paths):
    data = yaml.safe_load(tiny_recipe_paths["quickstart"].read_text())
    data["export"] = {"targets": ["aoti"], "device": "cuda"}  # the target compiled for export.device
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(EngineError, match=r"r\.yaml: export\.device: device cuda requested but CUDA is not available; .* export\.device: cpu"):
        build_engine(tmp_path / "r.yaml", tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT can be built here")
def test_tensorrt_as_only_target_fails_before_any_work(tmp_path: Path, tiny_recipe_paths):
    with pytest.raises(TargetUnavailable, match="Python package 'tensorrt'"):
        build_engine(tiny_recipe_paths["quickstart"], tmp_path / "e", ["tensorrt"])
    assert list(tmp_path.iterdir()) == []


def test_unbuildable_recipe_is_a_recipe_error_naming_the_file(tmp_path: Path, tiny_recipe_paths):
    """Valid schema, but the preconditioner rejects an argument: caught when building, before any export."""
    bad = tmp_path / "bad-args.yaml"
    bad.write_text(tiny_recipe_paths["quickstart"].read_text().replace("sigma_data: 0.5", "sigma_dat: 0.5"))
    with pytest.raises(RecipeError, match=r"bad-args.yaml: preconditioner.args: unknown argument\(s\) sigma_dat"):
        build_engine(bad, tmp_path / "e", ["onnx"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-args.yaml"]


def test_refuses_to_replace_a_folder_that_is_not_an_engine(tmp_path: Path, tiny_recipe_paths):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EngineError, match="is not an engine directory built by diffexport"):
        build_engine(tiny_recipe_paths["quickstart"], tmp_path, ["onnx"])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- the command line -------------------------------------------------------------------------

runner = CliRunner()


def test_cli_build_summary_noop_and_inspect(tmp_path: Path, built_quickstart: Path, tiny_recipe_paths):
    """The CLI adds the recipe's deploy.triton stage, so the fixture's engine (built without) is rebuilt."""
    engine_dir = shutil.copytree(built_quickstart, tmp_path / "quickstart")
    args = ["build", str(tiny_recipe_paths["quickstart"]), "--out", str(engine_dir), "--targets", "onnx", "--no-parity"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    for text in ("✓ load", "✓ export:onnx", "✓ deploy:triton", "weights.pt", "denoiser.onnx", "status unchecked", f"built {engine_dir}"):
        assert text in r.output, text
    assert r.stdout.strip().endswith(str(engine_dir))
    m = read_manifest(engine_dir)
    assert m["status"] == "unchecked" and m["recipe"]["parity"]["enabled"] is False
    assert "deploy:triton" in m["stages"] and (engine_dir / "triton").is_dir()

    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "up to date" in r.output and "export" not in r.output, r.output

    r = runner.invoke(app, ["inspect", str(engine_dir)])
    assert r.exit_code == 0, r.output
    for text in ("quickstart", "unchecked", "[B, 3, 16, 16]", "EDMNoiseScheduler", "heun x 18", "denoiser.onnx",
                 m["artifacts"]["onnx"]["sha256"][:12], "deploy:triton", "torch " + torch.__version__):  # fmt: skip
        assert text in r.stdout, text


def test_cli_errors_are_one_paragraph(tmp_path: Path, tiny_recipe_paths):
    broken = tmp_path / "broken.yaml"
    broken.write_text(tiny_recipe_paths["quickstart"].read_text().replace("num_steps: 18", "num_steps: -3"))
    r = runner.invoke(app, ["build", str(broken), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "error:" in r.output and "broken.yaml: sampler.num_steps" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "e").exists()

    for targets, message in (("onnx,tflite", "Input should be 'onnx', 'aoti', 'tensorrt', 'openvino' or 'auto' (got 'tflite')"),
                             (",", "give at least one target, or auto"), ("onnx,auto", "auto stands alone")):
        r = runner.invoke(app, ["build", str(tiny_recipe_paths["quickstart"]), "--targets", targets, "--out", str(tmp_path / "e")])
        assert r.exit_code == 1 and r.output.startswith(f"error: --targets {targets}: {message}"), r.output  # not the recipe file
        assert r.output.count("\n") == 1 and "quickstart.yaml" not in r.output, r.output

    (tmp_path / "file").write_text("")
    for out, message in ((Path("/proc/e"), "cannot create files in /proc"), (tmp_path / "file" / "e", f"{tmp_path / 'file'} is not a folder")):
        r = runner.invoke(app, ["build", str(tiny_recipe_paths["quickstart"]), "--out", str(out)])
        assert r.exit_code == 1 and r.output.startswith(f"error: --out {out}: {message}"), r.output  # not a temporary folder
        assert ".building" not in r.output and r.output.count("\n") == 1, r.output
    elsewhere = tmp_path / "elsewhere.yaml"  # the recipe's output, not --out
    elsewhere.write_text(tiny_recipe_paths["quickstart"].read_text() + "output: /proc/e\n")
    r = runner.invoke(app, ["build", str(elsewhere)])
    assert r.exit_code == 1 and r.output.startswith("error: /proc/e: cannot build the engine there: cannot create files in /proc"), r.output

    if not HAS_TENSORRT:
        r = runner.invoke(app, ["build", str(tiny_recipe_paths["quickstart"]), "--targets", "tensorrt", "--out", str(tmp_path / "e")])
        assert r.exit_code == 1 and "'tensorrt'" in r.output and "Traceback" not in r.output, r.output

    r = runner.invoke(app, ["inspect", str(tmp_path / "absent")])
    assert r.exit_code == 1 and "manifest.json: not found" in r.output


def test_cli_inspect_shows_conditions_and_every_artifact(built_conditional: Path):
    r = runner.invoke(app, ["inspect", str(built_conditional)])
    assert r.exit_code == 0, r.output
    m = read_manifest(built_conditional)
    for text in ("tiny-conditional", "cond", "[B, 3, 16, 16]", "class_labels", "[B, 4]", "denoiser.pt2", "device=cpu",
                 m["artifacts"]["aoti"]["sha256"][:12], m["weights"]["sha256"][:12], "export:aoti"):  # fmt: skip
        assert text in r.stdout, text


def test_cli_inspect_shows_the_parity_summary(tmp_path: Path, built_quickstart: Path):
    engine_dir = shutil.copytree(built_quickstart, tmp_path / "e")
    mark(engine_dir, status="failed", parity={"passed": False, "backends": {"onnxruntime": {"passed": False, "per_call_rel_l2": 3.25e-4}}})
    r = runner.invoke(app, ["inspect", str(engine_dir)])
    assert r.exit_code == 0, r.output
    for text in ("status failed", "parity passed False", "onnxruntime", "3.25e-04"):
        assert text in r.stdout, text


def test_auto_bf16_aoti_candidate_is_left_out_where_bf16_is_emulated(monkeypatch):
    """``precision: auto`` adds aoti-bf16 only on a CPU with native bf16 (AVX512-BF16 or AMX);
    an explicit bf16 target, fp32 candidates and CUDA builds are never left out."""
    from diffexport.engines.build import Candidate, emulated_bf16

    auto, explicit, fp32 = Candidate("aoti-bf16", "aoti", "bf16"), Candidate("aoti", "aoti", "bf16"), Candidate("aoti", "aoti", "fp32")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert "no native bf16" in emulated_bf16(auto, "cpu")
    assert emulated_bf16(explicit, "cpu") is None and emulated_bf16(fp32, "cpu") is None and emulated_bf16(auto, "cuda") is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert emulated_bf16(auto, "cpu") is None


def test_cli_inspect_shows_an_index_conditions_range(built_lead_time: Path):
    r = runner.invoke(app, ["inspect", str(built_lead_time)])
    assert r.exit_code == 0, r.output
    assert "lead_time_label" in r.stdout and "index in [0, 4)" in r.stdout, r.stdout
