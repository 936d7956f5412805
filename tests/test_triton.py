"""Triton deployment: generated repositories, and one real ``tritonserver`` (started by
``diffexport serve``) answering HTTP and gRPC clients on a tiny ONNX engine."""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from diffexport.deploy.triton import (
    TritonError,
    TritonServer,
    available_backends,
    model_names,
    python_only_reason,
    repository_dir,
    triton_home,
    triton_stage,
    write_repository,
)
from diffexport.deploy.triton.backend import BLSEngine
from typer.testing import CliRunner

from diffexport.cli import app
from diffexport.cli.serve import parse_gpus
import diffexport.deploy.triton as triton_package
from diffexport.deploy.triton.backend import SamplerRequest, batched_runs, sample_together
from diffexport.deploy.triton.repository import verify_repository
from diffexport.engines.verdict import ALLOW_FLAG, UnverifiedEngine, refusal
from diffexport.deploy.triton.config import Instances, denoiser_config, sampler_config, to_pbtxt
from diffexport.deploy.triton.server import free_ports
from diffexport.engines import load
from diffexport.engines.manifest import mark, read_manifest, write_manifest
from diffexport.recipes import IOSpec, TensorSpec
from diffexport.runtime.sampler import sample

pytestmark = pytest.mark.triton
tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (the [triton] extra)")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (the [triton] extra)")
from google.protobuf import text_format  # noqa: E402  (a tritonclient[grpc] dependency)
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

RTOL = 1e-4  # fp32 trajectory tolerance (relative L2)


def _has_tritonserver() -> bool:
    try:
        triton_home()
        return True
    except TritonError:
        return False


needs_server = pytest.mark.skipif(not _has_tritonserver(), reason="tritonserver binary not found (nvidia-pytriton, the [triton] extra)")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def engine(tmp_path_factory, onnx_engine_dir) -> Path:
    """A private copy of the shared tiny ONNX engine, moved after its repositories were written:
    the server then proves that the repositories' paths survive a rename."""
    built = tmp_path_factory.mktemp("triton") / "built"
    shutil.copytree(onnx_engine_dir, built, ignore=shutil.ignore_patterns("triton", "triton-python"))
    m = read_manifest(built)
    triton_stage(built, m)  # as the build's deploy:triton stage: the repositories, hashed into the manifest
    write_manifest(built, m)
    moved = built.with_name("moved")
    built.rename(moved)
    return moved


@pytest.fixture(scope="module")
def manifest(engine: Path) -> dict:
    return read_manifest(engine)


@pytest.fixture(scope="module")
def reference(engine: Path, manifest: dict):
    """``latents -> samples`` of the Python runtime sampler on the same engine (ONNX Runtime)."""
    ort = load(engine, "onnxruntime")
    return lambda latents: sample(ort, manifest["sampler"], latents=torch.from_numpy(latents)).numpy()


def latents_for(manifest: dict, batch: int, seed: int) -> np.ndarray:
    _, c, h, w = manifest["io"]["inputs"][0]["shape"]
    return (np.random.default_rng(seed).standard_normal((batch, c, h, w)) * manifest["sampler"]["sigmas"][0]).astype(np.float32)


def _start_serve(engine: Path, *extra: str, tag: str = "serve") -> dict:
    http, grpc, metrics = free_ports(3)
    log = engine.parent / f"{tag}.log"
    cmd = [str(Path(sys.executable).parent / "diffexport"), "serve", str(engine), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log-file", str(log), *extra]
    out = engine.parent / f"{tag}.out"
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "ready; Ctrl-C to stop" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"diffexport serve did not become ready:\n{out.read_text()}\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.5)
    return {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "proc": proc, "out": out, "engine": engine, "log": log}


def _stop_serve(running: dict) -> int | None:
    proc = running["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(60)
    return proc.returncode


@pytest.fixture(scope="module")
def server(engine: Path, tmp_path_factory):
    """``diffexport serve ENGINE --instances 2`` (2 CPU instances of each model, the repository
    rewritten and re-hashed) on free loopback ports: the one ``serve`` of this module."""
    if not _has_tritonserver():
        pytest.skip("tritonserver binary not found (nvidia-pytriton, the [triton] extra)")
    served = tmp_path_factory.mktemp("served") / "engine"
    shutil.copytree(engine, served)
    running = _start_serve(served, "--instances", "2")
    yield running
    _stop_serve(running)


def infer(protocol: str, url: str, model: str, inputs: dict[str, np.ndarray], output: str, parameters: dict | None = None) -> np.ndarray:
    client_mod = tritonclient_http if protocol == "http" else tritonclient_grpc
    client = client_mod.InferenceServerClient(url)
    tensors = []
    for name, a in inputs.items():
        t = client_mod.InferInput(name, list(a.shape), {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64"}[a.dtype])
        t.set_data_from_numpy(a)
        tensors.append(t)
    try:
        return client.infer(model, tensors, parameters=parameters).as_numpy(output)
    finally:
        client.close()  # an open keep-alive connection would hold up the server's shutdown


# --- repositories ----------------------------------------------------------------------------


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


DTYPE = {"float32": model_config_pb2.TYPE_FP32, "int64": model_config_pb2.TYPE_INT64}


@pytest.mark.parametrize("python_only", [False, True])
def test_configs_parse_and_match_manifest(engine: Path, manifest: dict, python_only: bool):
    repo, io = repository_dir(engine, python_only), manifest["io"]
    denoiser, sampler = model_names(manifest["name"])
    assert sorted(p.name for p in repo.iterdir()) == sorted([denoiser, sampler])
    d = parse((repo / denoiser / "config.pbtxt").read_text())
    assert d.name == denoiser and d.max_batch_size == io["batch"]["max"] and d.HasField("dynamic_batching")
    assert d.dynamic_batching.max_queue_delay_microseconds == 0  # BLS steps are batched without waiting
    if python_only:
        assert d.backend == "python" and (repo / denoiser / "1" / "model.py").is_file()
    else:
        assert d.platform == "onnxruntime_onnx"
        onnx = manifest["artifacts"]["onnx"]
        for name, sha in onnx["files"].items():  # model.onnx + external data, byte for byte
            copied = repo / denoiser / "1" / ("model.onnx" if name == onnx["file"] else name)
            assert hashlib.sha256(copied.read_bytes()).hexdigest() == sha
    assert [(t.name, t.data_type) for t in d.input] == [(spec["name"], DTYPE[spec["dtype"]]) for spec in io["inputs"]]
    for t, spec in zip([*d.input, *d.output], [*io["inputs"], *io["outputs"]]):
        want = spec["shape"][1:] or [1]  # batch dim dropped; [B] travels as [B, 1] reshaped to [B]
        assert list(t.dims) == want and (t.HasField("reshape") == (spec["shape"] == [-1]))
    assert [t.name for t in d.output] == ["denoised"]
    count = manifest["recipe"]["deploy"]["triton_instances"]
    assert [(g.count, g.kind) for g in d.instance_group] == [(count, model_config_pb2.ModelInstanceGroup.KIND_CPU)]

    s = parse((repo / sampler / "config.pbtxt").read_text())
    assert s.backend == "python" and s.parameters["denoiser_model"].string_value == denoiser
    assert s.max_batch_size == io["batch"]["max"]  # concurrent requests are batched, capped at the engine's max
    assert list(s.dynamic_batching.preferred_batch_size) == sorted({io["batch"]["opt"], io["batch"]["max"]})
    assert s.dynamic_batching.max_queue_delay_microseconds == round(1000 * manifest["recipe"]["deploy"]["triton_queue_delay_ms"]) > 0
    assert s.parameters["engine_dir"].string_value == "../.." and s.parameters["allow_unverified"].string_value == "false"
    x = io["inputs"][0]["shape"][1:]
    assert [(t.name, list(t.dims), t.optional) for t in s.input] == (
        [("latents", x, False)] + [(c["name"], c["shape"][1:], False) for c in io["inputs"][2:]] + [("seed", [1], True)])
    assert [(t.name, list(t.dims)) for t in s.output] == [("samples", x)]
    recorded = manifest["hashes"][repo.name]["files"]  # every file the server loads or executes is hashed
    assert sorted(recorded) == sorted(p.relative_to(engine).as_posix() for p in repo.rglob("*") if p.is_file())


def test_queue_delay_follows_the_recipe_and_the_flag(engine, tmp_path):
    """``deploy.triton_queue_delay_ms`` sets the sampler's wait; ``queue_delay_ms=`` (serve's
    ``--queue-delay-ms``) overrides it; the denoiser never waits."""
    engine = shutil.copytree(engine, tmp_path / "engine")

    def delays(**kw):
        repo = write_repository(engine, python_only=True, **kw)
        return [parse((repo / m / "config.pbtxt").read_text()).dynamic_batching.max_queue_delay_microseconds for m in model_names(read_manifest(engine)["name"])]

    assert delays() == [0, 20_000]
    assert delays(queue_delay_ms=3.5) == [0, 3_500]
    manifest = read_manifest(engine)
    manifest["recipe"]["deploy"]["triton_queue_delay_ms"] = 0.25
    write_manifest(engine, manifest)
    assert delays() == [0, 250]


def test_pbtxt_is_tritons_own_message():
    """Configs are ``model_config_pb2.ModelConfig`` messages; the text round-trips, quoting included."""
    io = IOSpec([TensorSpec("x", [-1, 2, 8, 8], kind="x"), TensorSpec("sigma", [-1], kind="sigma")],
                [TensorSpec("denoised", [-1, 2, 8, 8], kind="denoised")], {"max": 4})
    cfg = denoiser_config('a"b\\', io, parameters={"k": 'v"w'})
    assert isinstance(cfg, model_config_pb2.ModelConfig)
    back = parse(to_pbtxt(cfg))
    assert back == cfg and back.name == 'a"b\\' and back.parameters["k"].string_value == 'v"w'


def test_condition_inputs_and_instance_groups_in_configs():
    """Conditions of every kind (none in the served engine) keep their dims; index [B] travels as [B, 1];
    ``--instances``/``--gpus`` become instance groups."""
    io = IOSpec([TensorSpec("x", [-1, 2, 8, 8], kind="x"), TensorSpec("sigma", [-1], kind="sigma"),
                 TensorSpec("img", [-1, 3, 8, 8], kind="image"), TensorSpec("labels", [-1, 4], kind="vector"),
                 TensorSpec("lead", [-1], "int64", "index")], [TensorSpec("denoised", [-1, 2, 8, 8], kind="denoised")], {"max": 4})
    d = parse(to_pbtxt(denoiser_config("m_denoiser", io, platform="tensorrt_plan", instances=Instances(2, (0, 1)))))
    assert [(t.name, list(t.dims), list(t.reshape.shape) if t.HasField("reshape") else None) for t in d.input] == [
        ("x", [2, 8, 8], None), ("sigma", [1], []), ("img", [3, 8, 8], None), ("labels", [4], None), ("lead", [1], [])]
    assert d.input[4].data_type == model_config_pb2.TYPE_INT64 and d.platform == "tensorrt_plan"
    assert [(g.count, g.kind, list(g.gpus)) for g in d.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_GPU, [0, 1])]
    s = parse(to_pbtxt(sampler_config("m_sampler", io, instances=Instances(3, (0, 1)))))
    assert [(t.name, list(t.dims)) for t in s.input] == [("latents", [2, 8, 8]), ("img", [3, 8, 8]), ("labels", [4]),
                                                          ("lead", [1]), ("seed", [1])]
    assert [(g.count, g.kind) for g in s.instance_group] == [(3, model_config_pb2.ModelInstanceGroup.KIND_CPU)]  # BLS loop: CPU
    assert not parse(to_pbtxt(sampler_config("m", io, batching=False))).HasField("dynamic_batching")
    with pytest.raises(ValueError, match="--instances"):
        Instances(0)
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus("0,x")


def test_bls_engine_request_shapes():
    """``BLSEngine`` sends per-sample scalars as [B, 1] and returns the denoiser's output."""
    sent = {}

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class Response:
        def has_error(self):
            return False

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            sent.update(model=model_name, outputs=requested_output_names, inputs={t.name: t.array for t in inputs})

        def exec(self):
            return Response()

    pb = types.SimpleNamespace(Tensor=Tensor, InferenceRequest=InferenceRequest,
                               get_output_tensor_by_name=lambda r, name: Tensor(name, sent["inputs"]["x"] * 2))
    io = IOSpec([TensorSpec("x", [-1, 1, 2, 2], kind="x"), TensorSpec("sigma", [-1], kind="sigma"), TensorSpec("lead", [-1], "int64", "index")],
                [TensorSpec("denoised", [-1, 1, 2, 2], kind="denoised")], {"min": 1, "max": 4})
    engine = BLSEngine(pb, "m_denoiser", io)
    x = torch.randn(3, 1, 2, 2)
    out = engine(x, torch.ones(3), lead=torch.arange(3))
    assert sent["model"] == "m_denoiser" and sent["outputs"] == ["denoised"] and torch.equal(out, x * 2)
    assert {k: v.shape for k, v in sent["inputs"].items()} == {"x": (3, 1, 2, 2), "sigma": (3, 1), "lead": (3, 1)}
    with pytest.raises(Exception, match="'lead' must be int64"):
        engine(x, torch.ones(3), lead=torch.ones(3))


# --- concurrent requests sampled together ---------------------------------------------------------


def _request(latents: np.ndarray, seeds: list[int], num_steps: int | None = None) -> SamplerRequest:
    return SamplerRequest(torch.from_numpy(latents), {}, seeds, num_steps)


def test_request_seed_input_per_sample_or_parameter_per_request():
    """``seed`` as an input is one per sample ([B, 1]: Triton refuses a [1, 1] input beside B > 1 latents);
    one seed for the whole request is the request parameter ``seed``; both at once, or a bad value, is refused."""
    from diffexport.deploy.triton.backend import decode_sampler_request

    class Request:
        def __init__(self, inputs: dict, params: dict):
            self.inputs, self.params = inputs, params

        def parameters(self) -> str:
            return json.dumps(self.params)

    class Tensor:
        def __init__(self, a: np.ndarray):
            self.a = a

        def to_dlpack(self):
            raise TypeError("no dlpack here")

        def as_numpy(self) -> np.ndarray:
            return self.a

    pb = types.SimpleNamespace(get_input_tensor_by_name=lambda r, name: Tensor(r.inputs[name]) if name in r.inputs else None)
    specs = [TensorSpec("latents", [-1, 1, 2, 2], "float32", "latents"), TensorSpec("seed", [-1], "int64", "seed")]
    lat = np.zeros((3, 1, 2, 2), np.float32)
    assert decode_sampler_request(pb, Request({"latents": lat}, {"seed": 7}), specs).seeds == [7]
    assert decode_sampler_request(pb, Request({"latents": lat}, {}), specs).seeds == [0]
    per_sample = decode_sampler_request(pb, Request({"latents": lat, "seed": np.array([[1], [2], [3]])}, {"num_steps": 4}), specs)
    assert per_sample.seeds == [1, 2, 3] and per_sample.num_steps == 4
    with pytest.raises(ValueError, match="not both"):
        decode_sampler_request(pb, Request({"latents": lat, "seed": np.array([[1], [2], [3]])}, {"seed": 7}), specs)
    for bad in (-1, 2**63, "7", True):
        with pytest.raises(ValueError, match="request parameter 'seed' must be an integer"):
            decode_sampler_request(pb, Request({"latents": lat}, {"seed": bad}), specs)


def test_batched_runs_split_by_settings_and_max_batch():
    reqs = [_request(np.zeros((n, 1, 1, 1), np.float32), [0], steps) for n, steps in [(2, None), (3, None), (1, 5), (2, None), (4, None)]]
    assert batched_runs(reqs, max_rows=7) == [[0, 1, 3], [2], [4]]
    assert batched_runs([*reqs[:2], ValueError("bad"), reqs[3]], max_rows=4) == [[0], [1], [3]]


def test_group_noise_keeps_sample_seeds_reproducible(engine: Path, manifest: dict):
    """One seed group is today's single generator, bit for bit (``diffexport sample --seed``)."""
    ort = load(engine, "onnxruntime")
    spec = {**manifest["sampler"], "solver": "edm_stochastic_euler", "solver_options": {"S_churn": 40.0}, "num_steps": 3}
    spec.pop("time_steps", None)
    a = sample(ort, spec, batch=2, seed=3)
    assert torch.equal(a, sample(ort, spec, batch=2, seed=[3], seed_rows=[2]))
    assert not torch.allclose(a, sample(ort, spec, batch=2, seed=4))


def test_requests_sampled_together_equal_each_alone(engine: Path, manifest: dict):
    """Merged stochastic requests (one seed per request, or one per sample) give what each gives alone."""
    ort = load(engine, "onnxruntime")
    spec = {**manifest["sampler"], "solver": "edm_stochastic_heun", "solver_options": {"S_churn": 40.0}, "num_steps": 4}
    spec.pop("time_steps", None)
    run = lambda **kw: sample(ort, spec, **kw)  # noqa: E731
    lat = latents_for(manifest, 4, seed=5)
    reqs = [_request(lat[:1], [5]), _request(lat[1:3], [7, 8]), _request(lat[3:], [0])]
    together = sample_together(reqs, run)
    for r, got in zip(reqs, together):
        alone = sample_together([r], run)[0]
        assert got.shape == r.latents.shape and rel_l2(got.numpy(), alone.numpy()) <= RTOL
    per_sample = sample_together([_request(lat[1:2], [7])], run)[0]  # sample 0 of request 2, with its own seed
    assert rel_l2(together[1][:1].numpy(), per_sample.numpy()) <= RTOL
    reseeded = sample_together([_request(lat[1:3], [7, 9])], run)[0]
    assert rel_l2(reseeded[1:].numpy(), together[1][1:].numpy()) > 1e-3  # the seed is really used


# --- parity verdict, hashes ----------------------------------------------------------------------


class _FakeTritonError(Exception):
    pass


def _model_module(name: str, monkeypatch) -> types.ModuleType:
    """``models/<name>.py`` imported as Triton's stub imports it, with a stand-in ``triton_python_backend_utils``."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.SimpleNamespace(TritonError=_FakeTritonError))
    spec = importlib.util.spec_from_file_location(f"_triton_{name}", Path(triton_package.__file__).parent / "models" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _initialize_args(repo: Path, model: str) -> dict:
    cfg = parse((repo / model / "config.pbtxt").read_text())
    params = {k: {"string_value": v.string_value} for k, v in cfg.parameters.items()}
    return {"model_config": json.dumps({"parameters": params}), "model_repository": str(repo / model), "model_name": model,
            "model_instance_kind": "CPU", "model_instance_device_id": "0"}


@pytest.fixture
def failed_engine(engine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "failed"
    shutil.copytree(engine, copy)
    mark(copy, status="failed")
    return copy


@pytest.mark.parametrize("model", ["sampler", "denoiser"])
def test_models_refuse_an_unverified_engine_at_initialize(failed_engine: Path, manifest: dict, model: str, monkeypatch):
    """``initialize`` raises the one-line refusal of engines.verdict (so Triton does not serve the model)."""
    names = dict(zip(("denoiser", "sampler"), model_names(manifest["name"])))
    module = _model_module(model, monkeypatch)
    repo = repository_dir(failed_engine, python_only=True)
    with pytest.raises(UnverifiedEngine) as err:
        module.TritonPythonModel().initialize(_initialize_args(repo, names[model]))
    assert str(err.value) == refusal(failed_engine, read_manifest(failed_engine)) and "\n" not in str(err.value)
    repo = write_repository(failed_engine, python_only=True, allow_unverified=True)  # the opt-in, as a config parameter
    module.TritonPythonModel().initialize(_initialize_args(repo, names[model]))


def test_serve_refuses_unverified_engines_and_bad_flags(failed_engine: Path):
    cli = CliRunner()
    result = cli.invoke(app, ["serve", str(failed_engine), "--write-only"])
    assert result.exit_code == 1 and "is not verified: status failed" in result.output and ALLOW_FLAG in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = cli.invoke(app, ["serve", str(failed_engine), "--write-only", ALLOW_FLAG, "--instances", "2", "--gpus", "0,1"])
    assert result.exit_code == 0, result.output
    repo = repository_dir(failed_engine)  # --write-only: the full repository, whatever this machine's tritonserver loads
    cfg = parse((repo / model_names(read_manifest(failed_engine)["name"])[0] / "config.pbtxt").read_text())
    assert [(g.count, list(g.gpus)) for g in cfg.instance_group] == [(2, [0, 1])]
    for bad, flag in [(["--gpus", "0,a"], "--gpus"), (["--instances", "0"], "--instances")]:
        result = cli.invoke(app, ["serve", str(failed_engine), "--write-only", ALLOW_FLAG, *bad])
        assert result.exit_code == 1 and flag in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("python_only", [False, True])
def test_the_served_backend_must_have_passed_parity(engine: Path, tmp_path: Path, monkeypatch, python_only: bool):
    """Status ok but the artifact the repository's denoiser runs failed parity (a targets: auto build whose
    other candidate passed, or an edited summary): serve and the sampler's initialize refuse it."""
    copy = shutil.copytree(engine, tmp_path / "e")
    repo = write_repository(copy, python_only=python_only)
    m = read_manifest(copy)
    m["parity"]["backends"]["onnxruntime"]["passed"] = False
    write_manifest(copy, m)
    flags = ["--python-only"] if python_only else []
    result = CliRunner().invoke(app, ["serve", str(copy), "--write-only", *flags])
    assert result.exit_code == 1 and "parity failed for backend onnxruntime" in result.output, result.output
    with pytest.raises(UnverifiedEngine, match="parity failed for backend onnxruntime"):
        _model_module("sampler", monkeypatch).TritonPythonModel().initialize(_initialize_args(repo, model_names(m["name"])[1]))


def test_openvino_denoiser_pads_batches_and_gpus_get_onnxruntime(engine: Path, tmp_path: Path):
    """Triton's OpenVINO backend compiles a static batch of max_batch_size and fails smaller executions
    unless ENABLE_BATCH_PADDING, and runs only KIND_CPU: an engine ranked fastest on OpenVINO gets that
    parameter, and with ``--gpus`` its denoiser is the ONNX on ONNX Runtime (the verdict checked for it)."""
    copy = shutil.copytree(engine, tmp_path / "e")
    m = read_manifest(copy)
    m["artifacts"]["openvino"] = {"file": m["artifacts"]["onnx"]["file"], "sha256": m["artifacts"]["onnx"]["sha256"],
                                  "precision": "fp32", "source": m["artifacts"]["onnx"]["file"]}  # as a build ranked it
    m["default_backend"] = "openvino"
    m["parity"]["backends"]["openvino"] = dict(m["parity"]["backends"]["onnxruntime"])
    write_manifest(copy, m)
    denoiser, sampler = model_names(m["name"])
    cfg = parse((write_repository(copy) / denoiser / "config.pbtxt").read_text())
    assert cfg.backend == "openvino" and cfg.parameters["ENABLE_BATCH_PADDING"].string_value == "YES"
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    result = CliRunner().invoke(app, ["serve", str(copy), "--write-only", "--gpus", "0,1"])
    assert result.exit_code == 0, result.output
    cfg = parse((copy / "triton" / denoiser / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and not cfg.backend and [list(g.gpus) for g in cfg.instance_group] == [[0, 1]]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    sam = parse((copy / "triton" / sampler / "config.pbtxt").read_text())
    assert sam.parameters["denoiser_backend"].string_value == "onnxruntime"
    m = read_manifest(copy)
    m["parity"]["backends"]["onnxruntime"]["passed"] = False  # the backend the GPUs would run failed: refused
    write_manifest(copy, m)
    result = CliRunner().invoke(app, ["serve", str(copy), "--write-only", "--gpus", "0"])
    assert result.exit_code == 1 and "parity failed for backend onnxruntime" in result.output, result.output


def test_write_only_writes_the_full_repository_without_a_local_tritonserver(engine: Path, tmp_path: Path, monkeypatch):
    """``--write-only`` is for a Triton of the user's own: neither the presence nor the backends of this
    machine's tritonserver decide which repository it writes."""
    import diffexport.cli.serve as serve_cli

    def missing() -> set[str]:
        raise TritonError("the tritonserver binary was not found")

    monkeypatch.setattr(serve_cli, "available_backends", missing)
    copy = shutil.copytree(engine, tmp_path / "e")
    result = CliRunner().invoke(app, ["serve", str(copy), "--write-only", "--gpus", "0,1"])
    assert result.exit_code == 0 and result.output.strip().splitlines()[-1] == str(copy / "triton"), result.output
    cfg = parse(next((copy / "triton").glob("*_denoiser/config.pbtxt")).read_text())
    assert cfg.platform == "onnxruntime_onnx" and [list(g.gpus) for g in cfg.instance_group] == [[0, 1]]


@pytest.mark.parametrize("args, flag", [
    (["--http-port", "70000"], "--http-port"), (["--grpc-port", "-5"], "--grpc-port"), (["--timeout", "0"], "--timeout"),
    (["--max-restarts", "-1"], "--max-restarts"), (["--host", "nohost.invalid"], "--host 'nohost.invalid'"),
    (["--log-file", "."], "--log-file ."), (["--http-port", "9000", "--metrics-port", "9000"], "must be distinct"),
])
def test_serve_refuses_bad_server_flags_before_starting(engine: Path, args: list[str], flag: str):
    """One line naming the flag, no server started (a port out of range was an 'unexpected ValueError'
    plus tritonclient's traceback; an unknown host did not name --host)."""
    result = CliRunner().invoke(app, ["serve", str(engine), *args])
    assert result.exit_code in (1, 2) and flag in result.output and "Traceback" not in result.output, result.output
    assert "starting tritonserver" not in result.output


def test_serve_refuses_an_edited_repository(engine: Path, tmp_path: Path):
    """Issue 13 item 4: ``model.py`` is executed by the server, so every repository file is hashed and checked."""
    copy = tmp_path / "e"
    shutil.copytree(engine, copy)
    cli = CliRunner()
    repo = repository_dir(copy, python_only=True)
    first = cli.invoke(app, ["serve", str(copy), "--write-only", "--python-only"])
    assert first.exit_code == 0, first.output
    model_py = next(repo.glob("*_sampler/1/model.py"))
    original = model_py.read_text()
    model_py.write_text(original + "\nprint('edited')\n")
    result = cli.invoke(app, ["serve", str(copy), "--write-only", "--python-only"])
    assert result.exit_code == 1 and "sha256 does not match" in result.output and str(model_py) in result.output
    model_py.write_text(original)
    (model_py.parent / "extra.py").write_text("")
    result = cli.invoke(app, ["serve", str(copy), "--write-only", "--python-only"])
    assert result.exit_code == 1 and "extra.py" in result.output
    assert cli.invoke(app, ["serve", str(copy), "--write-only", "--python-only", "--rewrite"]).exit_code == 0
    verify_repository(copy, read_manifest(copy), repo.name)


def test_write_repository_replaces_atomically(engine: Path, manifest: dict, tmp_path: Path):
    copy = tmp_path / "e"
    shutil.copytree(engine, copy)
    (copy / "triton-python" / "stale").write_text("old")
    hidden = lambda: sorted(p.name for p in copy.iterdir() if p.name.startswith("."))  # noqa: E731  (e.g. a runtime's .cache)
    before = hidden()
    repo = write_repository(copy, python_only=True)
    assert not (repo / "stale").exists() and hidden() == before  # no temporary folder left behind
    assert stat.S_IMODE(repo.stat().st_mode) == 0o755 == stat.S_IMODE(copy.stat().st_mode)  # readable by a server run by another user
    broken = {**manifest, "artifacts": {}}
    with pytest.raises(Exception, match="needs a tensorrt or onnx artifact"):
        write_repository(copy, manifest=broken)
    assert (copy / "triton").is_dir()  # a failed write leaves the previous repository


def test_python_only_reason(manifest: dict):
    assert python_only_reason(manifest, {"python", "onnxruntime"}) is None
    assert "no onnxruntime backend" in python_only_reason(manifest, {"python"})
    assert python_only_reason(manifest, {"python", "onnxruntime"}, forced=True) == "--python-only"
    recipe = {**manifest["recipe"], "deploy": {**manifest["recipe"]["deploy"], "triton_python_only": True}}
    assert "triton_python_only" in python_only_reason({**manifest, "recipe": recipe}, {"python", "onnxruntime"})


def test_missing_triton_names_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TritonError, match=r"\[triton\] extra"):
        triton_home()


# --- the server --------------------------------------------------------------------------------


@needs_server
def test_server_that_cannot_start_shows_its_log(tmp_path: Path):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('backend: "python"\nno_such_field: 1\n')
    server = TritonServer(tmp_path, log_file=tmp_path / "log")
    with pytest.raises(TritonError, match="failed to read text proto from .*broken/config.pbtxt"):
        server.start(timeout=120)
    assert not server.running


@needs_server
def test_serve_picks_the_repository_this_triton_can_load(server, manifest):
    python_only = python_only_reason(manifest, available_backends()) is not None  # True with nvidia-pytriton's server
    assert ("serving the self-contained Python repository" in server["out"].read_text()) == python_only


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sampler_matches_python_sampler(server, manifest, reference, protocol: str):
    _, sampler = model_names(manifest["name"])
    latents = latents_for(manifest, 2, seed=1)
    got = infer(protocol, server[protocol], sampler, {"latents": latents}, "samples")
    assert got.shape == latents.shape and rel_l2(got, reference(latents)) <= RTOL


@needs_server
def test_one_seed_per_request_is_a_request_parameter(server, manifest, reference):
    """A [1, 1] ``seed`` input beside 3 latents is refused by Triton itself (batch sizes differ), so the
    per-request seed is the request parameter ``seed``."""
    _, sampler = model_names(manifest["name"])
    latents = latents_for(manifest, 3, seed=4)
    with pytest.raises(InferenceServerException, match="batch size does not match"):
        infer("http", server["http"], sampler, {"latents": latents, "seed": np.array([[5]], np.int64)}, "samples")
    got = infer("http", server["http"], sampler, {"latents": latents}, "samples", parameters={"seed": 5})
    assert rel_l2(got, reference(latents)) <= RTOL
    with pytest.raises(InferenceServerException, match="not both"):
        infer("grpc", server["grpc"], sampler, {"latents": latents, "seed": np.array([[5]] * 3, np.int64)}, "samples", parameters={"seed": 5})


@needs_server
def test_denoiser_model_matches_engine(server, engine, manifest):
    denoiser, _ = model_names(manifest["name"])
    x = latents_for(manifest, 3, seed=2)
    sigma = np.array([80.0, 1.0, 0.01], np.float32)
    got = infer("grpc", server["grpc"], denoiser, {"x": x, "sigma": sigma[:, None]}, "denoised")
    want = load(engine, "onnxruntime")(torch.from_numpy(x), torch.from_numpy(sigma)).numpy()
    assert rel_l2(got, want) <= 1e-6


@needs_server
def test_concurrent_clients(server, manifest, reference):
    _, sampler = model_names(manifest["name"])
    latents = latents_for(manifest, 32, seed=3)
    want = reference(latents)

    def client(k: int) -> list[float]:
        protocol = "http" if k % 2 else "grpc"
        rows = [latents[i : i + 1] for i in range(4 * k, 4 * k + 4)]
        return [rel_l2(infer(protocol, server[protocol], sampler, {"latents": r}, "samples"), want[4 * k + j : 4 * k + j + 1])
                for j, r in enumerate(rows)]

    with ThreadPoolExecutor(8) as pool:
        errors = [e for errs in pool.map(client, range(8)) for e in errs]
    assert len(errors) == 32 and max(errors) <= RTOL
    stats = tritonclient_http.InferenceServerClient(server["http"])
    try:
        s = stats.get_inference_statistics(sampler)["model_stats"][0]
    finally:
        stats.close()
    assert s["execution_count"] < s["inference_count"]  # concurrent requests were sampled together


@needs_server
def test_concurrent_denoiser_requests(server, engine, manifest):
    """Requests that the dynamic batcher gathers are concatenated and split back correctly."""
    denoiser, _ = model_names(manifest["name"])
    ort = load(engine, "onnxruntime")
    cases = [(latents_for(manifest, 1 + k % 3, seed=10 + k), np.full(1 + k % 3, 0.05 * (k + 1), np.float32)) for k in range(16)]

    def client(case: tuple[np.ndarray, np.ndarray]) -> float:
        x, sigma = case
        got = infer("grpc", server["grpc"], denoiser, {"x": x, "sigma": sigma[:, None]}, "denoised")
        return rel_l2(got, ort(torch.from_numpy(x), torch.from_numpy(sigma)).numpy())

    with ThreadPoolExecutor(8) as pool:
        assert max(pool.map(client, cases)) <= 1e-6


@needs_server
def test_bad_requests_get_errors_and_server_keeps_serving(server, manifest, reference):
    _, sampler = model_names(manifest["name"])
    good = latents_for(manifest, 1, seed=4)
    bad = {
        "wrong shape": {"latents": good[:, :, :-1]},
        "wrong dtype": {"latents": good.astype(np.int64)},
        "missing input": {},
        "non-finite": {"latents": np.full_like(good, np.nan)},  # passes Triton's checks, fails in the model
    }
    for what, inputs in bad.items():
        with pytest.raises(InferenceServerException) as err:
            if not inputs:  # tritonclient needs one input: send only the optional seed
                inputs = {"seed": np.zeros((1, 1), np.int64)}
            infer("http", server["http"], sampler, inputs, "samples")
        assert err.value.message(), what
        if what == "missing input":
            assert "'latents' is missing" in err.value.message() and "KeyError" not in err.value.message()
    got = infer("http", server["http"], sampler, {"latents": good}, "samples")
    assert rel_l2(got, reference(good)) <= RTOL


@needs_server
def test_two_cpu_instances_are_served(server, manifest):
    client = tritonclient_grpc.InferenceServerClient(server["grpc"])
    try:
        for model in model_names(manifest["name"]):
            groups = client.get_model_config(model, as_json=True)["config"]["instance_group"]
            assert [(int(g["count"]), g["kind"]) for g in groups] == [(2, "KIND_CPU")]
    finally:
        client.close()


@needs_server
def test_denoiser_refuses_bad_sigma(server, manifest):
    """Issue 13 item 5: σ <= 0 or NaN is a clean error, not NaN samples; good requests still pass."""
    denoiser, _ = model_names(manifest["name"])
    x = latents_for(manifest, 1, seed=6)
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(InferenceServerException, match="'sigma' must be finite and > 0"):
            infer("grpc", server["grpc"], denoiser, {"x": x, "sigma": np.array([[sigma]], np.float32)}, "denoised")
    assert np.isfinite(infer("grpc", server["grpc"], denoiser, {"x": x, "sigma": np.array([[1.0]], np.float32)}, "denoised")).all()


@needs_server
def test_two_servers_one_client_identical_results(server, manifest, reference):
    """Scale-out from the same repository: a second server on other ports, one client spreading requests."""
    _, sampler = model_names(manifest["name"])
    second = _start_serve(server["engine"], tag="second")  # verifies the hashes the first serve recorded
    try:
        urls = [server["http"], second["http"]]
        latents = latents_for(manifest, 4, seed=7)
        rows = [infer("http", urls[i % 2], sampler, {"latents": latents[i : i + 1]}, "samples") for i in range(4)]
        again = [infer("http", urls[(i + 1) % 2], sampler, {"latents": latents[i : i + 1]}, "samples") for i in range(4)]
    finally:
        assert _stop_serve(second) == 0
    assert all(np.array_equal(a, b) for a, b in zip(rows, again))  # the same request gives the same bits on either server
    assert rel_l2(np.concatenate(rows), reference(latents)) <= RTOL


@needs_server
def test_oversized_json_request_does_not_take_the_service_down(server, manifest, reference):
    """Issue 13 item 2: this JSON request aborts tritonserver 2.51 itself (std::bad_alloc, no server flag
    limits it); ``serve`` then restarts the server on the same ports, says so, and it answers again."""
    _, sampler = model_names(manifest["name"])
    body = json.dumps({"inputs": [{"name": "latents", "shape": [1000000000, 3, 16, 16], "datatype": "FP32", "data": [1.0]}]})
    host, port = server["http"].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", f"/v2/models/{sampler}/infer", body, {"Content-Type": "application/json"})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException):  # the server died under the request
        status = None
    finally:
        conn.close()
    assert status is None or 400 <= status < 500
    good = latents_for(manifest, 1, seed=8)
    deadline = time.monotonic() + 300
    while True:
        try:
            got = infer("http", server["http"], sampler, {"latents": good}, "samples")
            break
        except Exception:
            if time.monotonic() > deadline or server["proc"].poll() is not None:
                pytest.fail(f"the service did not come back:\n{server['out'].read_text()}")
            time.sleep(1)
    assert rel_l2(got, reference(good)) <= RTOL
    if status is None:  # the server may answer before serve's readiness poll prints its line: wait for it
        deadline = time.monotonic() + 60
        while "ready again after restart" not in (out := server["out"].read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "tritonserver exited unexpectedly" in out and "restarting it" in out and "ready again after restart" in out


@needs_server
def test_sigterm_stops_serve_cleanly(server):
    """Last: SIGTERM makes ``diffexport serve`` stop tritonserver and exit 0."""
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert "stopped (exit code 0)" in server["out"].read_text()


def test_stub_threads_sleep_unless_the_denoiser_runs_on_openmp(tmp_path, monkeypatch):
    """PASSIVE keeps the sampler's and denoiser's idle OpenMP threads off the shared cores, but every
    op of an OpenMP engine (AOTInductor, torch) then wakes them (quickstart AOTI: 2.2 -> 13 ms per
    call): serve sets it only for the other backends, and never overrides the user's own setting."""
    from diffexport.deploy.triton.server import OPENMP_BACKENDS

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert TritonServer(tmp_path).environment()["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in TritonServer(tmp_path, sleep_idle_threads=False).environment()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert TritonServer(tmp_path).environment()["OMP_WAIT_POLICY"] == "ACTIVE"
    assert {"aoti", "aoti-bf16", "torch"} <= set(OPENMP_BACKENDS) and "onnxruntime" not in OPENMP_BACKENDS
