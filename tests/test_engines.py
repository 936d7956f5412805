"""Loading engines: parity with the torch reference, input checks, hash verification, backend errors.

Engines come from the session fixtures of ``conftest.py`` (tiny, randomised weights).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from diffexport.engines import EngineError, load, mark, read_manifest
from diffexport.engines.aoti import AOTIEngine
from diffexport.engines.manifest import MANIFEST, sha256_file, write_manifest
from diffexport.engines.tensorrt import TensorRTEngine
from diffexport.recipes import IOSpec

pytestmark = pytest.mark.slow
SIGMAS = (0.002, 0.05, 1.0, 80.0)  # one per sample; batch 4 = the fixtures' max
RTOL = 1e-5  # fp32, relative L2


def inputs(io: IOSpec, sigmas, seed: int = 0) -> dict[str, torch.Tensor]:
    """x = x0 + sigma n with x0 ~ N(0, 0.5²); conditions N(0, 1) (int64 ones in [0, 2))."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    out = {}
    for spec in io.inputs:
        shape = [len(sigmas), *spec.shape[1:]]
        if spec.kind == "sigma":
            out[spec.name] = sigma
        elif spec.kind == "x":
            out[spec.name] = 0.5 * torch.randn(shape, generator=g) + sigma.view(-1, 1, 1, 1) * torch.randn(shape, generator=g)
        elif spec.dtype == "int64":
            out[spec.name] = torch.randint(0, 2, shape, generator=g)
        else:
            out[spec.name] = torch.randn(shape, generator=g)
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [("built_quickstart", "onnxruntime"), ("built_conditional", "onnxruntime"), ("built_conditional", "aoti"),
         ("built_dhariwal", "onnxruntime"), ("built_seed_unet", "onnxruntime")]  # fmt: skip


@pytest.fixture(scope="module")
def references():
    """One torch reference engine per engine directory, reused by the tests of this module."""
    cache: dict[Path, object] = {}
    return lambda d: cache.setdefault(d, load(d, "torch"))


@pytest.mark.parametrize("fixture,backend", CASES)
def test_engine_matches_torch_reference(request, references, fixture: str, backend: str):
    engine_dir = request.getfixturevalue(fixture)
    engine, reference = load(engine_dir, backend), references(engine_dir)
    lo, hi = engine.io.batch["min"], engine.io.batch["max"]
    for sigmas in (SIGMAS, (2.5,) * lo, tuple(torch.logspace(-2.7, 1.9, hi).tolist())):  # several sigmas, min and max batch
        feed = inputs(engine.io, sigmas, seed=len(sigmas))
        got, want = engine(**feed), reference(**feed)
        assert got.shape == want.shape == feed["x"].shape and got.dtype == torch.float32
        assert rel_l2(got, want) <= RTOL, (sigmas, rel_l2(got, want))
    # the output depends on every input: not a vacuous c_skip * x
    feed = inputs(engine.io, SIGMAS)
    for name in feed:
        if name not in ("x", "sigma"):
            changed = {**feed, name: feed[name] + 1 if feed[name].is_floating_point() else 1 - feed[name]}
            assert rel_l2(engine(**changed), engine(**feed)) > 1e-3, name


def test_reference_is_not_trivial(built_quickstart, references):
    """Random weights: D(x) is far from both x and c_skip x at moderate sigma."""
    feed = inputs(references(built_quickstart).io, (1.0, 1.0))
    out = references(built_quickstart)(**feed)
    assert rel_l2(out, feed["x"]) > 0.1 and rel_l2(out, 0.2 * feed["x"]) > 0.1


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti", "torch"])
def test_bad_inputs_name_the_tensor(built_conditional, backend: str):
    engine = load(built_conditional, backend)
    good = inputs(engine.io, SIGMAS)
    bad = {
        "batch above max": ({k: torch.cat([v, v[:1]]) for k, v in good.items()}, "batch 5"),
        "wrong dtype": ({**good, "cond": good["cond"].double()}, "'cond' must be float32"),
        "wrong shape": ({**good, "class_labels": good["class_labels"][:, :3]}, "'class_labels' must have shape [4, 4]"),
        "wrong batch of a condition": ({**good, "cond": good["cond"][:2]}, "'cond' must have shape [4, 3, 16, 16]"),
        "missing input": ({k: v for k, v in good.items() if k != "class_labels"}, "missing ['class_labels']"),
        "unexpected input": ({**good, "labels": good["class_labels"]}, "unexpected ['labels']"),
        "sigma not 1-D": ({**good, "sigma": good["sigma"][:, None]}, "'sigma' must have shape [4]"),
    }
    for case, (feed, message) in bad.items():
        with pytest.raises(EngineError) as err:
            engine(**feed)
        assert message in str(err.value), (case, str(err.value))


def test_batch_below_min(tmp_path, built_quickstart):
    engine_dir = shutil.copytree(built_quickstart, tmp_path / "e")
    manifest = read_manifest(engine_dir)
    manifest["io"]["batch"]["min"] = 2  # the check reads the manifest's range
    manifest["recipe"]["inputs"]["batch"]["min"] = 2  # (io must follow from the recipe, or the manifest is refused)
    write_manifest(engine_dir, manifest)
    engine = load(engine_dir)
    with pytest.raises(EngineError, match=r"batch 1 of input 'x' is outside the engine's range \[2, 16\]"):
        engine(**inputs(engine.io, (1.0,)))


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("backend,file", [("onnxruntime", "denoiser.onnx"), ("aoti", "denoiser.pt2"), ("torch", "weights.pt")])
def test_corrupted_artifact_is_detected_on_load(tmp_path, built_conditional, backend: str, file: str, how: str):
    engine_dir = shutil.copytree(built_conditional, tmp_path / "e")
    _corrupt(engine_dir / file, how)
    with pytest.raises(EngineError, match=rf"{file}: sha256 does not match") as err:
        load(engine_dir, backend)
    assert str(engine_dir / file) in str(err.value)
    (engine_dir / file).unlink()
    with pytest.raises(EngineError, match=rf"{file}: file is missing"):
        load(engine_dir, backend)


def test_load_errors_name_what_is_wrong(tmp_path, built_quickstart):
    with pytest.raises(EngineError, match="unknown backend 'tflite'"):
        load(built_quickstart, "tflite")
    with pytest.raises(EngineError, match=r"no 'aoti' artifact in this engine \(built: onnx\)"):
        load(built_quickstart, "aoti")
    with pytest.raises(EngineError, match=f"{MANIFEST}: not found"):
        load(tmp_path, "onnxruntime")
    (tmp_path / MANIFEST).write_text('{"format": "something-else/3"}')
    with pytest.raises(EngineError, match="format is 'something-else/3'"):
        load(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(EngineError, match="cannot read manifest"):
        load(tmp_path)
    edited = read_manifest(built_quickstart)
    edited["io"]["inputs"][0]["shape"] = [-1, 4, 16, 16]
    (tmp_path / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(EngineError, match="field 'io' does not match the engine's recipe"):
        load(tmp_path)
    del edited["sampler"]
    (tmp_path / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(EngineError, match="field 'sampler' is missing"):
        load(tmp_path)
    rounded = read_manifest(built_quickstart)  # an EDM engine with iDDPM's rounding of churned noise levels
    rounded["sampler"]["round_sigma"] = {"class": "IDDPMPreconditioner", "args": {"C_1": 0.001, "C_2": 0.008, "M": 1000}}
    (tmp_path / MANIFEST).write_text(json.dumps(rounded))
    with pytest.raises(EngineError, match=r"field 'sampler.round_sigma' is \{'class': 'IDDPMPreconditioner'.*but the recipe's "
                                          r"preconditioner gives None; the manifest is damaged or edited"):
        load(tmp_path)


def test_aoti_package_runs_only_where_it_was_compiled(built_conditional):
    io = IOSpec.from_dict(read_manifest(built_conditional)["io"])
    with pytest.raises(EngineError, match="compiled for cpu, cannot run on cuda"):
        AOTIEngine(built_conditional / "denoiser.pt2", io, device="cuda", compiled_for="cpu")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_backend_names_the_missing_package(built_quickstart):
    io = IOSpec.from_dict(read_manifest(built_quickstart)["io"])
    with pytest.raises(EngineError, match="Python package 'tensorrt'"):
        TensorRTEngine(built_quickstart / "denoiser.plan", io)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="TensorRT is not installable here (NVIDIA's index only) and needs a CUDA GPU")
def test_tensorrt_plan_refuses_another_tensorrt_version(tmp_path, tiny_recipe_paths):
    from diffexport.engines import build_engine

    engine_dir = build_engine(tiny_recipe_paths["quickstart"], tmp_path / "e", ["tensorrt"]).engine_dir
    m = read_manifest(engine_dir)
    io, record = IOSpec.from_dict(m["io"]), m["artifacts"]["tensorrt"]
    TensorRTEngine(engine_dir / record["file"], io, compute_capability=record["compute_capability"], built_with=record["tensorrt"])
    with pytest.raises(EngineError, match="plan built with TensorRT 0.0.1, this is TensorRT"):
        TensorRTEngine(engine_dir / record["file"], io, built_with="0.0.1")


def test_mark_updates_status_and_parity_atomically(tmp_path, built_quickstart):
    engine_dir = shutil.copytree(built_quickstart, tmp_path / "e")
    before = read_manifest(engine_dir)
    after = mark(engine_dir, status="ok", parity={"max_rel_l2": 3e-7})
    assert after == read_manifest(engine_dir)
    assert after["status"] == "ok" and after["parity"] == {"max_rel_l2": 3e-7}
    assert {k: v for k, v in after.items() if k not in ("status", "parity")} == {k: v for k, v in before.items() if k not in ("status", "parity")}
    with pytest.raises(ValueError, match="status must be one of"):
        mark(engine_dir, status="great")
    assert [p.name for p in engine_dir.iterdir() if p.name.startswith(".") and p.name != ".cache"] == []  # no temp files left (.cache: parity's)
    assert sha256_file(engine_dir / "weights.pt") == after["weights"]["sha256"]


def test_index_range_is_in_the_io_and_older_manifests_get_it_from_the_recipe(tmp_path, built_lead_time):
    """An index input's io entry records its exclusive bound ``high`` (``lead_time_steps``; the model's
    default 9 when the recipe leaves it out). A manifest written before (no ``high``) loads, with the
    range taken from its recipe, and its engine refuses values outside it; an edited ``high`` is refused."""
    import inspect

    from diffexport.models import SongUNetPosLtEmbd
    from diffexport.recipes import io_spec, parse_recipe

    manifest = read_manifest(built_lead_time)
    recipe = {k: v for k, v in manifest["recipe"].items()}
    recipe["model"] = {**recipe["model"], "args": {k: v for k, v in recipe["model"]["args"].items() if k != "lead_time_steps"}}
    default = inspect.signature(SongUNetPosLtEmbd).parameters["lead_time_steps"].default
    assert io_spec(parse_recipe(recipe)).inputs[2].high == default == 9
    engine_dir = shutil.copytree(built_lead_time, tmp_path / "old")
    old = json.loads((engine_dir / MANIFEST).read_text())
    del old["io"]["inputs"][2]["high"]
    write_manifest(engine_dir, old)
    assert read_manifest(engine_dir)["io"] == manifest["io"]
    with pytest.raises(EngineError, match=r"input 'lead_time_label' holds 4 at row 0, outside its range \[0, 4\)"):
        load(engine_dir, "onnxruntime")(torch.zeros(1, 2, 16, 16), torch.ones(1), lead_time_label=torch.tensor([4]))
    old["io"]["inputs"][2]["high"] = 9
    write_manifest(engine_dir, old)
    with pytest.raises(EngineError, match="field 'io' does not match the engine's recipe"):
        read_manifest(engine_dir)
