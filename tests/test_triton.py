"""Triton deployment: generated repositories, and one real ``tritonserver`` (started by
``diffexport serve``) answering HTTP and gRPC clients on a tiny ONNX engine."""

from __future__ import annotations

import hashlib
import shutil
import signal
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
from diffexport.deploy.triton.config import denoiser_config, sampler_config, to_pbtxt
from diffexport.deploy.triton.server import free_ports
from diffexport.engines import load
from diffexport.engines.manifest import read_manifest
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
    triton_stage(built, read_manifest(built))
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


@pytest.fixture(scope="module")
def server(engine: Path):
    """``diffexport serve ENGINE`` on free loopback ports: the one server of this module."""
    if not _has_tritonserver():
        pytest.skip("tritonserver binary not found (nvidia-pytriton, the [triton] extra)")
    http, grpc, metrics = free_ports(3)
    log = engine.parent / "serve.log"
    cmd = [str(Path(sys.executable).parent / "diffexport"), "serve", str(engine), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log-file", str(log)]
    out = engine.parent / "serve.out"
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "ready; Ctrl-C to stop" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"diffexport serve did not become ready:\n{out.read_text()}\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.5)
    yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "proc": proc, "out": out}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def infer(protocol: str, url: str, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    client_mod = tritonclient_http if protocol == "http" else tritonclient_grpc
    client = client_mod.InferenceServerClient(url)
    tensors = []
    for name, a in inputs.items():
        t = client_mod.InferInput(name, list(a.shape), {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64"}[a.dtype])
        t.set_data_from_numpy(a)
        tensors.append(t)
    try:
        return client.infer(model, tensors).as_numpy(output)
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
    assert s.backend == "python" and s.max_batch_size == 0 and s.parameters["denoiser_model"].string_value == denoiser
    assert s.parameters["engine_dir"].string_value == "../.."
    x = io["inputs"][0]["shape"]
    assert [(t.name, list(t.dims), t.optional) for t in s.input] == (
        [("latents", x, False)] + [(c["name"], c["shape"], False) for c in io["inputs"][2:]] + [("seed", [1], True)])
    assert [(t.name, list(t.dims)) for t in s.output] == [("samples", x)]


def test_pbtxt_writer_quotes_and_nests():
    text = to_pbtxt({"name": 'a"b\\', "input": [{"name": "s", "dims": [1], "reshape": {"shape": []}}], "dynamic_batching": {},
                     "parameters": [{"key": "k", "value": {"string_value": "v"}}]})
    cfg = parse(text)
    assert cfg.name == 'a"b\\' and cfg.HasField("dynamic_batching") and cfg.parameters["k"].string_value == "v"
    assert list(cfg.input[0].dims) == [1] and cfg.input[0].HasField("reshape") and list(cfg.input[0].reshape.shape) == []


def test_condition_inputs_in_configs():
    """Conditions of every kind (none in the served engine) keep their dims; index [B] travels as [B, 1]."""
    io = IOSpec([TensorSpec("x", [-1, 2, 8, 8], kind="x"), TensorSpec("sigma", [-1], kind="sigma"),
                 TensorSpec("img", [-1, 3, 8, 8], kind="image"), TensorSpec("labels", [-1, 4], kind="vector"),
                 TensorSpec("lead", [-1], "int64", "index")], [TensorSpec("denoised", [-1, 2, 8, 8], kind="denoised")], {"max": 4})
    d = parse(to_pbtxt(denoiser_config("m_denoiser", io, platform="tensorrt_plan", instances=2, gpu=True)))
    assert [(t.name, list(t.dims), list(t.reshape.shape) if t.HasField("reshape") else None) for t in d.input] == [
        ("x", [2, 8, 8], None), ("sigma", [1], []), ("img", [3, 8, 8], None), ("labels", [4], None), ("lead", [1], [])]
    assert d.input[4].data_type == model_config_pb2.TYPE_INT64 and d.platform == "tensorrt_plan"
    assert [(g.count, g.kind) for g in d.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    s = parse(to_pbtxt(sampler_config("m_sampler", io)))
    assert [(t.name, list(t.dims)) for t in s.input] == [("latents", [-1, 2, 8, 8]), ("img", [-1, 3, 8, 8]), ("labels", [-1, 4]),
                                                          ("lead", [-1]), ("seed", [1])]


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


def test_write_repository_replaces_atomically(engine: Path, manifest: dict, tmp_path: Path):
    copy = tmp_path / "e"
    shutil.copytree(engine, copy)
    (copy / "triton-python" / "stale").write_text("old")
    repo = write_repository(copy, python_only=True)
    assert not (repo / "stale").exists() and [p.name for p in copy.iterdir() if p.name.startswith(".")] == []
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
                inputs = {"seed": np.zeros(1, np.int64)}
            infer("http", server["http"], sampler, inputs, "samples")
        assert err.value.message(), what
    got = infer("http", server["http"], sampler, {"latents": good}, "samples")
    assert rel_l2(got, reference(good)) <= RTOL


@needs_server
def test_sigterm_stops_serve_cleanly(server):
    """Last: SIGTERM makes ``diffexport serve`` stop tritonserver and exit 0."""
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert "stopped (exit code 0)" in server["out"].read_text()
