"""The OpenVINO backend, ``targets: auto`` ranking and ``diffexport bench``'s fields.

One tiny engine (SongUNet 16x16, randomised weights, 6 Heun steps) is built once with
``targets: auto, precision: auto`` restricted to ONNX + OpenVINO (AOTInductor compiles take
minutes on CI's 2 cores): artifacts onnx, openvino (f32 hint), openvino-bf16 (bf16 hint), then
the parity and rank stages as ``diffexport build`` runs them. No timing is asserted.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

import diffexport.engines.build as build_module
from diffexport.cli import app
from diffexport.cli.build import ranking
from diffexport.engines import EngineError, build_engine, load, read_manifest
from diffexport.engines.manifest import sha256_file, write_manifest
from diffexport.engines.openvino import OpenVINOEngine
from diffexport.parity import parity_stage
from diffexport.recipes import IOSpec
from diffexport.runtime.bench import bench_engine, rank_stage

openvino = pytest.importorskip("openvino", reason="the openvino package is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")
from diffexport.export.openvino import precision_unavailable  # noqa: E402

NO_BF16 = precision_unavailable("bf16")  # a CPU without native bf16: no openvino-bf16 candidate
OPENVINO = ["openvino"] + ([] if NO_BF16 else ["openvino-bf16"])  # the OpenVINO candidates built here
needs_bf16 = pytest.mark.skipif(NO_BF16 is not None, reason=f"this CPU: {NO_BF16}")
TINY = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8], dropout=0.0)
RECIPE = {
    "name": "tiny-openvino",
    "model": {"class": "SongUNet", "init": {"seed": 5}, "args": TINY},
    "preconditioner": {"class": "EDMPreconditioner", "args": {"sigma_data": 0.5}},
    "inputs": {"batch": {"min": 1, "opt": 2, "max": 4}},
    "sampler": {"scheduler": {"class": "EDMNoiseScheduler", "args": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}}, "num_steps": 6},
    "export": {"targets": "auto", "precision": "auto"},
}
SIGMAS = torch.tensor([0.002, 0.3, 2.0, 80.0])


@pytest.fixture(scope="module")
def auto_engine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("openvino")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_module, "AUTO_TARGETS", ("onnx", "openvino"))
        result = build_engine(folder / "recipe.yaml", folder / "engine", finalize=[("parity", parity_stage), ("rank", rank_stage)])
    return result.engine_dir


def _call(engine_dir: Path, backend: str, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    sigma = SIGMAS[:batch] if batch <= len(SIGMAS) else torch.full((batch,), 1.0)
    x = 0.5 * torch.randn(batch, 3, 16, 16, generator=g) + sigma.view(-1, 1, 1, 1) * torch.randn(batch, 3, 16, 16, generator=g)
    return load(engine_dir, backend)(x, sigma), load(engine_dir, "torch")(x, sigma)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_artifacts_are_the_candidates(auto_engine):
    m = read_manifest(auto_engine)
    assert list(m["artifacts"]) == ["onnx", *OPENVINO], m["skipped"]
    assert all(m["artifacts"][key]["device"] == "cpu" for key in OPENVINO)  # where the blobs run, whatever export.device is
    if NO_BF16:  # skipped with the reason, never an f32 blob recorded as bf16
        assert m["skipped"]["openvino-bf16"] == NO_BF16
        return
    for key, hint in (("openvino", "f32"), ("openvino-bf16", "bf16")):
        art = m["artifacts"][key]
        assert art["config"]["INFERENCE_PRECISION_HINT"] == hint and art["source"] == "denoiser.onnx"
        ir = art["file"].replace(".blob", ".xml"), art["weights"]
        assert art["weights"] == "denoiser.openvino.bin"  # the same weights for both precisions, kept once
        assert set(art["static"]) == {"1", "2", "4"} and set(art["static"].values()) | {art["file"], *ir} == set(art["files"])
        assert art["sha256"] == sha256_file(auto_engine / art["file"]) and art["openvino"] == openvino.get_version()
        weightless = {"ENABLE_WEIGHTLESS": True, "WEIGHTS_PATH": str(auto_engine / art["weights"])}
        for blob in [art["file"], *art["static"].values()]:  # compiled with that precision (the CPU plugin may fall back silently)
            data = (auto_engine / blob).read_bytes()
            assert len(data) < (auto_engine / art["weights"]).stat().st_size, "the blob holds the weights"
            with pytest.raises(RuntimeError):  # weightless: OpenVINO cannot import it without its weights file
                openvino.Core().import_model(data, "CPU", art["config"])
            compiled = openvino.Core().import_model(data, "CPU", {**art["config"], **weightless})
            assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == hint
    assert m["artifacts"]["openvino"]["file"] != m["artifacts"]["openvino-bf16"]["file"]


@pytest.mark.parametrize("backend,rtol", [("openvino", 1e-5), pytest.param("openvino-bf16", 2e-2, marks=needs_bf16)])
def test_openvino_matches_torch_reference(auto_engine, backend: str, rtol: float):
    for batch in (1, 3, 4):  # static blobs for min and max, the dynamic one for 3
        got, want = _call(auto_engine, backend, batch)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert rel_l2(got, want) <= rtol, (backend, batch, rel_l2(got, want))
    if backend.endswith("bf16"):  # the hint took effect: bf16 differs from fp32 well beyond reduction order
        assert rel_l2(*_call(auto_engine, backend)) > 1e-4


def test_parity_stage_checks_openvino(auto_engine):
    backends = read_manifest(auto_engine)["parity"]["backends"]
    assert {"onnxruntime", *OPENVINO} <= set(backends)
    if not NO_BF16:
        assert backends["openvino-bf16"]["precision"] == "bf16" and backends["openvino-bf16"]["tolerances"]["per_call_rtol"] == 2e-2
    assert all(b["passed"] for b in backends.values()), backends


def test_batch_outside_range_is_refused(auto_engine):
    engine = load(auto_engine, "openvino")
    with pytest.raises(EngineError, match="outside the engine's range"):
        engine(torch.zeros(5, 3, 16, 16), torch.ones(5))


def test_blob_that_cannot_be_imported_falls_back_to_the_onnx(tmp_path, auto_engine):
    engine_dir = shutil.copytree(auto_engine, tmp_path / "e")
    m = read_manifest(engine_dir)
    art = m["artifacts"]["openvino"]
    (engine_dir / art["file"]).write_bytes(b"not a blob")
    art["sha256"] = art["files"][art["file"]] = sha256_file(engine_dir / art["file"])
    write_manifest(engine_dir, m)
    got, want = _call(engine_dir, "openvino")
    assert rel_l2(got, want) <= 1e-5
    onnx_file = engine_dir / m["artifacts"]["onnx"]["file"]
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")  # the source the fallback would compile is checked too
    with pytest.raises(EngineError, match=r"denoiser\.onnx: sha256 does not match manifest\.json"):
        load(engine_dir, "openvino")
    art["source"] = None
    write_manifest(engine_dir, m)
    with pytest.raises(EngineError, match="cannot import this blob"):
        load(engine_dir, "openvino")


def test_weightless_blobs_need_their_weights_file(tmp_path, auto_engine):
    """The blobs hold no weights: a missing or altered ``.bin`` is refused, naming it, before OpenVINO
    would import a blob against it."""
    engine_dir = shutil.copytree(auto_engine, tmp_path / "e")
    weights = engine_dir / read_manifest(engine_dir)["artifacts"]["openvino"]["weights"]
    data = weights.read_bytes()
    weights.write_bytes(data[:-4] + bytes(4))
    with pytest.raises(EngineError, match=rf"{weights.name}.*sha256"):
        load(engine_dir, "openvino")
    weights.unlink()
    with pytest.raises(EngineError, match=rf"{weights.name}"):
        load(engine_dir, "openvino")


def test_weights_of_another_model_are_not_shared(tmp_path, built_quickstart, perturbed_onnx_engine):
    """Where the shared weights file holds another model's weights, the artifact writes its own and
    every artifact still computes with its own weights."""
    from diffexport.export.openvino import export_openvino

    io = IOSpec.from_dict(read_manifest(built_quickstart)["io"])
    shared = tmp_path / "denoiser.openvino.bin"
    export = lambda onnx, name: export_openvino(onnx, io, tmp_path / name, batches=[], weights=shared)  # noqa: E731
    first = export(built_quickstart / "denoiser.onnx", "denoiser.openvino.blob")
    again = export(built_quickstart / "denoiser.onnx", "again.openvino.blob")
    other = export(perturbed_onnx_engine[0] / "denoiser.onnx", "other.openvino.blob")
    assert first["weights"] == again["weights"] == shared.name and other["weights"] == "other.openvino.bin"
    assert not (tmp_path / "again.openvino.bin").exists() and (tmp_path / "again.openvino.xml").is_file()
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    outs = [OpenVINOEngine(tmp_path / r["file"], io, r)(x, sigma) for r in (first, again, other)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_engine_module_does_not_import_the_exporter():
    source = Path(__file__).parents[1] / "diffexport" / "engines" / "openvino.py"
    imported = {n.module for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and (m.startswith(("diffexport.export", "torch.onnx", "onnx")))}, imported


def test_ranking_makes_the_fastest_verified_backend_the_default(auto_engine):
    m = read_manifest(auto_engine)
    r = m["ranking"]
    assert sorted(r["order"]) == ["onnxruntime", *OPENVINO] and r["failed"] == []
    scores = [r["candidates"][b]["score"] for b in r["order"]]
    assert m["default_backend"] == r["order"][0] and scores == sorted(scores) and scores[0] >= 1.0
    assert all(set(c["call_ms"]) == {"2", "4"} for c in r["candidates"].values())  # batch opt and max
    assert load(auto_engine).backend == m["default_backend"].removesuffix("-bf16")
    out = CliRunner().invoke(app, ["inspect", str(auto_engine)], terminal_width=200)
    assert out.exit_code == 0 and "ranking" in out.output and f"{m['default_backend']} (default)" in out.output, out.output
    assert "others_cpus" in r and ("ranking warning" in out.output) == bool(r.get("warning")), out.output
    console = Console(record=True, width=200)
    ranking(console, {**r, "warning": "the machine is busy (1.90 CPUs of other processes)"}, m["default_backend"])
    assert "ranking warning: the machine is busy" in console.export_text()
    narrow = Console(record=True, width=80)  # a terminal's width: the longest backend name stays on one line
    ranking(narrow, {**r, "order": ["openvino-bf16", *[b for b in r["order"] if b != "openvino-bf16"]],
                     "candidates": {**r["candidates"], "openvino-bf16": r["candidates"][r["order"][0]]}}, "openvino-bf16")
    assert "openvino-bf16 (default)" in narrow.export_text(), narrow.export_text()


def test_rank_stage_leaves_out_failed_candidates(tmp_path, auto_engine):
    engine_dir = shutil.copytree(auto_engine, tmp_path / "e")
    m = read_manifest(engine_dir)
    m["status"] = "failed"
    m["parity"]["backends"]["onnxruntime"]["passed"] = False
    write_manifest(engine_dir, m)
    rank_stage(engine_dir, m)
    assert m["ranking"]["failed"] == ["onnxruntime"] and "onnxruntime" not in m["ranking"]["order"]
    assert m["default_backend"] in ("openvino", "openvino-bf16") and m["status"] == "ok"
    m["parity"]["backends"] = {k: {**v, "passed": False} for k, v in m["parity"]["backends"].items()}
    m.pop("default_backend")
    m["status"] = "failed"
    rank_stage(engine_dir, m)
    assert "default_backend" not in m and "order" not in m["ranking"] and len(m["ranking"]["failed"]) == 1 + len(OPENVINO) and m["status"] == "failed"


def test_bench_reports_ratio_peak_and_loop_overhead(tmp_path, auto_engine):
    path = tmp_path / "bench.json"
    out = CliRunner().invoke(app, ["bench", str(auto_engine), "--repeats", "1", "--warmup", "0",  # default batches 1 and 8
                                   *[a for b in OPENVINO for a in ("-b", b)], "--json", str(path)], terminal_width=240)
    assert out.exit_code == 0, out.output
    result = json.loads(path.read_text())
    assert {"load_average", "cores", "warning", "peak_gflops", "omp_wait_policy", "pause_s", "others_cpus", "steal_cpus"} <= set(result)
    assert set(result["peak_gflops"]) == {"fp32", "bf16"} and all(v > 0 for v in result["peak_gflops"].values())
    rows = result["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [(b, n) for n in (1, 4) for b in ("torch", *OPENVINO)]
    for r in rows:  # batch 8 is clamped to the engine's max, 4
        assert {"precision", "call_ms", "call_vs_torch", "gflops", "pct_peak", "sample_s", "sample_vs_torch", "nfe", "loop_overhead",
                "sampler_only_s"} <= set(r)
        assert r["nfe"] == 11 and r["pct_peak"] > 0 and r["loop_overhead"] < 1 and 0 < r["sampler_only_s"] < r["sample_s"]
    assert [r["precision"] for r in rows[:1 + len(OPENVINO)]] == ["fp32", "fp32", "bf16"][:1 + len(OPENVINO)] and rows[0]["call_vs_torch"] == 1.0
    text = " ".join(out.output.split())  # the table title wraps
    assert "peak GFLOP/s fp32" in text and "meanwhile other processes" in text and "loop: share" in text


@pytest.mark.parametrize("winner,hint", [("openvino", None), pytest.param("openvino-bf16", "YES", marks=needs_bf16), ("onnxruntime", None)])
def test_full_triton_repository_serves_the_ranked_openvino_engine(tmp_path, auto_engine, winner, hint):
    """When the ranking's winner is an OpenVINO candidate, the full ``triton/`` repository's denoiser
    is Triton's OpenVINO backend on the engine's ONNX (byte for byte), with the bf16 hint for the bf16
    candidate; otherwise ONNX Runtime. (Parsed only: this Triton has only the Python backend.)"""
    from diffexport.deploy.triton import model_names, write_repository
    from diffexport.deploy.triton.config import parse_pbtxt

    engine = shutil.copytree(auto_engine, tmp_path / "engine")
    m = read_manifest(engine)
    m["default_backend"] = winner
    write_manifest(engine, m)
    repo = write_repository(engine)
    denoiser, _ = model_names(m["name"])
    cfg = parse_pbtxt((repo / denoiser / "config.pbtxt").read_text())
    served = repo / denoiser / "1" / "model.onnx"
    assert sha256_file(served) == m["artifacts"]["onnx"]["sha256"]
    if winner == "onnxruntime":
        assert cfg.platform == "onnxruntime_onnx" and not cfg.backend
        return
    assert cfg.backend == "openvino" and not cfg.platform and cfg.default_model_filename == "model.onnx"
    assert (cfg.parameters["HINT_BF16"].string_value if "HINT_BF16" in cfg.parameters else None) == hint
    assert cfg.max_batch_size == m["io"]["batch"]["max"] and [t.name for t in cfg.input] == [s["name"] for s in m["io"]["inputs"]]


def test_openvino_without_the_engines_onnx_gets_only_the_self_contained_repository(tmp_path, auto_engine):
    """An OpenVINO artifact compiled from a temporary ONNX (no onnx target) has nothing for Triton's
    OpenVINO backend to read: the build's Triton stage writes ``triton-python/`` only."""
    from diffexport.deploy.triton import native_target, triton_stage

    engine = shutil.copytree(auto_engine, tmp_path / "engine")
    m = read_manifest(engine)
    del m["artifacts"]["onnx"]
    m["artifacts"]["openvino"]["source"] = None
    m["default_backend"] = "openvino"
    with pytest.raises(EngineError, match="needs a tensorrt or onnx artifact"):
        native_target(m)
    assert [p.name for p in triton_stage(engine, m)] == ["triton-python"]


def test_static_blob_whose_input_port_has_merged_names(tmp_path, tiny_recipe_paths):
    """The DDPM U-Net's static-batch blobs name input ``x`` also ``mul_247`` (the CPU plugin merged a
    folded op's name into it): the engine matches the manifest's names among each port's names."""
    from diffexport.export.denoiser import example_inputs
    from diffexport.recipes import IOSpec

    result = build_engine(tiny_recipe_paths["seed_unet"], tmp_path / "e", ["openvino"], finalize=[("parity", parity_stage)])
    assert result.manifest["status"] == "ok", (tmp_path / "e" / "parity.md").read_text()
    io = IOSpec.from_dict(result.manifest["io"])
    for batch in sorted({1, *map(int, result.manifest["artifacts"]["openvino"]["static"])}):
        x, sigma = example_inputs(io, batch, seed=batch)
        assert rel_l2(load(result.engine_dir, "openvino")(x, sigma), load(result.engine_dir, "torch")(x, sigma)) <= 1e-5
