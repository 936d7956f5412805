"""Export layer: Denoiser wiring, one torch.export, ONNX (ORT) and AOTInductor parity, TensorRT gating.

One tiny SongUNet (16x16, 16 channels, attention at 8x8) with randomised weights is exported once
per session; the ONNX file and the single AOTInductor package built from it are shared.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffexport.engines.base import EngineError
from diffexport.engines.onnxruntime import OnnxRuntimeEngine, make_session
from diffexport.export import (
    GROUP_NORM_OPSET,
    Denoiser,
    TargetUnavailable,
    build_denoiser,
    build_tensorrt,
    example_inputs,
    export_aoti,
    export_onnx,
    export_program,
    export_target,
)
from diffexport.recipes import io_spec, parse_recipe

SIGMAS = (0.002, 0.05, 1.0, 10.0, 80.0)
SONG = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8], dropout=0.0)  # fmt: skip


def tiny_recipe(**overrides):
    data = dict(
        name="tiny",
        model={"class": "SongUNet", "args": SONG, "init": {"seed": 3}},
        preconditioner={"class": "EDMPreconditioner", "args": {"sigma_data": 0.5}},
        inputs={"batch": {"min": 1, "opt": 2, "max": 4}},
        sampler={"scheduler": {"class": "EDMNoiseScheduler", "args": {}}},
    )
    return parse_recipe({**data, **overrides}, "tiny")


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor) -> float:
    a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    return float((a - b).norm() / b.norm())


def inputs_at(io, batch: int, sigma: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Engine inputs with ``x = x0 + sigma n`` at one noise level ``sigma``."""
    x, _, *conds = example_inputs(io, batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(x.shape, generator=g) + sigma * torch.randn(x.shape, generator=g)
    return (x, torch.full((batch,), sigma), *conds)


@pytest.fixture(scope="session")
def recipe():
    return tiny_recipe()


@pytest.fixture(scope="session")
def io(recipe):
    return io_spec(recipe)


@pytest.fixture(scope="session")
def denoiser(recipe):
    return build_denoiser(recipe)  # no checkpoint: randomize_(model, seed) redrew every weight


@pytest.fixture(scope="session")
def program(denoiser, io):
    return export_program(denoiser, io, "fp32")


@pytest.fixture(scope="session")
def onnx_path(program, io, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    info = export_target("onnx", program, io, out)
    assert info["file"] == "denoiser.onnx" and info["opset"] == GROUP_NORM_OPSET and info["files"] == ["denoiser.onnx"]
    return out / info["file"]


# ----------------------------------------------------------------------------
# The Denoiser: preconditioner around the backbone, conditions routed by kind.


def test_denoiser_is_edm_preconditioned_backbone(denoiser, io):
    x, _ = inputs_at(io, 3, 2.0)
    sigma = torch.tensor([0.01, 2.0, 60.0])
    net, sd, s = denoiser.preconditioner.model.model, 0.5, sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        want = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * net(x / (s**2 + sd**2).sqrt(), sigma.log() / 4, None)
        got = denoiser(x, sigma)
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-6
    assert rel_err(got, x) > 1e-2  # the network contributes: weights are not EDM's zero init


@pytest.fixture(scope="session")
def conditional():
    """(io, denoiser) of a SongUNetPosLtEmbd with an image, a vector and an index condition."""
    recipe = tiny_recipe(
        model={"class": "SongUNetPosLtEmbd", "init": {"seed": 4},
               "args": {**SONG, "in_channels": 3 + 2 + 4 + 2, "label_dim": 4, "lead_time_channels": 2, "lead_time_steps": 3}},
        conditions=[{"name": "low_res", "kind": "image", "shape": [2, 16, 16]}, {"name": "labels", "kind": "vector", "shape": [4]},
                    {"name": "lead_time_label", "kind": "index"}],
    )  # fmt: skip
    return io_spec(recipe), build_denoiser(recipe)


def test_conditions_reach_the_model_after_input_scaling(conditional):
    io, d = conditional
    x, sigma, low_res, labels, lead = example_inputs(io, 3, seed=1, index_high=d.index_high)
    assert d.index_high == 3
    net = d.preconditioner.model.model
    c_in = (1 / (sigma**2 + 0.25).sqrt()).reshape(-1, 1, 1, 1)
    c_skip, c_out = c_in**2 * 0.25, (0.5 * sigma).reshape(-1, 1, 1, 1) * c_in
    with torch.no_grad():
        f = net(torch.cat([c_in * x, low_res], 1), sigma.log() / 4, labels, lead_time_label=lead)
        assert rel_err(d(x, sigma, low_res, labels, lead), c_skip * x + c_out * f) < 1e-6
        assert rel_err(d(x, sigma, low_res, torch.zeros_like(labels), lead), c_skip * x + c_out * f) > 1e-3
        assert rel_err(d(x, sigma, low_res, labels, (lead + 1) % 3), c_skip * x + c_out * f) > 1e-3
    with pytest.raises(TypeError, match="low_res"):
        d(x, sigma, low_res)


def test_conditional_onnx_matches_eager(conditional, tmp_path):
    io, d = conditional
    info = export_onnx(export_program(d, io), io, tmp_path / "c.onnx")
    session = make_session(tmp_path / "c.onnx")
    assert [i.name for i in session.get_inputs()] == ["x", "sigma", "low_res", "labels", "lead_time_label"]
    for batch in (io.batch["min"], io.batch["max"]):
        args = example_inputs(io, batch, seed=batch, index_high=d.index_high)
        (got,) = session.run(None, {s.name: a.numpy() for s, a in zip(io.inputs, args)})
        with torch.no_grad():
            assert rel_err(got, d(*args)) <= 1e-5, batch
    assert info["group_norm"] == "InstanceNormalization"


def test_index_condition_is_passed_by_name():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x, t, class_labels, lead_time_label=None):
            seen.update(x=x, lead_time_label=lead_time_label)
            return x[:, :1]

    from diffexport.diffusion.preconditioners import EDMPreconditioner
    from diffexport.diffusion.utils import ConcatConditionWrapper

    spec = io_spec(tiny_recipe(conditions=[{"name": "lead_time_label", "kind": "index"}]))
    d = Denoiser(EDMPreconditioner(ConcatConditionWrapper(Probe(), kwarg_keys=["lead_time_label"])), spec.inputs[2:], index_high=5)
    lead = torch.tensor([4, 0])
    d(torch.ones(2, 1, 4, 4), torch.ones(2), lead)
    assert seen["lead_time_label"] is lead and seen["x"].shape == (2, 1, 4, 4)


def test_example_inputs_follow_the_io_contract():
    io = io_spec(tiny_recipe(model={"class": "SongUNet", "args": {**SONG, "in_channels": 5}},
                             conditions=[{"name": "cond", "kind": "image", "shape": [2, 16, 16]},
                                         {"name": "lead", "kind": "index"}]))  # fmt: skip
    x, sigma, cond, lead = example_inputs(io, 64, seed=0, index_high=3)
    assert x.shape == (64, 3, 16, 16) and cond.shape == (64, 2, 16, 16) and sigma.shape == (64,)
    assert lead.dtype == torch.int64 and set(lead.tolist()) == {0, 1, 2}
    assert 0.02 <= sigma.min() and sigma.max() <= 20 and sigma.max() / sigma.min() > 50
    assert torch.equal(example_inputs(io, 64, seed=0, index_high=3)[0], x)


def test_ddpm_epsilon_model_becomes_an_edm_denoiser():
    recipe = tiny_recipe(model={"class": "DiffusionModel", "args": dict(image_size=8, channels=2, hidden_dims=[8], time_dim=8)},
                         preconditioner={"class": "DDPMPreconditioner"})  # fmt: skip
    d = build_denoiser(recipe)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    levels = ((1 - abar) / abar).sqrt()
    sigma = torch.tensor([0.01, 0.5, 3.0, 1000.0])
    t = (sigma[:, None].double() - levels[None]).abs().argmin(1)
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        eps = d.preconditioner.model.model(x / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1), t)
        assert rel_err(d(x, sigma), x - sigma.reshape(-1, 1, 1, 1) * eps) < 1e-5
    assert t.tolist()[0] < t.tolist()[1] < t.tolist()[2] < t.tolist()[3] == 999


def test_regression_unet_is_refused_with_the_field_named():
    recipe = tiny_recipe(model={"class": "UNet", "args": {"img_resolution": 16, "img_in_channels": 3, "img_out_channels": 3,
                                                           "model_type": "SongUNet", "model_channels": 16}})  # fmt: skip
    with pytest.raises(ValueError, match="model.class: UNet"):
        build_denoiser(recipe)


# ----------------------------------------------------------------------------
# ONNX


def test_onnx_matches_eager_at_every_sigma_and_batch_bound(denoiser, io, onnx_path):
    session = make_session(onnx_path)
    for batch in (io.batch["min"], io.batch["max"]):
        for sigma in SIGMAS:
            args = inputs_at(io, batch, sigma, seed=batch)
            with torch.no_grad():
                want = denoiser(*args)
            (got,) = session.run(None, {s.name: a.numpy() for s, a in zip(io.inputs, args)})
            assert got.shape == tuple(want.shape)
            assert rel_err(got, want) <= 1e-5, (batch, sigma)


def test_onnx_file_has_group_norm_as_instance_norm_and_symbolic_batch(denoiser, onnx_path, io):
    """The file on disk is the graph ONNX Runtime runs (no in-memory rewrite): each GroupNorm one
    InstanceNormalization over [N, G, -1], never GroupNormalization's ~20-node expansion."""
    model = onnx.load(str(onnx_path))
    ops = Counter(n.op_type for n in model.graph.node)
    group_norms = sum(type(m).__name__ == "GroupNorm" for m in denoiser.modules())
    assert group_norms > 0 and ops["InstanceNormalization"] == group_norms
    assert ops["GroupNormalization"] == 0 and ops["ReduceMean"] == 0
    assert [i.name for i in model.graph.input] == [s.name for s in io.inputs]
    assert [o.name for o in model.graph.output] == ["denoised"]
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx.checker.check_model(str(onnx_path), full_check=True)
    assert not list(onnx_path.parent.glob(".*")), "temporary files left behind"


def test_session_runs_the_file_on_disk_unchanged(onnx_path, monkeypatch):
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda model, *a, **k: seen.append(model) or real(model, *a, **k))
    make_session(onnx_path, threads=1)
    assert seen == [str(onnx_path)]


def test_onnx_opset18_uses_instance_norm_and_still_matches(denoiser, program, io, tmp_path):
    info = export_onnx(program, io, tmp_path / "d18.onnx", opset=18)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "d18.onnx")).graph.node)
    assert info["group_norm"] == "InstanceNormalization" and ops["GroupNormalization"] == 0 and ops["ReduceMean"] == 0
    args = inputs_at(io, 3, 1.0)
    (got,) = make_session(tmp_path / "d18.onnx").run(None, {s.name: a.numpy() for s, a in zip(io.inputs, args)})
    with torch.no_grad():
        assert rel_err(got, denoiser(*args)) <= 1e-5


def test_onnx_runtime_engine_takes_and_returns_torch_tensors(denoiser, io, onnx_path):
    engine = OnnxRuntimeEngine(onnx_path, io, threads=1)
    assert engine.backend == "onnxruntime" and engine.device == torch.device("cpu")
    x, sigma = inputs_at(io, 4, 5.0)
    out = engine(x, sigma)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(out, denoiser(x, sigma)) <= 1e-5
    assert rel_err(engine(x[:1], sigma[:1]), out[:1]) <= 1e-5
    with pytest.raises(EngineError, match="batch 5"):
        engine(torch.zeros(5, 3, 16, 16), torch.ones(5))


def test_mixed_precision_graph(denoiser, io, tmp_path):
    program = export_program(denoiser, io, "fp16")
    path = tmp_path / "fp16.onnx"
    export_onnx(program, io, path, precision="fp16")
    model = onnx.load(str(path))
    types = {i.name: i.data_type for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types.get(n.input[1]) == onnx.TensorProto.FLOAT16 for n in convs)  # weights stored fp16
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in (*model.graph.input, *model.graph.output))
    inferred = onnx.shape_inference.infer_shapes(model)
    dtype = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    for node in inferred.graph.node:
        if node.op_type in ("GroupNormalization", "Softmax"):
            assert dtype[node.input[0]] == onnx.TensorProto.FLOAT, node.name
    args = inputs_at(io, 2, 1.0)
    with torch.no_grad():
        want = denoiser(*args)
        err = rel_err(program.module()(*args), want)
    assert 1e-6 < err < 1e-2  # really ran in fp16, and not far off
    (got,) = make_session(path).run(None, {s.name: a.numpy() for s, a in zip(io.inputs, args)})
    assert rel_err(got, want) < 1e-2


# ----------------------------------------------------------------------------
# AOTInductor (one compile, ~40-100 s on 2 cores)


@pytest.mark.slow
def test_aoti_package_matches_eager(denoiser, program, io, tmp_path_factory):
    path = tmp_path_factory.mktemp("aoti") / "denoiser.pt2"
    with warnings.catch_warnings(record=True) as seen:  # nothing of torch's internals reaches the build's output
        warnings.simplefilter("always", FutureWarning)
        info = export_aoti(program, io, path)
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]
    assert info["device"] == "cpu" and path.is_file() and not list(path.parent.glob(".*"))
    runner = torch._inductor.aoti_load_package(str(path))
    for batch in (io.batch["min"], io.batch["max"]):
        for sigma in (0.002, 1.0, 80.0):
            args = inputs_at(io, batch, sigma, seed=batch)
            with torch.no_grad():
                out, want = runner(*args), denoiser(*args)
            out = out[0] if isinstance(out, (list, tuple)) else out
            assert rel_err(out, want) <= 1e-5, (batch, sigma)


# ----------------------------------------------------------------------------
# TensorRT


def test_tensorrt_unavailable_names_package_and_extra(onnx_path, io, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: the unavailable path cannot be exercised")
    with pytest.raises(TargetUnavailable, match=r"'tensorrt' is not installed.*pip install 'diffexport\[tensorrt\]'"):
        build_tensorrt(onnx_path, io, tmp_path / "denoiser.plan")
    with pytest.raises(TargetUnavailable, match="tensorrt"):
        export_target("tensorrt", None, io, tmp_path)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown export target 'tflite'"):
        export_target("tflite", None, io, tmp_path)


def test_tensorrt_plan_builds_for_the_batch_profile(onnx_path, io, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'diffexport[tensorrt]')")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    info = build_tensorrt(onnx_path, io, tmp_path / "denoiser.plan", timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0 and info["compute_capability"]
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((tmp_path / "denoiser.plan").read_bytes())
    assert [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)] == ["x", "sigma", "denoised"]
    assert tuple(engine.get_tensor_profile_shape("x", 0)[2]) == (io.batch["max"], 3, 16, 16)


# ----------------------------------------------------------------------------
# Locating the first diverging module (any backend compiled from a torch.export program)


def test_module_locate_names_the_perturbed_module(denoiser, io):
    """A "compiler" that runs the exported program with one weight of ``enc.8x8_block0.conv1``
    perturbed: the search names that module (its block first, then the block's child)."""
    from diffexport.parity.module_locate import locate_module

    target = "enc.8x8_block0.conv1.weight"

    def faulty_compile(program):
        module = program.module()
        (name,) = [n for n, _ in module.named_parameters() if n.endswith(target)]
        with torch.no_grad():
            module.get_parameter(name).mul_(1.05)
        return module

    args = inputs_at(io, 2, 1.0)
    found = locate_module(denoiser, args, faulty_compile, lambda d: export_program(d, io), rtol=1e-4)
    assert found is not None and found.module == "enc.8x8_block0.conv1" and found.kind == "Conv2d", found
    assert found.rel_l2 > 1e-3 and "enc.8x8_block0.conv1" in str(found)
    honest = locate_module(denoiser, args, lambda p: p.module(), lambda d: export_program(d, io), rtol=1e-4)
    assert honest is None


# ----------------------------------------------------------------------------
# Regression (issue 9): the small NCSN++ SongUNet that AOTInductor + freezing miscompiled


NCSNPP = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
              attn_resolutions=[8], dropout=0.0, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
              decoder_type="skip", resample_filter=[1, 3, 3, 1])  # fmt: skip


@pytest.mark.slow
def test_aoti_ncsnpp_matches_eager(tmp_path):
    """Built as the engine build does (``export_program`` + ``export_aoti``, its default inductor
    configs, under no_grad): ~1e-2..1e-1 with freezing, ~5e-8 now (docs/aoti_freezing.md)."""
    from diffexport.export import INDUCTOR_CONFIGS

    assert INDUCTOR_CONFIGS.get("freezing") is False
    recipe = tiny_recipe(model={"class": "SongUNet", "args": NCSNPP, "init": {"seed": 0}})
    io, denoiser = io_spec(recipe), build_denoiser(recipe)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # parameters are redrawn by randomize_; buffers (Fourier freqs, filters) here
        for b in denoiser.preconditioner.model.model.buffers():
            if b.is_floating_point() and b.numel() > 1:
                b.copy_(torch.randn(b.shape, generator=g) * b.std().clamp_min(0.1))
    export_aoti(export_program(denoiser, io), io, tmp_path / "denoiser.pt2")
    runner = torch._inductor.aoti_load_package(str(tmp_path / "denoiser.pt2"))
    for batch, sigma in ((1, 0.002), (3, 0.5), (4, 80.0)):
        args = inputs_at(io, batch, sigma, seed=batch)
        with torch.no_grad():
            out, want = runner(*args), denoiser(*args)
        out = out[0] if isinstance(out, (list, tuple)) else out
        assert rel_err(out, want) <= 1e-5, (batch, sigma, rel_err(out, want))


# ----------------------------------------------------------------------------
# Loading and running an engine imports no exporter


HEAVY = ("diffexport.export", "torch.onnx", "onnxscript", "onnx_ir", "onnx", "tensorrt", "torch_tensorrt", "torch._inductor",
         "tensordict", "torch._dynamo", "openvino")  # fmt: skip


def test_loading_and_running_an_engine_imports_no_exporter(onnx_engine_dir):
    """Load, one call, and a 3-step sampling run (the Triton sampler's path) import none of HEAVY."""
    import subprocess
    import sys

    code = f"""
import sys, time, torch
t = time.perf_counter()
import diffexport.engines, diffexport.runtime
assert "pydantic" not in sys.modules, "importing the runtime imported the recipe schema (pydantic)"
from diffexport.engines import load
from diffexport.engines.manifest import read_manifest
from diffexport.runtime import sample
from diffexport.runtime.inputs import condition_specs
engine = load({str(onnx_engine_dir)!r}, "onnxruntime", allow_unverified=True)
x = torch.zeros(1, *engine.io.inputs[0].shape[1:])
assert engine(x, torch.ones(1)).shape == x.shape
conditions = {{s.name: torch.zeros(2, *s.shape[1:], dtype=getattr(torch, s.dtype)) for s in condition_specs(engine)}}
out = sample(engine, read_manifest({str(onnx_engine_dir)!r})["sampler"], batch=2, num_steps=3, conditions=conditions)
assert out.shape[0] == 2 and bool(out.isfinite().all())
import diffexport.deploy.triton.backend, diffexport.deploy.triton.config  # the Triton models' imports
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY!r}))
print(heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_is_tensordict_matches_isinstance_without_importing_tensordict():
    from tensordict import TensorDict

    from diffexport.diffusion.base import is_tensordict

    td = TensorDict({"a": torch.zeros(2, 3)}, batch_size=[2])
    assert is_tensordict(td) and not is_tensordict({"a": torch.zeros(2, 3)}) and not is_tensordict(torch.zeros(2))
    assert not is_tensordict(None)


# --- the AOTInductor worker process (engines.build compiles AOTI there beside the other targets) ---

def _linear_program():
    """A tiny exported program (Linear + sin, dynamic batch) that AOTInductor compiles in seconds."""
    from torch.export import Dim

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()).eval()
    x = torch.randn(2, 4)
    return net, torch.export.export(net, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=8)},))


def test_aoti_worker_compiles_in_a_child_and_reraises_its_errors(tmp_path):
    from diffexport.export.worker import AotiWorker

    net, program = _linear_program()
    io = io_spec(tiny_recipe())  # any IOSpec: export_aoti only passes it through
    worker = AotiWorker({"good": (program, tmp_path / "a.pt2", "fp32"), "next": (program, tmp_path / "b.pt2", "fp32")}, io, "cpu",
                        tmp_path / "work")  # close() kills the child still compiling "next"
    try:
        fields, seconds = worker.result("good")
        assert fields["file"] == "a.pt2" and seconds > 0 and (tmp_path / "a.pt2").is_file()
        x = torch.randn(5, 4)
        assert torch.allclose(torch._inductor.aoti_load_package(str(tmp_path / "a.pt2"))(x), net(x), atol=1e-6)
    finally:
        worker.close()
    assert not (tmp_path / "work").exists() and all(p.returncode is not None for p in worker.processes)

    worker = AotiWorker({"cuda": (program, tmp_path / "c.pt2", "fp32")}, io, "tpu", tmp_path / "work")  # device refused
    try:
        with pytest.raises(ValueError, match="export.device must be 'cpu' or 'cuda', got 'tpu'"):
            worker.result("cuda")
    finally:
        worker.close()
    assert not (tmp_path / "c.pt2").exists()


def test_aoti_worker_dies_with_its_killed_parent(tmp_path):
    """A build killed with SIGKILL leaves no compile running (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import time

    from diffexport.export.worker import AotiWorker

    _, program = _linear_program()
    io, pid_file = io_spec(tiny_recipe()), tmp_path / "worker.pid"
    pid = os.fork()
    if pid == 0:  # the "build": starts the worker, then is killed
        try:
            worker = AotiWorker({"a": (program, tmp_path / "a.pt2", "fp32")}, io, "cpu", tmp_path / "work")
            pid_file.write_text(str(worker.processes[0].pid))
            time.sleep(1.0)  # the child is importing torch / compiling
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(3)
    os.waitpid(pid, 0)
    child = int(pid_file.read_text())

    def alive() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(), "the AOTI worker outlived its killed parent"
