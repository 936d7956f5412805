"""Runtime sampler over engines: reproducibility, NaN guard, batching, conditions, patching, CLI, bench.

Engines come from the session fixtures of conftest.py (randomised weights): ``onnx_engine_dir``
(quickstart, unconditional, batch 1..16, Heun x 18) and ``built_conditional`` (image + vector
conditions, onnx and aoti, batch 1..4, Heun x 6).
"""

from __future__ import annotations

import json
import math
import time

import matplotlib.image
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffexport.cli import app
from diffexport.diffusion import samplers
from diffexport.diffusion.utils import edm_x0_predictor
from diffexport.engines import EngineError, load, read_manifest
from diffexport.recipes import IOSpec, TensorSpec
from diffexport.runtime import BatchedEngine, CUDAGraphEngine, SamplerSpec, SamplingError, check_conditions, sample, save_png_grid
from diffexport.runtime.bench import CpuShare, bench_engine, machine_load, round_robin
from diffexport.runtime.images import to_grid

FINAL_RTOL = 1e-4  # the fp32 trajectory tolerance


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def spec_of(engine_dir, **changes) -> SamplerSpec:
    return SamplerSpec.from_manifest({**read_manifest(engine_dir)["sampler"], **changes})


@pytest.fixture(scope="module")
def quick(onnx_engine_dir):
    return load(onnx_engine_dir, "onnxruntime")


@pytest.fixture(scope="module")
def conditional(built_conditional):
    return load(built_conditional, "onnxruntime")


def conditions(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"cond": torch.randn(batch, 3, 16, 16, generator=g), "class_labels": torch.randn(batch, 4, generator=g)}


def test_stochastic_sampler_is_reproducible_from_a_seed(quick, onnx_engine_dir):
    spec = spec_of(onnx_engine_dir, solver="edm_stochastic_heun", solver_options={"S_churn": 20.0}, time_steps=None, num_steps=6)
    a, b = sample(quick, spec, batch=3, seed=7), sample(quick, spec, batch=3, seed=7)
    assert torch.equal(a, b)
    assert not torch.allclose(a, sample(quick, spec, batch=3, seed=8))
    # same latents, different per-step noise: the churn really draws from the seeded generator
    latents = torch.randn(3, 3, 16, 16) * 80
    assert not torch.allclose(sample(quick, spec, latents=latents, seed=1), sample(quick, spec, latents=latents, seed=2))


class NaNAtCall:
    """An engine wrapper whose ``call``-th call (0-based) returns NaN."""

    def __init__(self, engine, call: int):
        self.engine, self.call, self.calls = engine, call, 0
        self.backend, self.io, self.device = "nan-injector", engine.io, engine.device

    def __call__(self, x, sigma, **conditions):
        out = self.engine(x, sigma, **conditions)
        self.calls += 1
        return out * float("nan") if self.calls - 1 == self.call else out


def test_nan_is_caught_naming_step_sigma_and_backend(quick, onnx_engine_dir):
    spec = spec_of(onnx_engine_dir)
    k = 5  # Heun evaluates twice per step: call 2k is the first evaluation of step k, at σ_k
    with pytest.raises(SamplingError) as err:
        sample(NaNAtCall(quick, 2 * k), spec, batch=2)
    message = str(err.value)
    assert f"step {k} " in message and f"sigma={float(spec.edm_sigmas()[k]):g}" in message and "nan-injector" in message


def test_sample_latents_cli_matches_diffusion_sample_on_reference(onnx_engine_dir, tmp_path):
    latents = (80 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))).numpy()
    np.save(tmp_path / "latents.npy", latents)
    out = tmp_path / "samples.npy"
    result = CliRunner().invoke(app, ["sample", str(onnx_engine_dir), "--latents", str(tmp_path / "latents.npy"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (2, 3, 16, 16)
    assert matplotlib.image.imread(out.with_suffix(".png")).shape[-1] == 3  # the grid next to it

    spec = spec_of(onnx_engine_dir)
    assert spec.solver == "heun"
    reference = load(onnx_engine_dir, "torch").denoiser
    denoiser = spec.scheduler.get_denoiser(x0_predictor=edm_x0_predictor(lambda x, s: reference(x, s), spec.scheduler))
    with torch.no_grad():
        want = samplers.sample(denoiser, torch.from_numpy(latents), spec.scheduler, spec.num_steps, solver="heun")
    assert rel_l2(torch.from_numpy(got), want) <= FINAL_RTOL


def test_sample_cli_errors_name_the_file(onnx_engine_dir, built_conditional, tmp_path):
    runner = CliRunner()
    np.save(tmp_path / "bad_latents.npy", np.zeros((2, 3, 8, 8), np.float32))
    r = runner.invoke(app, ["sample", str(onnx_engine_dir), "--latents", str(tmp_path / "bad_latents.npy"), "--out", str(tmp_path / "o.npy")])
    assert r.exit_code != 0 and "bad_latents.npy" in r.output and "[N, 3, 16, 16]" in r.output
    r = runner.invoke(app, ["sample", str(onnx_engine_dir), "--latents", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o.npy")])
    assert r.exit_code != 0 and "missing.npy" in r.output and "not found" in r.output
    np.save(tmp_path / "cond.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros((2, 4), np.float32))
    r = runner.invoke(app, ["sample", str(built_conditional), "-c", f"cond={tmp_path / 'cond.npy'}", "-c",
                            f"class_labels={tmp_path / 'labels.npy'}", "--out", str(tmp_path / "o.npy")])
    assert r.exit_code != 0 and "cond.npy" in r.output and "'cond'" in r.output
    assert not (tmp_path / "o.npy").exists()


class Recorder:
    """A fake engine: ``x * sigma``, batch range [2, 3], recording the batch of every call."""

    backend, device = "fake", torch.device("cpu")
    io = IOSpec([TensorSpec("x", [-1, 1, 2, 2]), TensorSpec("sigma", [-1])], [TensorSpec("denoised", [-1, 1, 2, 2])], {"min": 2, "max": 3})

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma):
        assert 2 <= x.shape[0] <= 3
        self.batches.append(x.shape[0])
        return x * sigma[:, None, None, None]


def test_batched_engine_chunks_and_pads():
    engine = Recorder()
    x, sigma = torch.randn(4, 1, 2, 2), torch.arange(4.0) + 1
    out = BatchedEngine(engine)(x, sigma)
    assert engine.batches == [3, 2]  # 3 rows, then 1 row padded to the minimum of 2
    assert torch.equal(out, x * sigma[:, None, None, None])


def test_check_conditions_broadcasts_casts_and_names_the_culprit():
    io = IOSpec([TensorSpec("x", [-1, 1, 2, 2], kind="x"), TensorSpec("sigma", [-1], kind="sigma"),
                 TensorSpec("label", [-1, 4], kind="vector"), TensorSpec("lead", [-1], "int64", "index", high=4)], [], {"min": 1, "max": 8})
    engine = type("E", (), {"io": io, "device": torch.device("cpu"), "backend": "fake"})()
    out = check_conditions(engine, {"label": torch.ones(4, dtype=torch.float64), "lead": torch.tensor([1.0, 2.0, 3.0])}, 3)
    assert out["label"].shape == (3, 4) and out["label"].dtype == torch.float32
    assert out["lead"].dtype == torch.int64 and out["lead"].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="lead.*non-integer"):
        check_conditions(engine, {"label": torch.ones(3, 4), "lead": torch.tensor([0.5, 1.0, 2.0])}, 3)
    with pytest.raises(ValueError, match=r"labels.npy: condition 'label'.*\[3, 4\]"):
        check_conditions(engine, {"label": torch.ones(2, 4), "lead": torch.zeros(3)}, 3, sources={"label": "labels.npy"})
    with pytest.raises(ValueError, match="missing \\['lead'\\]"):
        check_conditions(engine, {"label": torch.ones(3, 4)}, 3)
    for lead, bad in (([0, 4, 1], "4 at row 1"), ([2.0, 3.0, -1.0], "-1 at row 2"), (7, "7 at row 0")):
        with pytest.raises(ValueError, match=rf"^lt.npy: condition 'lead' holds {bad}, outside its range \[0, 4\)$"):
            check_conditions(engine, {"label": torch.ones(3, 4), "lead": torch.tensor(lead)}, 3, sources={"lead": "lt.npy"})


def test_conditional_sampling_in_chunks_matches_one_call(conditional, built_conditional):
    spec = spec_of(built_conditional)
    cond = conditions(5)  # batch 5 > the engine's max of 4
    a = sample(conditional, spec, conditions=cond, seed=3)
    b = sample(conditional, spec, conditions=cond, seed=3, chunk=1)
    assert a.shape == (5, 2, 16, 16) and torch.isfinite(a).all()
    assert rel_l2(a, b) <= 1e-6
    one = sample(conditional, spec, conditions={k: v[:1] for k, v in cond.items()}, batch=2, seed=3)
    assert not torch.equal(one[0], one[1])  # one condition repeated over the batch, different noise per sample


def test_patching_with_one_patch_equals_unpatched_and_tiles_larger_images(conditional, built_conditional):
    spec = spec_of(built_conditional)
    cond = conditions(2)
    plain = sample(conditional, spec, conditions=cond, seed=4)
    one_patch = sample(conditional, spec_of(built_conditional, patching={"img_shape": [16, 16], "overlap_pix": 0, "boundary_pix": 0}),
                       conditions=cond, seed=4)
    assert rel_l2(one_patch, plain) <= 1e-6
    big = spec_of(built_conditional, patching={"img_shape": [24, 20], "overlap_pix": 4, "boundary_pix": 2})
    g = torch.Generator().manual_seed(5)
    out = sample(conditional, big, conditions={"cond": torch.randn(2, 3, 24, 20, generator=g), "class_labels": torch.randn(2, 4, generator=g)})
    assert out.shape == (2, 2, 24, 20) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="'cond'.*24, 20"):  # image conditions come at the full image size
        sample(conditional, big, conditions=cond)


def test_cuda_graphs_refuse_cpu_engines(quick):
    with pytest.raises(ValueError, match="CUDA device"):
        CUDAGraphEngine(quick)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph replay needs a CUDA GPU (none on this machine)")
def test_cuda_graph_sampling_matches_eager(onnx_engine_dir):
    engine = load(onnx_engine_dir, "torch", device="cuda")
    spec = spec_of(onnx_engine_dir)
    assert rel_l2(sample(engine, spec, batch=2, cuda_graph=True), sample(engine, spec, batch=2)) <= 1e-6


def test_png_grid_roundtrip(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 1, 4, 6)).astype(np.float32)
    path = save_png_grid(x, tmp_path / "grid.png")
    assert np.array_equal(np.round(matplotlib.image.imread(path) * 255).astype(np.uint8), to_grid(x)[..., 0])


def test_round_robin_times_blocks_of_back_to_back_calls_in_turn():
    """Each turn: one untimed wake-up call, then up to ``block`` timed calls; runners alternate per
    turn; exactly ``repeats`` calls are timed (the median of those is reported)."""
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    result = round_robin(fns, set(), repeats=4, warmup=1, pause=0, block=3)
    assert set(result) == {"a", "b"} and all(v >= 0 for v in result.values())
    assert order == ["a", "b"] + ["a"] * 4 + ["b"] * 4 + ["a"] * 2 + ["b"] * 2  # warm-up, turn (1 + 3), turn (1 + 1)
    order.clear()
    round_robin(fns, set(), repeats=2, warmup=0, pause=0)  # block 1: single calls, no wake-up call
    assert order == ["a", "b", "a", "b"]


def test_cpu_share_sees_another_process_and_not_its_own_work():
    """The load average counts the benchmark's own threads; CpuShare separates them from others'."""
    import subprocess
    import sys
    import time

    share = CpuShare()
    time.sleep(1.0)
    idle = share.stop()  # whatever else runs on the machine anyway
    share = CpuShare()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:  # this process busy (one CPU): not "others"
        pass
    own = share.stop()
    assert own["others_cpus"] is not None and own["others_cpus"] - idle["others_cpus"] < 0.5, (idle, own)
    share = CpuShare()
    subprocess.run([sys.executable, "-c", "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"], check=True)
    other = share.stop()
    assert other["others_cpus"] > 0.5 and "other processes" in other["warning"], other


def test_machine_load_watches_other_processes_not_the_load_average():
    """Work that just ended (the build's stages before the rank stage) raises the load average but is
    no reason to call the machine busy; another process spinning during the watch window is."""
    import subprocess
    import sys

    end = time.monotonic() + 1.0
    while time.monotonic() < end:  # this process's own work just before: not "busy"
        pass
    quiet = machine_load(window=0.3)
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass"])
    try:
        time.sleep(0.5)  # the child's interpreter is up and spinning
        busy = machine_load(window=1.0)
    finally:
        child.kill()
        child.wait()
    assert busy["others_cpus"] > 0.5 and "busy" in busy["warning"], busy
    assert quiet["load_average"] > 0 and quiet["cores"] >= 1  # recorded, yet not what the warning is based on


@pytest.mark.parametrize("policy, warned", [(None, False), ("passive", True), ("ACTIVE", True), ("TRUE", False)])
def test_machine_load_warns_about_an_openmp_wait_policy_that_skews_the_comparison(monkeypatch, policy, warned):
    """PASSIVE handicaps the OpenMP runners (torch eager, AOTInductor: every op wakes sleeping threads), ACTIVE
    slows the runner after them; OpenMP's default (unset) is the fair one."""
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    warning = machine_load(window=0.05)["warning"] or ""
    assert ("OMP_WAIT_POLICY=" in warning) == warned, warning


def test_bench_reports_every_backend_beside_torch(onnx_engine_dir, tmp_path):
    result = bench_engine(onnx_engine_dir, ["onnxruntime"], [1, 2], repeats=1, warmup=0)
    rows = {(r["backend"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)}
    assert rows["torch", 2]["call_vs_torch"] == 1.0 and rows["onnxruntime", 2]["call_vs_torch"] > 0
    assert rows["torch", 1]["gflop_per_call"] > 0
    assert rows["torch", 2]["gflop_per_call"] == pytest.approx(2 * rows["torch", 1]["gflop_per_call"], rel=1e-6)
    assert all(r["nfe"] == 35 for r in rows.values())  # Heun x 18 skips the last correction
    r = CliRunner().invoke(app, ["bench", str(onnx_engine_dir), "--batch", "1", "--repeats", "1", "--no-sample", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    assert {row["backend"] for row in json.loads((tmp_path / "b.json").read_text())["rows"]} == {"torch", "onnxruntime"}


def test_patching_refuses_an_image_smaller_than_the_engines_patch():
    engine = Recorder()  # 2x2 patches
    spec = SamplerSpec.from_manifest({"scheduler": {"class": "EDMNoiseScheduler", "args": {}}, "solver": "euler", "num_steps": 2,
                                      "patching": {"img_shape": [1, 6], "overlap_pix": 0, "boundary_pix": 0}})
    with pytest.raises(ValueError, match=r"img_shape: \[1, 6\] is smaller than the engine's 2x2 patch"):
        sample(engine, spec, batch=2)


def test_sample_cli_cycles_labels_over_the_latents_batch(built_dhariwal, tmp_path):
    """--label (and NAME=0,1) cycle over the number of samples, which --latents sets as --batch does."""
    np.save(tmp_path / "latents.npy", (80 * np.random.default_rng(0).normal(size=(3, 3, 16, 16))).astype(np.float32))
    out = tmp_path / "o.npy"
    for labels in (["--label", "1,2"], ["-c", "class_labels=1,2"]):
        r = CliRunner().invoke(app, ["sample", str(built_dhariwal), "--latents", str(tmp_path / "latents.npy"), *labels,
                                     "--steps", "2", "--out", str(out), "--overwrite"])
        assert r.exit_code == 0, r.output
        assert np.load(out).shape == (3, 3, 16, 16)


def test_sample_cli_refuses_more_inline_labels_than_the_batch(built_dhariwal, built_lead_time, tmp_path):
    """``--label 0,1,2,3`` (or ``-c NAME=0,1,2,3``) with --batch 2 was cut to the first 2 labels silently;
    it is refused in one line naming the option, the number of values and the batch (--batch or --latents).
    A condition .npy whose batch differs from --batch is refused naming the file and shapes."""
    runner, out = CliRunner(), tmp_path / "o.npy"
    np.save(tmp_path / "latents.npy", (80 * np.random.default_rng(0).normal(size=(2, 3, 16, 16))).astype(np.float32))
    cases = ((built_dhariwal, ["--label", "0,1,2,3"], "--label"), (built_dhariwal, ["-c", "class_labels=0,1,2,3"], "--condition class_labels"),
             (built_lead_time, ["-c", "lead_time_label=0,1,2,3"], "--condition lead_time_label"))
    for engine_dir, args, option in cases:
        sizes = [(["--batch", "2"], "--batch 2")]
        if engine_dir == built_dhariwal:
            sizes.append((["--latents", str(tmp_path / "latents.npy")], f"the rows of --latents {tmp_path / 'latents.npy'}"))
        for size, source in sizes:
            r = runner.invoke(app, ["sample", str(engine_dir), *size, *args, "--steps", "1", "--out", str(out)])
            assert r.exit_code == 1 and not out.exists(), r.output
            assert r.output.strip() == (f"error: {option}: 4 values for a batch of 2 ({source}); give at most 2 "
                                        "(fewer are cycled over the batch)"), r.output
    r = runner.invoke(app, ["sample", str(built_dhariwal), "--batch", "4", "--label", "0,1,2,3", "--steps", "1", "--out", str(out)])
    assert r.exit_code == 0 and np.load(out).shape == (4, 3, 16, 16), r.output  # as many values as samples: fine
    np.save(tmp_path / "lt.npy", np.array([0, 1, 2]))
    r = runner.invoke(app, ["sample", str(built_lead_time), "--batch", "2", "-c", f"lead_time_label={tmp_path / 'lt.npy'}",
                            "--steps", "1", "--out", str(out), "--overwrite"])
    assert r.exit_code == 1 and r.output.strip() == (f"error: {tmp_path / 'lt.npy'}: condition 'lead_time_label' (index) must "
                                                     "have shape [2] or [], got [3]"), r.output


def test_sample_cli_refuses_more_class_indices_than_the_batch(built_dhariwal, tmp_path):
    """A class-index file longer than the batch (--batch or --latents) was cut to the batch silently; it is
    refused naming the file, the condition, its rows and the batch, as a one-hot file with too many rows is.
    A shorter one still cycles; without a batch the file sets it."""
    runner, out = CliRunner(), tmp_path / "o.npy"
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, 3, 1]))
    np.save(tmp_path / "onehot.npy", np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1]])
    np.save(tmp_path / "latents.npy", (80 * np.random.default_rng(0).normal(size=(3, 3, 16, 16))).astype(np.float32))
    for size in (["--batch", "3"], ["--latents", str(tmp_path / "latents.npy")]):
        r = runner.invoke(app, ["sample", str(built_dhariwal), *size, "-c", f"class_labels={tmp_path / 'labels.npy'}", "--out", str(out)])
        assert r.exit_code == 1 and not out.exists(), r.output
        assert f"{tmp_path / 'labels.npy'}: condition 'class_labels' (class indices) must have at most 3 rows, the batch" in r.output
        assert "got 5" in r.output and "Traceback" not in r.output
        r = runner.invoke(app, ["sample", str(built_dhariwal), *size, "-c", f"class_labels={tmp_path / 'onehot.npy'}", "--out", str(out)])
        assert r.exit_code == 1 and "condition 'class_labels'" in r.output and "[5, 4]" in r.output, r.output
    r = runner.invoke(app, ["sample", str(built_dhariwal), "-c", f"class_labels={tmp_path / 'labels.npy'}", "--steps", "1", "--out", str(out)])
    assert r.exit_code == 0 and np.load(out).shape == (5, 3, 16, 16), r.output
    r = runner.invoke(app, ["sample", str(built_dhariwal), "--batch", "7", "-c", f"class_labels={tmp_path / 'labels.npy'}", "--steps", "1",
                            "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and np.load(out).shape == (7, 3, 16, 16), r.output


class ConvEngine:
    """A fake float32 engine: EDM-preconditioned D around a small random conv net (x [B, 2, 8, 8], batch [1, 4])."""

    backend, device = "fake", torch.device("cpu")
    io = IOSpec([TensorSpec("x", [-1, 2, 8, 8], kind="x"), TensorSpec("sigma", [-1], kind="sigma")],
                [TensorSpec("denoised", [-1, 2, 8, 8])], {"min": 1, "max": 4})

    def __init__(self, seed: int = 0) -> None:
        from diffexport.models.init import randomize_

        self.net = randomize_(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 2, 3, padding=1)), seed=seed)

    @torch.no_grad()
    def __call__(self, x, sigma):
        assert x.dtype == sigma.dtype == torch.float32, (x.dtype, sigma.dtype)
        s = sigma[:, None, None, None]
        c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, (s.log() / 4).expand(-1, 1, 8, 8)], 1))


def edm_heun_float64(engine, latents: torch.Tensor, sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """EDM's generate.py (Alg. 1) written out: float64 steps and state, the engine called in float32."""
    i = torch.arange(n, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps, x = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)]), latents.double()

    def D(x, t):
        return engine(x.float(), torch.full((x.shape[0],), float(t), dtype=torch.float32)).double()

    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        d_cur = (x - D(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if t_next > 0:
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * (x_next - D(x_next, t_next)) / t_next)
        x = x_next
    return x


@pytest.mark.parametrize("sigma_min, sigma_max, n", [(0.002, 80.0, 2), (0.002, 80.0, 18), (1.0, 22026.0, 2)])
def test_state_is_float64_as_in_edm(sigma_min, sigma_max, n):
    """The solver state is float64 and the engine gets float32 (EDM's generate.py): a float32 state differed
    from this by 8e-6 (2 Heun steps from 80) and 2e-3 (22026 -> 1); the samples stay float32."""
    engine = ConvEngine()
    latents = sigma_max * torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = {"scheduler": {"class": "EDMNoiseScheduler", "args": {"sigma_min": sigma_min, "sigma_max": sigma_max}},
               "solver": "heun", "num_steps": n, "solver_options": {}}
    out = sample(engine, sampler, latents=latents)
    want = edm_heun_float64(engine, latents, sigma_min, sigma_max, n)
    assert out.dtype == torch.float32 and rel_l2(out, want) <= 1e-6, rel_l2(out, want)
    states = []
    sample(engine, sampler, latents=latents, on_step=lambda i, t_cur, t_next, x: states.append((t_cur.dtype, x.dtype)))
    assert states == [(torch.float64, torch.float64)] * n


def edm_stochastic_heun_float64(engine, latents, t_steps, S_churn, round_sigma, generator) -> torch.Tensor:
    """EDM's generate.py (Alg. 2, S_min = 0, S_max = inf, S_noise = 1) written out, with the network's
    ``round_sigma`` on the time steps and on t_hat; float64 state, the engine called in float32."""
    t_steps = torch.cat([round_sigma(t_steps[:-1]), torch.zeros(1, dtype=torch.float64)])
    x, gamma = latents.double(), min(S_churn / (len(t_steps) - 1), math.sqrt(2) - 1)

    def D(x, t):
        return engine(x.float(), torch.full((x.shape[0],), float(t), dtype=torch.float32)).double()

    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = x + (t_hat**2 - t_cur**2).sqrt() * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if t_next > 0:
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * (x - D(x, t_next)) / t_next)
    return x


def test_iddpm_churn_rounds_the_raised_level_to_the_preconditioners_table():
    """iDDPM + edm_stochastic_heun: t_hat = round_sigma(t + gamma t) as in EDM and PhysicsNeMo's stochastic
    sampler, so the engine only ever sees levels of the table it was trained on (it got the exact t_hat, for
    which the iDDPM preconditioner conditions on the nearest level while c_skip / c_out use t_hat)."""
    from diffexport.diffusion.preconditioners import IDDPMPreconditioner
    from diffexport.engines.build import sampler_schedule
    from diffexport.export import validate_recipe
    from tests.conftest import TINY_RECIPES

    recipe = validate_recipe({**TINY_RECIPES["quickstart"], "preconditioner": {"class": "IDDPMPreconditioner", "args": {}},
                              "sampler": {"scheduler": {"class": "IDDPMNoiseScheduler", "args": {}}, "solver": "edm_stochastic_heun",
                                          "num_steps": 8, "solver_options": {"S_churn": 40}}})
    manifest = sampler_schedule(recipe)
    assert manifest["round_sigma"] == {"class": "IDDPMPreconditioner", "args": {"C_1": 0.001, "C_2": 0.008, "M": 1000}}
    table = IDDPMPreconditioner(torch.nn.Identity()).u  # float32, as the engine compares sigma with it
    assert all(step["churn"]["t_hat"] in IDDPMPreconditioner.sigma_levels().tolist() for step in manifest["steps"])
    seen, engine = [], ConvEngine()

    class Recording:
        backend, device, io = engine.backend, engine.device, engine.io

        def __call__(self, x, sigma):
            seen.append(sigma)
            return engine(x, sigma)

    latents = manifest["sigmas"][0] * torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample(Recording(), manifest, latents=latents, seed=5)
    assert all(bool(torch.isin(s, table).all()) for s in seen), [s[0].item() for s in seen if not torch.isin(s, table).all()]
    pre = IDDPMPreconditioner(torch.nn.Identity()).double()
    want = edm_stochastic_heun_float64(engine, latents, torch.tensor(manifest["time_steps"], dtype=torch.float64), 40, pre.round_sigma,
                                       torch.Generator().manual_seed(5))
    assert rel_l2(out, want) <= 1e-6, rel_l2(out, want)
    steps = samplers.sample_step_table(engine, latents.double(), manifest["steps"], torch.Generator().manual_seed(5), torch.float32)
    assert rel_l2(out, steps) <= 1e-6


def test_iddpm_preconditioner_rounds_the_time_steps_of_any_scheduler():
    """With IDDPMPreconditioner, EDM's samplers (generate.py edm_sampler / ablation_sampler, PhysicsNeMo's stochastic
    sampler) take ``t_steps = sigma_inv(net.round_sigma(sigma(t)))`` whatever the discretisation. An EDM or VP schedule's
    steps were used unrounded (the engine saw sigma 80 and 0.0065, off its table); the build's time steps, the runtime's
    re-discretisation (--steps) and so the samples now follow EDM. Steps that would repeat a level are refused."""
    from diffexport.diffusion import EDMNoiseScheduler
    from diffexport.diffusion.preconditioners import IDDPMPreconditioner
    from diffexport.engines.build import sampler_schedule
    from diffexport.export import validate_recipe
    from diffexport.recipes import RecipeError
    from tests.conftest import TINY_RECIPES

    levels = IDDPMPreconditioner.sigma_levels()
    base = {**TINY_RECIPES["quickstart"], "preconditioner": {"class": "IDDPMPreconditioner", "args": {}}}
    edm = {"class": "EDMNoiseScheduler", "args": {"sigma_min": 0.0065, "sigma_max": 80.0}}
    for scheduler, n in ((edm, 8), ({"class": "VPNoiseScheduler", "args": {}}, 6)):
        manifest = sampler_schedule(validate_recipe({**base, "sampler": {"scheduler": scheduler, "solver": "heun", "num_steps": n}}))
        for sigmas in (torch.tensor(manifest["sigmas"][:-1], dtype=torch.float64), SamplerSpec.from_manifest(manifest).with_steps(5).edm_sigmas()[:-1]):
            torch.testing.assert_close(sigmas, levels[(sigmas[:, None] - levels[None]).abs().argmin(1)], rtol=1e-12, atol=0)
        assert manifest["time_steps"][-1] == 0 and manifest["steps"][0]["evals"][0]["sigma"] == manifest["sigmas"][0]
    manifest = sampler_schedule(validate_recipe({**base, "sampler": {"scheduler": edm, "solver": "heun", "num_steps": 8}}))
    engine = ConvEngine()
    latents = manifest["sigmas"][0] * torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample(engine, manifest, latents=latents, seed=5)
    edm_steps = EDMNoiseScheduler(0.0065, 80.0).timesteps(8, dtype=torch.float64)  # EDM rounds these itself
    want = edm_stochastic_heun_float64(engine, latents, edm_steps, 0, IDDPMPreconditioner(torch.nn.Identity()).double().round_sigma,
                                       torch.Generator().manual_seed(5))
    assert rel_l2(out, want) <= 1e-6, rel_l2(out, want)
    with pytest.raises(RecipeError, match=r"sampler\.num_steps: 18 steps of EDMNoiseScheduler rounded to IDDPMPreconditioner's noise "
                                          r"levels .* repeat the level 0\.006425; .* \(the lowest is 0\.006425; EDM raises sigma_min to it\)"):
        validate_recipe({**base, "sampler": {"scheduler": {"class": "EDMNoiseScheduler", "args": {}}, "solver": "heun", "num_steps": 18}})


def _sample_lead_time(engine_dir, tmp_path, value, *extra):
    """``diffexport sample`` of the lead-time engine with ``-c lead_time_label=value``, 4 samples x 2 steps:
    (result, samples or None)."""
    out = tmp_path / "o.npy"
    r = CliRunner().invoke(app, ["sample", str(engine_dir), "-c", f"lead_time_label={value}", "--batch", "4",
                                 "--steps", "2", "--out", str(out), "--overwrite", *extra])
    return r, (np.load(out) if r.exit_code == 0 else None)


def test_index_condition_out_of_range_is_refused_in_one_line(built_lead_time, tmp_path):
    """``lead_time_label`` (lead_time_steps 4) takes values in [0, 4), recorded in the io; a file or an
    engine call outside it is refused in one line naming the tensor, value and range (ONNX Runtime
    raised a GatherND error, or used the last lead time for -1)."""
    spec = next(s for s in read_manifest(built_lead_time)["io"]["inputs"] if s["kind"] == "index")
    assert spec == {"name": "lead_time_label", "shape": [-1], "dtype": "int64", "kind": "index", "high": 4}
    for values, bad in (([1, 9, 0, 0], "9 at row 1"), ([-1, 0, 0, 0], "-1 at row 0")):
        np.save(tmp_path / "lt.npy", np.array(values))
        r, _ = _sample_lead_time(built_lead_time, tmp_path, tmp_path / "lt.npy")
        assert r.exit_code == 1 and r.output.strip() == f"error: {tmp_path / 'lt.npy'}: condition 'lead_time_label' holds {bad}, outside its range [0, 4)"
    np.save(tmp_path / "lt.npy", np.array([0, 3, 1, 2]))
    assert _sample_lead_time(built_lead_time, tmp_path, tmp_path / "lt.npy")[0].exit_code == 0
    engine = load(built_lead_time, "onnxruntime")
    with pytest.raises(EngineError, match=r"^onnxruntime: input 'lead_time_label' holds 4 at row 1, outside its range \[0, 4\)$"):
        engine(torch.randn(2, 2, 16, 16), torch.ones(2), lead_time_label=torch.tensor([0, 4]))


def test_index_condition_given_as_integers_on_the_cli(built_lead_time, tmp_path):
    """``-c lead_time_label=3`` (was refused as "class labels need a vector condition") and ``=0,1``
    (cycled over --batch) sample as the same values from a file; values outside [0, 4) are refused."""
    np.save(tmp_path / "lt.npy", np.array([0, 1, 0, 1]))
    by_file, (r, by_list) = _sample_lead_time(built_lead_time, tmp_path, tmp_path / "lt.npy")[1], _sample_lead_time(built_lead_time, tmp_path, "0,1")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(by_list, by_file)
    np.save(tmp_path / "lt.npy", np.array([3, 3, 3, 3]))
    by_file, (r, by_scalar) = _sample_lead_time(built_lead_time, tmp_path, tmp_path / "lt.npy")[1], _sample_lead_time(built_lead_time, tmp_path, "3")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(by_scalar, by_file)
    assert np.abs(by_scalar - by_list).max() > 1e-4  # the lead time reaches the model
    for value, bad in (("9", "9 at row 0"), ("0,-2", "-2 at row 1")):
        r, _ = _sample_lead_time(built_lead_time, tmp_path, value)
        assert r.exit_code == 1 and r.output.strip() == f"error: --condition lead_time_label={value}: condition 'lead_time_label' holds {bad}, outside its range [0, 4)"


# --- property: every sampler the recipe validation accepts runs on an engine, finite, as its step table says ---------

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class GaussianEngine:
    """A fake engine: the exact denoiser of N(0.3, 0.5^2) data, batch range [1, 3] (chunks, padding)."""

    backend, device = "fake", torch.device("cpu")
    io = IOSpec([TensorSpec("x", [-1, 1, 2, 3], kind="x"), TensorSpec("sigma", [-1], kind="sigma")],
                [TensorSpec("denoised", [-1, 1, 2, 3])], {"min": 1, "max": 3})

    def __call__(self, x, sigma):
        assert x.dtype == sigma.dtype == torch.float32 and bool(torch.isfinite(sigma).all() and (sigma > 0).all()), sigma
        s2 = sigma[:, None, None, None] ** 2
        return (0.25 * x + 0.3 * s2) / (0.25 + s2)


def _log_uniform(lo: float, hi: float):
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


@st.composite
def _valid_samplers(draw):
    cls = draw(st.sampled_from(["EDMNoiseScheduler", "VENoiseScheduler", "VPNoiseScheduler", "IDDPMNoiseScheduler", "DDPMScheduler"]))
    args: dict = {}
    if cls in ("EDMNoiseScheduler", "VENoiseScheduler", "IDDPMNoiseScheduler") and draw(st.booleans()):
        lo = draw(_log_uniform(1e-4, 1.0))
        args = {"sigma_min": lo, "sigma_max": lo * draw(_log_uniform(2.0, 1e6))}
    if cls == "EDMNoiseScheduler" and draw(st.booleans()):
        args["rho"] = draw(_log_uniform(0.1, 20.0))
    if cls == "VPNoiseScheduler" and draw(st.booleans()):
        args = {"beta_min": draw(_log_uniform(1e-3, 1.0)), "beta_d": draw(_log_uniform(1.0, 30.0)), "epsilon_s": draw(_log_uniform(1e-5, 0.1))}
    if cls == "DDPMScheduler":
        solver, options = "ddim", {"eta": draw(st.sampled_from([0.0, 0.5, 1.0]))}
    else:
        solver = draw(st.sampled_from(["euler", "heun", "edm_stochastic_euler", "edm_stochastic_heun"]))
        options = {"S_churn": draw(st.sampled_from([0.0, 5.0, 80.0])), "S_min": 0.01} if solver.startswith("edm_") else {}
        if solver.endswith("heun"):
            options["alpha"] = draw(st.sampled_from([0.5, 1.0]))
    precond = {"class": "IDDPMPreconditioner", "args": {}} if cls == "IDDPMNoiseScheduler" and draw(st.booleans()) else None
    sampler = {"scheduler": {"class": cls, "args": args}, "solver": solver, "num_steps": draw(st.integers(1, 8)), "solver_options": options}
    return {"sampler": sampler, **({"preconditioner": precond} if precond else {})}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sampler=_valid_samplers(), batch=st.integers(1, 5))
@example(sampler={"sampler": {"scheduler": {"class": "VENoiseScheduler", "args": {}}, "solver": "heun", "num_steps": 2, "solver_options": {}}}, batch=2)
@example(sampler={"sampler": {"scheduler": {"class": "EDMNoiseScheduler", "args": {"rho": 0.25}}, "solver": "euler", "num_steps": 3,
                              "solver_options": {}}}, batch=1)
@example(sampler={"sampler": {"scheduler": {"class": "IDDPMNoiseScheduler", "args": {}}, "solver": "edm_stochastic_euler", "num_steps": 5,
                              "solver_options": {"S_churn": 80.0}}, "preconditioner": {"class": "IDDPMPreconditioner", "args": {}}}, batch=3)
def test_any_valid_sampler_runs_finite_and_as_its_step_table(sampler, batch):
    from diffexport.engines.build import sampler_schedule
    from diffexport.export import validate_recipe
    from tests.conftest import TINY_RECIPES

    try:
        recipe = validate_recipe({**TINY_RECIPES["quickstart"], **sampler})  # the sampler, with iDDPM's preconditioner or EDM's
    except ValueError:
        return  # refused by name (tests/test_recipes.py checks how)
    manifest = sampler_schedule(recipe)
    engine = GaussianEngine()
    latents = 3 * torch.randn(batch, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    out = sample(engine, manifest, latents=latents, seed=1)
    assert bool(torch.isfinite(out).all())
    table = samplers.sample_step_table(engine, latents.double(), manifest["steps"], torch.Generator().manual_seed(1), torch.float32)
    # both keep x in float64 and call the engine in float32 (a float32 state cancelled about sigma_max * 6e-8 of
    # it per step: EDM 22026 -> 1 in 2 Heun steps differed by 1.7e-3)
    assert rel_l2(out, table) <= 1e-5


@pytest.mark.parametrize("batch", [0, -2, True, 1.5])
def test_sample_refuses_a_batch_that_is_not_a_positive_int(batch):
    """``batch=0`` gave one sample (``batch or 1``); every non-positive or non-integer batch is refused by name."""
    sampler = {"scheduler": {"class": "EDMNoiseScheduler", "args": {}}, "solver": "heun", "num_steps": 2, "solver_options": {}}
    with pytest.raises(ValueError, match=r"^batch must be an int >= 1 \(the number of samples\), got"):
        sample(GaussianEngine(), sampler, batch=batch)
    assert sample(GaussianEngine(), sampler, batch=np.int64(2)).shape == (2, 1, 2, 3)


def test_bench_full_sample_of_a_conditional_engine(built_dhariwal):
    """``bench`` times whole samples of an engine with conditions (it drew none and failed: the quickstart has class labels)."""
    result = bench_engine(built_dhariwal, ["onnxruntime"], [1], repeats=1, warmup=0)
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"torch", "onnxruntime"} and all(r["sample_s"] > 0 and r["nfe"] > 0 for r in rows.values())
    assert all(0 <= r["loop_overhead"] < 1 for r in rows.values()), rows  # measured around the calls: never negative


def test_bench_loop_overhead_is_the_time_outside_the_engines_calls():
    """The loop share comes from the time measured inside the engine's calls, whatever their batch:
    with classifier-free guidance a B-sample step is one call of 2B rows, and NFE x (one call at B)
    was not the engine's share of the sample (the quickstart read 60 % for torch, -28 % for ONNX Runtime)."""
    from diffexport.runtime.bench import _Counting

    class Slow:
        backend, device, io = "fake", torch.device("cpu"), None

        def __call__(self, x, sigma):
            time.sleep(0.02 * x.shape[0])  # twice as long for 2B rows
            return x

    counting = _Counting(Slow())
    start = time.perf_counter()
    for _ in range(3):
        counting(torch.zeros(4, 1), torch.ones(4))  # B = 2 samples, CFG: 4 rows per call
    wall = time.perf_counter() - start
    assert counting.rows == 12 and 0.24 <= counting.seconds <= wall

