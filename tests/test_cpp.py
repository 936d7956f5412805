"""The embedded C++ runner (``diffexport-sample``) against the Python runtime sampler.

Engines: the shared ``aoti_engine_dir`` (tiny conditional SongUNet, built by ``build_engine``) and
one tiny engine of our own with an int64 ``index`` condition and batch range [2, 3] (the shared
one has no index input). The C++ project is built once into the shared cache (``build_tree``).
Every scheduler x solver pair the runner accepts is checked against ``diffexport.runtime.sample``
by rewriting the small engine's ``manifest.sampler`` (the engine contract D(x, σ) does not depend
on the sampler), the stochastic ones with the same seed: their noise must match draw for draw.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffexport.deploy.cpp import BINARY, build_tree, bundle, cpp_stage, missing_packages, runner_env, torch_lib_dir
from diffexport.engines.verdict import refusal

pytestmark = [
    pytest.mark.cpp,
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
    pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler (c++, g++, clang++)"),
]

N = 5  # rows per test: more than the engines' batch max, so the runner chunks


@pytest.fixture(scope="session")
def runner() -> Path:
    """The build folder with ``diffexport-sample`` and the ``embed`` example (one cached build)."""
    return build_tree(targets=(BINARY, "embed"))


@pytest.fixture(scope="session")
def engine_ok(aoti_engine_dir, tmp_path_factory) -> Path:
    """The shared AOTI engine (built without the parity stage, so ``unchecked``) marked verified
    (status ok, aoti passed), as a parity-checked build leaves it: the runner refuses it otherwise."""
    engine = shutil.copytree(aoti_engine_dir, tmp_path_factory.mktemp("cpp") / "tiny-conditional")
    edit_manifest(engine, lambda m: m.update(status="ok", parity={"backends": {"aoti": {"passed": True}}}))
    return engine


def manifest_of(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())


def edit_manifest(engine: Path, edit) -> None:
    manifest = manifest_of(engine)
    edit(manifest)
    (engine / "manifest.json").write_text(json.dumps(manifest))


def make_inputs(engine: Path, folder: Path, n: int = N, seed: int = 0) -> dict[str, Path]:
    """Seeded ``.npy`` files of ``n`` rows for every engine input: latents x_N = σ_max·ε, then the conditions."""
    rng, folder = np.random.default_rng(seed), Path(folder)
    manifest = manifest_of(engine)
    x, *conditions = [s for s in manifest["io"]["inputs"] if s["kind"] != "sigma"]
    paths = {"latents": folder / "latents.npy"}
    sampler = manifest["sampler"]
    scale = sampler["sigmas"][0] * sampler.get("alphas", [1.0])[0]  # sigma(t_0) of x_t = alpha x0 + sigma eps
    np.save(paths["latents"], (scale * rng.standard_normal((n, *x["shape"][1:]))).astype(np.float32))
    for s in conditions:
        paths[s["name"]] = folder / f"{s['name']}.npy"
        shape = (n, *s["shape"][1:])
        np.save(paths[s["name"]], rng.integers(0, 5, shape) if s["dtype"] == "int64" else rng.standard_normal(shape).astype(np.float32))
    return paths


def run(binary: Path, engine: Path, inputs: dict[str, Path], out: Path, *extra: str, skip: tuple[str, ...] = (), env=None):
    """The runner on ``inputs`` (no ``latents`` entry: ``extra`` must say ``--batch N``), libtorch on LD_LIBRARY_PATH."""
    cmd = [str(binary), "--engine", str(engine), "--out", str(out), "--threads", "1", *extra]
    if "latents" in inputs:
        cmd += ["--latents", str(inputs["latents"])]
    for name, path in inputs.items():
        if name != "latents" and name not in skip:
            cmd += ["--condition", f"{name}={path}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=runner_env() if env is None else env)


def python_samples(engine: Path, inputs: dict[str, Path], num_steps: int | None = None, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    """``diffexport.runtime.sample`` (the diffusion.samplers loop) on the same AOTI package."""
    from diffexport.engines.aoti import AOTIEngine
    from diffexport.recipes import IOSpec
    from diffexport.runtime.sampler import sample

    manifest = manifest_of(engine)
    aoti = AOTIEngine(engine / "denoiser.pt2", IOSpec.from_dict(manifest["io"]))
    arrays = {k: torch.from_numpy(np.load(p)) for k, p in inputs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the runner's --threads 1: two threads stall on a busy 2-core machine
    try:
        return sample(aoti, manifest["sampler"], latents=arrays.pop("latents", None), conditions=arrays, num_steps=num_steps, seed=seed, batch=batch)
    finally:
        torch.set_num_threads(threads)


def check_parity(runner: Path, engine: Path, inputs: dict[str, Path], out: Path, steps: int | None = None, seed: int = 0,
                 batch: int | None = None, denoised: bool = True) -> tuple[str, float]:
    """Run both samplers; assert relative L2 <= 1e-7 (same ATen kernels, float64 state: bit-exact here; a float32
    state in either differs by 1e-6 to 1e-3) and a denoised result; return the runner's log line and the error."""
    extra = [*(["--steps", str(steps)] if steps else []), "--seed", str(seed), *(["--batch", str(batch)] if batch else [])]
    done = run(runner / BINARY, engine, inputs, out, *extra)
    assert done.returncode == 0, done.stderr
    ours, ref = torch.from_numpy(np.load(out)), python_samples(engine, inputs, steps, seed, batch)
    assert ours.shape == ref.shape
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-7, f"C++ vs Python relative L2 {rel:.2e}"
    start = float(torch.from_numpy(np.load(inputs["latents"])).std()) if "latents" in inputs else 0.0
    if denoised and start > 10:  # VE-type latents (σ_max·ε): a clean sample is far smaller (VP/DDPM latents start at unit scale)
        assert float(ours.std()) < 0.1 * start, "not denoised"
    return done.stderr, rel


@pytest.mark.parametrize("solver,steps,batch_min", [("heun", None, 1), ("euler", None, 1), ("heun", 4, 1), ("heun", None, 2)])
def test_matches_python_sampler(engine_ok, runner, tmp_path, solver, steps, batch_min):
    """Heun (2N-1 evaluations) and Euler (N), the manifest's or a recomputed EDM schedule (--steps),
    N = 5 rows in chunks of the batch max 4; with batch min 2 the last chunk is padded."""
    engine = shutil.copytree(engine_ok, tmp_path / "engine")
    recorded = manifest_of(engine)["sampler"]
    set_sampler(engine, recorded["scheduler"]["class"], recorded["scheduler"]["args"], solver, recorded["num_steps"])
    edit_manifest(engine, lambda m: m["io"]["batch"].update(min=batch_min))
    num_steps = steps or recorded["num_steps"]
    log, _ = check_parity(runner, engine, make_inputs(engine, tmp_path), tmp_path / "out.npy", steps)
    assert f"{2 * num_steps - 1 if solver == 'heun' else num_steps} evaluations per batch" in log


@pytest.mark.parametrize("scheduler,args", [("EDMNoiseScheduler", {"sigma_min": 0.0065, "sigma_max": 80.0}), ("VPNoiseScheduler", {})])
def test_steps_override_rounds_to_the_iddpm_preconditioners_levels(engine_ok, runner, tmp_path, scheduler, args):
    """With ``sampler.round_sigma`` (IDDPMPreconditioner) an EDM or VP schedule re-discretised by --steps is rounded
    to the table as the Python runtime's (and EDM's) time steps are; the runner used the unrounded ones."""
    engine = shutil.copytree(engine_ok, tmp_path / "engine")
    set_sampler(engine, scheduler, args, "heun", 5, iddpm_levels=True)
    check_parity(runner, engine, make_inputs(engine, tmp_path), tmp_path / "out.npy", steps=4)


class IndexDenoiser(nn.Module):
    """EDM-preconditioned ``D(x, sigma, cond, lead)``: a conv over [x, cond] plus an embedding of the
    int64 index ``lead``, following the engine contract directly."""

    def __init__(self, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.sigma_data = sigma_data
        self.conv, self.lead, self.noise = nn.Conv2d(3, 2, 3, padding=1), nn.Embedding(5, 2), nn.Linear(1, 2)

    def forward(self, x, sigma, cond, lead):
        s, sd = sigma[:, None, None, None], self.sigma_data
        c_in, c_out, c_skip = 1 / (s**2 + sd**2).sqrt(), s * sd / (s**2 + sd**2).sqrt(), sd**2 / (s**2 + sd**2)
        emb = self.lead(lead) + self.noise(sigma.log()[:, None] / 4)
        return c_skip * x + c_out * torch.tanh(self.conv(torch.cat([c_in * x, cond], 1)) + emb[:, :, None, None])


@pytest.fixture(scope="session")
def index_engine_dir(tmp_path_factory) -> Path:
    """x [B, 2, 8, 8], an image and an int64 index condition, batch [2, 3]; one small AOTI compile."""
    from diffexport.diffusion import EDMNoiseScheduler
    from diffexport.engines.manifest import FORMAT, file_record, write_manifest
    from diffexport.export import export_aoti
    from diffexport.models.init import randomize_
    from diffexport.recipes import IOSpec, TensorSpec

    out = tmp_path_factory.mktemp("cpp") / "index"
    out.mkdir()
    io = IOSpec([TensorSpec("x", [-1, 2, 8, 8], kind="x"), TensorSpec("sigma", [-1], kind="sigma"),
                 TensorSpec("cond", [-1, 1, 8, 8], "float32", "image"), TensorSpec("lead", [-1], "int64", "index", high=5)],
                [TensorSpec("denoised", [-1, 2, 8, 8], kind="denoised")], {"min": 2, "opt": 2, "max": 3})
    g, batch = torch.Generator().manual_seed(0), torch.export.Dim("batch", min=2, max=3)
    example = (torch.randn(2, 2, 8, 8, generator=g), torch.tensor([0.5, 3.0]), torch.randn(2, 1, 8, 8, generator=g), torch.tensor([1, 4]))
    program = torch.export.export(randomize_(IndexDenoiser(), seed=1).eval(), example, dynamic_shapes=[{0: batch}] * 4, strict=False)
    art = export_aoti(program, io, out / "denoiser.pt2")
    scheduler = {"class": "EDMNoiseScheduler", "args": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}}
    times = EDMNoiseScheduler(**scheduler["args"]).timesteps(5, dtype=torch.float64).tolist()
    write_manifest(out, {
        "format": FORMAT, "name": "index", "status": "ok", "parity": {"backends": {"aoti": {"passed": True}}}, "io": io.to_dict(),
        "sampler": {"scheduler": scheduler, "solver": "heun", "num_steps": 5, "solver_options": {},
                    "time_steps": times, "sigmas": times, "alphas": [1.0] * len(times), "patching": None},
        "artifacts": {"aoti": {**file_record(out, art["files"]), "device": art["device"], "precision": art["precision"]}},
    })  # fmt: skip
    return out


def set_sampler(engine: Path, scheduler: str, args: dict, solver: str, num_steps: int, options: dict | None = None,
                iddpm_levels: bool | None = None) -> None:
    """Rewrite ``manifest.sampler`` as ``engines.build.sampler_schedule`` records it (step table included); an
    iDDPM schedule (or ``iddpm_levels``) gets the iDDPM preconditioner's ``round_sigma`` (time steps and churned
    noise levels rounded to its table)."""
    from diffexport.diffusion import noise_schedulers, samplers
    from diffexport.diffusion.preconditioners import rounding_spec, sigma_rounding
    from diffexport.export.validate import resolved_args

    sch = getattr(noise_schedulers, scheduler)(**args)
    rounding = rounding_spec("IDDPMPreconditioner", {}) if (scheduler == "IDDPMNoiseScheduler" if iddpm_levels is None else iddpm_levels) else None
    round_sigma = rounding and sigma_rounding(rounding["class"], rounding["args"])
    t = samplers.round_time_steps(sch, sch.timesteps(num_steps, dtype=torch.float64), round_sigma)  # as sampler_schedule records them
    solver_args = resolved_args(samplers.SOLVERS[solver], options or {}, skip=1, supplied=samplers.SUPPLIED)
    sampler = {"scheduler": {"class": scheduler, "args": resolved_args(type(sch), args)}, "solver": solver, "num_steps": num_steps,
               "solver_options": options or {}, "solver_args": {k: str(v) if v in (float("inf"), float("-inf")) else v for k, v in solver_args.items()},
               "discrete": not t.is_floating_point(), "time_steps": t.tolist(),
               "sigmas": sch.edm_sigma(t if not t.is_floating_point() else t.double()).double().tolist(), "alphas": sch.alpha(t).double().tolist(),
               "patching": None}
    if rounding:
        sampler["round_sigma"] = rounding
    sampler["steps"] = samplers.step_table(sch, solver, t, options or {}, round_sigma)
    edit_manifest(engine, lambda m: m.update(sampler=sampler))


CHURN = {"S_churn": 10.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
SAMPLERS = {  # mirrors of the shipped recipes' pairs (EDM + heun, DDPM + ddim) and every other pair the runner accepts
    "edm-heun": ("EDMNoiseScheduler", {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}, "heun", 6, {}),
    "edm-heun-midpoint": ("EDMNoiseScheduler", {}, "heun", 5, {"alpha": 0.5}),
    "edm-stochastic-heun": ("EDMNoiseScheduler", {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}, "edm_stochastic_heun", 6, CHURN),
    "ve-euler": ("VENoiseScheduler", {"sigma_min": 0.02, "sigma_max": 100.0}, "euler", 8, {}),
    "ve-heun-2": ("VENoiseScheduler", {}, "heun", 2, {}),  # t from 1e4 to 4e-4: t_prime is t_next exactly (it was 0 in float32)
    "vp-heun": ("VPNoiseScheduler", {"beta_min": 0.1, "beta_d": 19.9, "epsilon_s": 1e-3, "t_max": 1.0}, "heun", 6, {}),
    "vp-stochastic-euler": ("VPNoiseScheduler", {}, "edm_stochastic_euler", 8, {"S_churn": 4.0}),
    "iddpm-heun": ("IDDPMNoiseScheduler", {"sigma_min": 0.002, "sigma_max": 81.0}, "heun", 6, {}),
    "iddpm-stochastic-heun": ("IDDPMNoiseScheduler", {}, "edm_stochastic_heun", 6, {"S_churn": 40.0}),  # t_hat rounded to the table
    "ddpm-ddim": ("DDPMScheduler", {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}, "ddim", 50, {"eta": 0.0}),
    "ddpm-ancestral": ("DDPMScheduler", {"num_train_timesteps": 100}, "ddim", 20, {"eta": 1.0}),
}


@pytest.fixture(scope="session")
def parity_log() -> dict:
    """C++ vs Python relative L2 per sampler, printed at the end (figures for BENCHMARKS.md)."""
    log: dict = {}
    yield log
    print("\nC++ vs Python relative L2:", {k: f"{v:.1e}" for k, v in log.items()})


@pytest.mark.parametrize("case", SAMPLERS)
def test_every_sampler_matches_python(index_engine_dir, runner, tmp_path, case, parity_log):
    """Each scheduler x solver from the manifest, 4 rows in chunks of 3 and 1 (padded); stochastic
    solvers with the same seed draw the same noise as torch's generator (exact to float rounding),
    and another seed gives other samples."""
    scheduler, args, solver, steps, options = SAMPLERS[case]
    engine = shutil.copytree(index_engine_dir, tmp_path / "engine")
    set_sampler(engine, scheduler, args, solver, steps, options)
    inputs = make_inputs(engine, tmp_path, n=4)
    # two Heun steps from sigma 100 to 0.02 weight the random network's x - D at sigma 0.02 by h/2 / t ~ 1e7: compared, not denoised
    _, parity_log[case] = check_parity(runner, engine, inputs, tmp_path / "out.npy", seed=7, denoised=case != "ve-heun-2")
    if solver.startswith("edm_stochastic") or options.get("eta"):
        done = run(runner / BINARY, engine, inputs, tmp_path / "other.npy", "--seed", "8")
        assert done.returncode == 0, done.stderr
        assert np.abs(np.load(tmp_path / "other.npy") - np.load(tmp_path / "out.npy")).max() > 1e-3, "the seed has no effect"


def test_classifier_free_guidance(engine_ok, runner, tmp_path):
    """``sampler.guidance.cfg`` (the unconditional call with the vector condition zeroed) and
    ``sampler.clip`` match the Python runtime; guidance costs twice the evaluations and changes the samples."""
    engine = shutil.copytree(engine_ok, tmp_path / "engine")
    inputs = make_inputs(engine, tmp_path)
    assert run(runner / BINARY, engine, inputs, tmp_path / "plain.npy").returncode == 0
    edit_manifest(engine, lambda m: m["sampler"].update(guidance={"cfg": 2.5}, clip=[-0.5, 0.5]))
    log, _ = check_parity(runner, engine, inputs, tmp_path / "cfg.npy")
    assert f"{2 * (2 * manifest_of(engine)['sampler']['num_steps'] - 1)} evaluations per batch" in log
    assert np.abs(np.load(tmp_path / "cfg.npy") - np.load(tmp_path / "plain.npy")).max() > 1e-3
    assert np.abs(np.load(tmp_path / "cfg.npy")).max() == 0.5 < np.abs(np.load(tmp_path / "plain.npy")).max()  # sampler.clip


def test_latents_drawn_from_seed_and_steps(index_engine_dir, runner, tmp_path):
    """``--batch N --seed S`` draws the latents as ``diffexport sample --seed S --batch N`` does, then the
    per-step noise from the same generator; ``--steps`` re-discretises VP and DDPM schedules."""
    engine = shutil.copytree(index_engine_dir, tmp_path / "engine")
    set_sampler(engine, "VPNoiseScheduler", {}, "edm_stochastic_heun", 6, {"S_churn": 3.0})
    inputs = {k: v for k, v in make_inputs(engine, tmp_path, n=3).items() if k != "latents"}
    check_parity(runner, engine, inputs, tmp_path / "out.npy", seed=3, batch=3)
    check_parity(runner, engine, inputs, tmp_path / "out4.npy", steps=4, seed=3, batch=3)
    set_sampler(engine, "DDPMScheduler", {}, "ddim", 10, {"eta": 0.5})
    check_parity(runner, engine, inputs, tmp_path / "ddpm.npy", steps=7, seed=1, batch=3)


def test_iddpm_steps_beyond_the_table_refused(index_engine_dir, runner, tmp_path):
    """``--steps`` above the number of iDDPM levels in [sigma_min, sigma_max] is refused naming the table, as
    Python's ``IDDPMNoiseScheduler.timesteps`` refuses it (it used to repeat levels)."""
    engine = shutil.copytree(index_engine_dir, tmp_path / "engine")
    set_sampler(engine, "IDDPMNoiseScheduler", {"sigma_max": 0.01}, "heun", 2)
    inputs = make_inputs(engine, tmp_path, n=2)
    assert run(runner / BINARY, engine, inputs, tmp_path / "ok.npy", "--steps", "2").returncode == 0
    done = run(runner / BINARY, engine, inputs, tmp_path / "out.npy", "--steps", "3")
    want = "num_steps must be <= 2: the iDDPM table of M = 1000 has 2 levels between sigma_min = 0.002 and sigma_max = 0.01, got 3"
    assert done.returncode == 1 and want in done.stderr and not (tmp_path / "out.npy").exists(), done.stderr
    with pytest.raises(ValueError, match=want.replace(", got 3", "")):
        python_samples(engine, inputs, num_steps=3)


def test_index_condition_and_padding(index_engine_dir, runner, tmp_path):
    """int64 conditions reach the package; 4 rows run as chunks of 3 and 1, the 1 padded to the
    minimum batch 2 by repeating its row (the padding must not leak into the kept rows). Integral floats
    are read as int64 (as ``diffexport sample`` reads them). Index values outside [0, high) of the io (the
    package would read out of bounds) are refused in one line naming the file; a manifest without ``high``
    (older ones) still refuses negative values."""
    inputs = make_inputs(index_engine_dir, tmp_path, n=4)
    check_parity(runner, index_engine_dir, inputs, tmp_path / "out.npy")
    bad = tmp_path / "lead_f32.npy"
    np.save(bad, np.load(inputs["lead"]).astype(np.float32))
    done = run(runner / BINARY, index_engine_dir, {**inputs, "lead": bad}, tmp_path / "f32.npy")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "f32.npy"), np.load(tmp_path / "out.npy"))
    engine = shutil.copytree(index_engine_dir, tmp_path / "engine")
    for values, message in (([0, 4, 5, 1], "holds 5 at row 2, outside its range [0, 5)"), ([0, -1, 2, 3], "holds -1 at row 1, outside its range [0, 5)"),
                            (None, "holds -1 at row 1, but must be >= 0")):
        if values is None:
            edit_manifest(engine, lambda m: m["io"]["inputs"][3].pop("high"))
        else:
            np.save(bad, np.array(values, np.int64))
        done = run(runner / BINARY, engine, {**inputs, "lead": bad}, tmp_path / "bad.npy")
        assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: {bad}: condition 'lead' {message}\n")
    assert not (tmp_path / "bad.npy").exists()
    edit_manifest(engine, lambda m: m["io"]["inputs"][3].update(high=0))
    done = run(runner / BINARY, engine, inputs, tmp_path / "bad.npy")
    assert done.returncode == 1 and "io.inputs[3].high: expected an integer >= 1, got 0" in done.stderr, done.stderr


def test_npy_versions_and_robust_manifest(engine_ok, runner, tmp_path):
    """v2/v3 .npy headers read like v1; a manifest with escapes, unicode and extra fields still loads."""
    engine = shutil.copytree(engine_ok, tmp_path / "engine")
    edit_manifest(engine, lambda m: m.update(note="caf\u00e9 \U0001F600 \"q\" \\ / \t", extra=[1.5e-3, -2, True, None, {}, []]))
    inputs = make_inputs(engine, tmp_path)
    assert run(runner / BINARY, engine, inputs, tmp_path / "v1.npy").returncode == 0
    for major in (2, 3):
        path = tmp_path / f"latents_v{major}.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.load(inputs["latents"]), version=(major, 0))
        done = run(runner / BINARY, engine, {**inputs, "latents": path}, tmp_path / "v.npy", "--overwrite")
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), np.load(tmp_path / "v1.npy"))
    # as `diffexport sample` reads them: float64 (numpy's default), Fortran order, big endian
    image = next(s["name"] for s in manifest_of(engine)["io"]["inputs"] if s["kind"] == "image")
    odd = {"latents": np.load(inputs["latents"]).astype(np.float64), image: np.asfortranarray(np.load(inputs[image]).astype(">f4"))}
    for name, a in odd.items():
        np.save(tmp_path / f"odd_{name}.npy", a)
    done = run(runner / BINARY, engine, {**inputs, **{k: tmp_path / f"odd_{k}.npy" for k in odd}}, tmp_path / "odd.npy")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "odd.npy"), np.load(tmp_path / "v1.npy"))


def cli_sample(engine: Path, out: Path, *args: str) -> tuple[int, str]:
    """``diffexport sample ENGINE --backend aoti --out OUT ARGS`` on one thread (as the runner's --threads 1):
    its exit code and error line without the ``error: `` prefix ('' when none)."""
    from typer.testing import CliRunner

    from diffexport.cli import app
    from diffexport.diffusion.testing import single_thread

    with single_thread():
        result = CliRunner().invoke(app, ["sample", str(engine), "--backend", "aoti", "--out", str(out), *args])
    errors = [line.removeprefix("error: ") for line in result.output.splitlines() if line.startswith("error: ")]
    return result.exit_code, errors[-1] if errors else ""


def condition_files(engine: Path, folder: Path, n: int = N) -> dict[str, str]:
    """Seeded condition files in the forms ``diffexport sample`` takes, by placeholder name (see LABEL_FORMS)."""
    rng = np.random.default_rng(4)
    image = next(s for s in manifest_of(engine)["io"]["inputs"] if s["kind"] == "image")
    files = {"cond": rng.standard_normal((n, *image["shape"][1:])).astype(np.float32),
             "cond_row": rng.standard_normal(image["shape"][1:]).astype(np.float32),  # one row, no batch axis: repeated
             "indices": np.array([3, 0, 2], np.int32),  # class indices [3], any integer dtype: one-hot, cycled over n
             "onehot_int": np.eye(4, dtype=np.int64)[[1, 2, 3, 0, 1][:n]],  # one-hot as integers: read as float32
             "wrong_shape": np.zeros((n, 5), np.float32), "nan": np.full((n, 4), np.nan, np.float32), "empty": np.zeros((0, 4), np.float32),
             "bad_indices": np.array([0, 5, 1], np.int64), "too_many_indices": np.zeros(n + 1, np.int64), "two_rows": np.zeros((2, 3, 16, 16), np.float32)}
    for name, array in files.items():
        np.save(folder / f"{name}.npy", array)
    (folder / "folder.npy").mkdir()
    return {name: str(folder / f"{name}.npy") for name in [*files, "folder", "missing"]}


LABEL_FORMS = {  # the runner's and diffexport sample's arguments besides --out; {name}: a file of condition_files
    "--label list": ["--batch", "5", "--label", "0,3", "-c", "cond={cond}"],
    "--label with latents": ["--latents", "{latents}", "--label", "2", "-c", "cond={cond}"],
    "inline class, one image row": ["--batch", "5", "-c", "class_labels=2", "-c", "cond={cond_row}"],
    "inline classes": ["--batch", "5", "-c", "cond={cond}", "-c", "class_labels=3,1,0"],
    "class indices .npy": ["--batch", "5", "-c", "class_labels={indices}", "-c", "cond={cond}"],
    "integer one-hot .npy": ["--batch", "5", "-c", "class_labels={onehot_int}", "-c", "cond={cond}"],
}


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_condition_forms_match_diffexport_sample(engine_ok, runner, tmp_path, form):
    """Every form ``diffexport sample`` takes for conditions (``--label``, inline class labels, class
    indices in an integer .npy, one row repeated, integer one-hot rows) gives the runner the same samples
    as ``diffexport sample`` with the same seed (random-weight SongUNet, 5 rows in chunks of 4 and 1)."""
    files = {**condition_files(engine_ok, tmp_path), "latents": str(make_inputs(engine_ok, tmp_path)["latents"])}
    args = [a.format(**files) for a in LABEL_FORMS[form]] + ["--seed", "3"]
    code, error = cli_sample(engine_ok, tmp_path / "python.npy", *args)
    assert code == 0, error
    done = subprocess.run([str(runner / BINARY), "--engine", str(engine_ok), "--out", str(tmp_path / "cpp.npy"), "--threads", "1", *args],
                          capture_output=True, text=True, timeout=300, env=runner_env())
    assert done.returncode == 0, done.stderr
    ours, ref = np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "python.npy")
    assert ours.shape == ref.shape == (N, 2, 16, 16)
    assert np.linalg.norm(ours - ref) <= 1e-7 * np.linalg.norm(ref), np.linalg.norm(ours - ref) / np.linalg.norm(ref)


def test_class_labels_change_the_samples(engine_ok, runner, tmp_path):
    """The labels reach the engine: --label 0 and --label 1 (same seed, same image condition) differ."""
    cond = condition_files(engine_ok, tmp_path)["cond"]
    for label in ("0", "1"):
        done = subprocess.run([str(runner / BINARY), "--engine", str(engine_ok), "--out", str(tmp_path / f"{label}.npy"), "--threads", "1",
                               "--batch", "5", "--label", label, "-c", f"cond={cond}"], capture_output=True, text=True, timeout=300, env=runner_env())
        assert done.returncode == 0, done.stderr
    assert np.abs(np.load(tmp_path / "0.npy") - np.load(tmp_path / "1.npy")).max() > 1e-3


CONDITION_REFUSALS = {  # arguments besides --out --batch 5 (as LABEL_FORMS), a part of the line both must print
    "label out of range": (["--label", "4", "-c", "cond={cond}"], "class labels must be integers in 0..3, got [4]"),
    "label not integers": (["--label", "1,b", "-c", "cond={cond}"], "--label expects an integer or a comma-separated list of them, got '1,b'"),
    "label and condition": (["--label", "1", "-c", "class_labels=2", "-c", "cond={cond}"], "is also given with --condition; give it once"),
    "inline label out of range": (["-c", "class_labels=0,9", "-c", "cond={cond}"], "--condition class_labels=0,9: condition 'class_labels': class labels"),
    "inline labels for an image": (["-c", "cond=3", "-c", "class_labels=1"], "class labels need a vector condition named 'cond'; the engine takes ["),
    "no value": (["-c", "class_labels", "-c", "cond={cond}"], "--condition expects NAME=FILE.npy or NAME=LABEL[,LABEL...], got 'class_labels'"),
    "given twice": (["-c", "class_labels=1", "-c", "class_labels=2", "-c", "cond={cond}"], "--condition class_labels: given twice"),
    "class index out of range": (["-c", "class_labels={bad_indices}", "-c", "cond={cond}"], "bad_indices.npy: condition 'class_labels': class labels must"),
    "more class indices than rows": (["-c", "class_labels={too_many_indices}", "-c", "cond={cond}"], "(class indices) must have at most 5 rows"),
    "missing file": (["-c", "class_labels={missing}", "-c", "cond={cond}"], "missing.npy: condition 'class_labels' file not found"),
    "folder": (["-c", "class_labels={folder}", "-c", "cond={cond}"], "folder.npy: condition 'class_labels' must be a .npy file, got a folder"),
    "wrong shape": (["-c", "class_labels={wrong_shape}", "-c", "cond={cond}"], "condition 'class_labels' (vector) must have shape [5, 4] or [4], got [5, 5]"),
    "nan": (["-c", "class_labels={nan}", "-c", "cond={cond}"], "nan.npy: condition 'class_labels' holds 20 NaN/Inf values"),
    "empty": (["-c", "class_labels={empty}", "-c", "cond={cond}"], "empty.npy: condition 'class_labels' is empty (shape [0, 4])"),
    "image rows": (["-c", "class_labels=1", "-c", "cond={two_rows}"], "condition 'cond' (image) must have shape [5, 3, 16, 16] or [3, 16, 16], got [2, 3, 16, 16]"),
    "missing condition": (["-c", "cond={cond}"], "conditions: the engine takes ['cond', 'class_labels']; missing ['class_labels'], unexpected -"),
    "unknown conditions": (["--label", "1", "-c", "cond={cond}", "-c", "zz={cond}", "-c", "extra={cond_row}"], "missing -, unexpected ['extra', 'zz']"),
}


@pytest.mark.parametrize("case", CONDITION_REFUSALS)
def test_condition_refusals_match_diffexport_sample(engine_ok, runner, tmp_path, case):
    """Each refusal is the line ``diffexport sample`` prints for the same arguments (exit 1, nothing written)."""
    files = condition_files(engine_ok, tmp_path)
    args, part = CONDITION_REFUSALS[case]
    args = ["--batch", "5", *(a.format(**files) for a in args)]
    code, error = cli_sample(engine_ok, tmp_path / "python.npy", *args)
    assert code == 1 and part in error, error
    done = subprocess.run([str(runner / BINARY), "--engine", str(engine_ok), "--out", str(tmp_path / "cpp.npy"), "--threads", "1", *args],
                          capture_output=True, text=True, timeout=300, env=runner_env())
    assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: {error}\n")
    assert not (tmp_path / "cpp.npy").exists()


def cpp_sample(binary: Path, engine: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """The runner with ``diffexport sample``'s arguments (as ``cli_sample``), on one thread."""
    return subprocess.run([str(binary), "--engine", str(engine), "--out", str(out), "--threads", "1", *args],
                          capture_output=True, text=True, timeout=300, env=runner_env())


def assert_same_run(binary: Path, engine: Path, tmp_path: Path, args: list[str]) -> None:
    """``diffexport sample`` and the runner on the same arguments: the same samples, or the same refusal line
    (exit 1, nothing written)."""
    code, error = cli_sample(engine, tmp_path / "python.npy", *args)
    done = cpp_sample(binary, engine, tmp_path / "cpp.npy", *args)
    if code != 0:
        assert code == 1 and error, error
        assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: {error}\n")
        assert not (tmp_path / "cpp.npy").exists()
        return
    assert done.returncode == 0, done.stderr
    ours, ref = np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "python.npy")
    assert ours.shape == ref.shape
    assert np.linalg.norm(ours - ref) <= 1e-7 * np.linalg.norm(ref), np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    (tmp_path / "cpp.npy").unlink()
    (tmp_path / "python.npy").unlink()
    (tmp_path / "python.png").unlink(missing_ok=True)


def test_float16_inputs_match_diffexport_sample(engine_ok, runner, tmp_path):
    """float16 latents and conditions (either byte order, subnormal halves included) are read exactly, cast to
    float32 as ``diffexport sample`` casts them: the samples equal those from the same values in float32 files
    and ``diffexport sample``'s; a float16 inf or nan is refused with its NaN/Inf line."""
    files = condition_files(engine_ok, tmp_path)
    cond = np.load(files["cond"]).astype(np.float16)
    cond.flat[:5] = [2**-24, -3e-6, 2**-14, -0.0, 65504]  # the smallest subnormal, a subnormal, the smallest normal, -0, the largest
    latents = np.load(make_inputs(engine_ok, tmp_path)["latents"]).astype(np.float16)
    assert np.count_nonzero(np.abs(cond.astype(np.float32)).ravel()[:3] < 2**-14) == 2  # two subnormal halves
    for name, a in {"cond16": cond.astype(">f2"), "lat16": latents.astype("<f2"), "cond32": cond.astype(np.float32), "lat32": latents.astype(np.float32)}.items():
        np.save(tmp_path / f"{name}.npy", a)
    done = cpp_sample(runner / BINARY, engine_ok, tmp_path / "from32.npy", "--latents", str(tmp_path / "lat32.npy"), "--label", "1,2", "-c", f"cond={tmp_path / 'cond32.npy'}")
    assert done.returncode == 0, done.stderr
    args = ["--latents", str(tmp_path / "lat16.npy"), "--label", "1,2", "-c", f"cond={tmp_path / 'cond16.npy'}"]
    done = cpp_sample(runner / BINARY, engine_ok, tmp_path / "from16.npy", *args)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "from16.npy"), np.load(tmp_path / "from32.npy"))
    assert_same_run(runner / BINARY, engine_ok, tmp_path, args)
    bad = cond.copy()
    bad.flat[[5, 9, 11]] = [np.inf, -np.inf, np.nan]
    np.save(tmp_path / "bad16.npy", bad)
    assert_same_run(runner / BINARY, engine_ok, tmp_path, ["--label", "1", "-c", f"cond={tmp_path / 'bad16.npy'}"])
    assert "bad16.npy: condition 'cond' holds 3 NaN/Inf values" in cli_sample(engine_ok, tmp_path / "x.npy", "--label", "1", "-c", f"cond={tmp_path / 'bad16.npy'}")[1]


LATENT_REFUSALS = {  # latents (saved as latents.npy), extra arguments; the runner must print diffexport sample's line
    "empty": (np.zeros((0, 2, 16, 16), np.float32), []),
    "nan and inf": (np.array([np.nan, np.inf, 1.0], np.float64).repeat(2 * 16 * 16 // 3 + 1)[: 2 * 16 * 16].reshape(1, 2, 16, 16), []),
    "integers": (np.zeros((1, 2, 16, 16), np.int32), []),
    "big endian integers": (np.zeros((1, 2, 16, 16), ">i2"), []),
    "wrong shape": (np.zeros((2, 2, 16), np.float32), []),
    "rows other than --batch": (np.zeros((5, 2, 16, 16), np.float32), ["--batch", "4"]),
    "beyond float32": (np.full((1, 2, 16, 16), 1e300, np.float64), []),
}


@pytest.mark.parametrize("case", LATENT_REFUSALS)
def test_latents_refusals_match_diffexport_sample(engine_ok, runner, tmp_path, case):
    """--latents as ``diffexport sample`` takes them: an empty array, NaN/Inf, integers, a wrong shape and rows
    other than --batch are refused with its line; float64 beyond float32's range is cast to inf, as torch
    casts it, and stopped by the same NaN/Inf guard."""
    latents, extra = LATENT_REFUSALS[case]
    np.save(tmp_path / "latents.npy", latents)
    args = ["--latents", str(tmp_path / "latents.npy"), "--label", "1", "-c", f"cond={condition_files(engine_ok, tmp_path)['cond_row']}", *extra]
    code, error = cli_sample(engine_ok, tmp_path / "python.npy", *args)
    assert code == 1, error
    assert_same_run(runner / BINARY, engine_ok, tmp_path, args)


def test_size_limits_match_diffexport_sample(engine_ok, runner, tmp_path):
    """Latents or a condition over 2 GB as float32 (a sparse float16 file: refused from its header, before it is
    read) and a --batch over it are refused with ``diffexport sample``'s lines."""
    big = tmp_path / "big.npy"
    with open(big, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": ((2 << 28) + 1, 2, 1, 1)})
        f.truncate(f.tell() + 2 * 2 * ((2 << 28) + 1))
    for args in (["--latents", str(big)], ["--batch", "1", "-c", f"cond={big}"], ["--batch", "2000000"]):
        code, error = cli_sample(engine_ok, tmp_path / "python.npy", *args, "--label", "1")
        assert code == 1 and ("over the limit of 2.1 GB per run" in error), error
        assert_same_run(runner / BINARY, engine_ok, tmp_path, [*args, "--label", "1"])


BATCH_FORMS = {  # arguments besides --out (no --batch or --latents: the batch comes from the conditions, else 1)
    "image rows": ["-c", "cond={cond}", "--label", "2"],
    "label list, one image row": ["--label", "0,3", "-c", "cond={cond_row}"],
    "class indices": ["-c", "class_labels={indices}", "-c", "cond={cond_row}"],
    "one of each": ["-c", "cond={cond_row}", "-c", "class_labels=2"],
    "rows disagree": ["-c", "cond={two_rows}", "-c", "class_labels={indices}"],
    "labels beyond the latents": ["--latents", "{latents}", "--label", "0,1,2,3,0,1", "-c", "cond={cond}"],
    "labels beyond --batch": ["--batch", "2", "-c", "class_labels=0,1,2", "-c", "cond={cond_row}"],
    "--batch and latents": ["--batch", "5", "--latents", "{latents}", "--label", "1", "-c", "cond={cond}"],
}


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_batch_matches_diffexport_sample(engine_ok, runner, tmp_path, form):
    """The batch as ``diffexport sample`` sets it: --batch, else the rows of --latents, else those of the first
    condition given with its batch axis, else 1; --batch with --latents must agree; inline values beyond the
    batch are refused naming where it came from. Same samples (seed 3) or the same refusal line."""
    files = {**condition_files(engine_ok, tmp_path), "latents": str(make_inputs(engine_ok, tmp_path)["latents"])}
    assert_same_run(runner / BINARY, engine_ok, tmp_path, [a.format(**files) for a in BATCH_FORMS[form]] + ["--seed", "3"])


def python_index_run(engine: Path, items: list[str], n: int, seed: int, monkeypatch) -> torch.Tensor | str:
    """``diffexport sample``'s condition parsing and sampler (``_parse_conditions``, ``runtime.sample``) on the
    index engine's AOTI package (it has no recipe for ``engines.load``): the samples, or the refusal line."""
    from diffexport.cli import run as cli_run
    from diffexport.diffusion.testing import single_thread
    from diffexport.engines.aoti import AOTIEngine
    from diffexport.recipes import IOSpec
    from diffexport.runtime.guards import SamplingError
    from diffexport.runtime.sampler import sample

    monkeypatch.setattr(cli_run, "fail", lambda message, code=1: ValueError(message))  # raised by the caller
    manifest = manifest_of(engine)
    aoti = AOTIEngine(engine / "denoiser.pt2", IOSpec.from_dict(manifest["io"]))
    try:
        conditions, files = cli_run._parse_conditions(items, aoti, n)
        with single_thread():
            return sample(aoti, manifest["sampler"], batch=n, seed=seed, conditions=conditions, condition_sources=files)
    except (ValueError, SamplingError) as e:
        return str(e)


def test_index_condition_forms_match_python(index_engine_dir, runner, tmp_path, monkeypatch):
    """An index condition's inline values (cycled over --batch), an integral float .npy (read as int64) and
    one row repeated give the runner the samples of ``diffexport sample``'s parsing; out-of-range,
    beyond-int64 and non-integer values are refused with its line."""
    folder = tmp_path
    np.save(folder / "cond1.npy", np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32))
    np.save(folder / "lead_f32.npy", np.array([4, 0, 1, 3], np.float32))
    np.save(folder / "lead_row.npy", np.array([2], np.int64))
    np.save(folder / "lead_frac.npy", np.array([1, 1.5, 2, 0], np.float32))
    cond = f"cond={folder / 'cond1.npy'}"
    for lead in ("0,4", "3", f"{folder / 'lead_f32.npy'}", f"{folder / 'lead_row.npy'}"):
        items = [cond, f"lead={lead}"]
        ref = python_index_run(index_engine_dir, items, 4, 5, monkeypatch)
        assert isinstance(ref, torch.Tensor), ref
        done = subprocess.run([str(runner / BINARY), "--engine", str(index_engine_dir), "--out", str(tmp_path / "out.npy"), "--threads", "1",
                               "--batch", "4", "--seed", "5", "--overwrite", *(a for i in items for a in ("-c", i))],
                              capture_output=True, text=True, timeout=300, env=runner_env())
        assert done.returncode == 0, done.stderr
        ours = torch.from_numpy(np.load(tmp_path / "out.npy"))
        assert float((ours - ref).norm() / ref.norm()) <= 1e-7, lead
    refusals = {"7": "--condition lead=7: condition 'lead' holds 7 at row 0, outside its range [0, 5)",
                "1,-2": "--condition lead=1,-2: condition 'lead' holds -2 at row 1, outside its range [0, 5)",
                "99999999999999999999": "--condition lead=99999999999999999999: an index condition's values are int64",
                "1.5": "1.5: condition 'lead' file not found",
                str(folder / "lead_frac.npy"): f"{folder / 'lead_frac.npy'}: condition 'lead' is an index (int64) but holds non-integer values"}
    for lead, want in refusals.items():
        items = [cond, f"lead={lead}"]
        assert python_index_run(index_engine_dir, items, 4, 5, monkeypatch) == want
        done = subprocess.run([str(runner / BINARY), "--engine", str(index_engine_dir), "--out", str(tmp_path / "bad.npy"), "--threads", "1",
                               "--batch", "4", *(a for i in items for a in ("-c", i))], capture_output=True, text=True, timeout=300, env=runner_env())
        assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: {want}\n")
    from diffexport.engines.aoti import AOTIEngine
    from diffexport.recipes import IOSpec
    from diffexport.runtime.sampler import one_hot_condition

    with pytest.raises(ValueError) as no_vector:  # what `diffexport sample --label` reports for an engine without a vector condition
        one_hot_condition(AOTIEngine(index_engine_dir / "denoiser.pt2", IOSpec.from_dict(manifest_of(index_engine_dir)["io"])), [0])
    done = subprocess.run([str(runner / BINARY), "--engine", str(index_engine_dir), "--out", str(tmp_path / "bad.npy"), "--batch", "4",
                           "--label", "1", "-c", cond, "-c", "lead=1"], capture_output=True, text=True, timeout=300, env=runner_env())
    assert "the engine takes ['cond (image)', 'lead (index)']" in str(no_vector.value)
    assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: --label: {no_vector.value}\n")
    assert not (tmp_path / "bad.npy").exists()


def test_float64_index_values_checked_before_the_cast(index_engine_dir, runner, tmp_path, monkeypatch):
    """float64 files stay float64 until the engine's dtype is known, as in ``diffexport sample``: an index value
    3.0000000001 is not an integer (float32 would round it to 3), 1e20 is out of range (named in full, not as
    NaN/Inf), integral float64 values are used as int64; a float condition beyond float32's range is cast to inf."""
    cond = tmp_path / "cond1.npy"
    np.save(cond, np.random.default_rng(2).standard_normal((1, 1, 8, 8)))  # float64
    np.save(tmp_path / "cond_huge.npy", np.full((1, 1, 8, 8), 1e300))
    leads = {"ok": [4, 0, 1, 3], "frac": [1, 3.0000000001, 2, 0], "huge": [1e20, 0, 1, 2], "negative": [0, -1e20, 1, 2]}
    for name, values in leads.items():
        np.save(tmp_path / f"lead_{name}.npy", np.array(values, np.float64))
    cases = [[f"cond={cond}", f"lead={tmp_path / f'lead_{name}.npy'}"] for name in leads]
    cases.append([f"cond={tmp_path / 'cond_huge.npy'}", "lead=1"])
    for items in cases:
        ref = python_index_run(index_engine_dir, items, 4, 5, monkeypatch)
        done = subprocess.run([str(runner / BINARY), "--engine", str(index_engine_dir), "--out", str(tmp_path / "out.npy"), "--threads", "1",
                               "--batch", "4", "--seed", "5", "--overwrite", *(a for i in items for a in ("-c", i))],
                              capture_output=True, text=True, timeout=300, env=runner_env())
        if isinstance(ref, str):
            assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: {ref}\n"), items
        else:
            assert done.returncode == 0, done.stderr
            ours = torch.from_numpy(np.load(tmp_path / "out.npy"))
            assert float((ours - ref).norm() / ref.norm()) <= 1e-7
    assert python_index_run(index_engine_dir, cases[1], 4, 5, monkeypatch).endswith("condition 'lead' is an index (int64) but holds non-integer values")
    assert python_index_run(index_engine_dir, cases[2], 4, 5, monkeypatch).endswith("'lead' holds 100000000000000000000 at row 0, outside its range [0, 5)")


def _flip_byte(engine: Path) -> None:
    data = bytearray((engine / "denoiser.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (engine / "denoiser.pt2").write_bytes(bytes(data))


BROKEN = {
    "missing manifest": (lambda e: (e / "manifest.json").unlink(), "manifest.json: missing"),
    "bad json": (lambda e: (e / "manifest.json").write_text('{"format": "diffexport-engine/1",\n "io": [1, }'), "manifest.json:2:12: invalid JSON"),
    "missing key": (lambda e: edit_manifest(e, lambda m: m["io"].pop("batch")), "manifest.json: io.batch: required key is missing"),
    "wrong type": (lambda e: edit_manifest(e, lambda m: m["io"]["inputs"][0].update(shape="B")), "io.inputs[0].shape: expected an array"),
    "missing artifact": (lambda e: (e / "denoiser.pt2").unlink(), "denoiser.pt2: missing"),
    "sha256 mismatch": (_flip_byte, "denoiser.pt2: corrupted: its sha256"),
    "solver misfit": (lambda e: edit_manifest(e, lambda m: m["sampler"].update(solver="ddim")), "sampler.solver: 'ddim' does not fit EDMNoiseScheduler"),
    "table of another solver": (lambda e: edit_manifest(e, lambda m: m["sampler"].update(solver="euler", solver_args={})),
                                "sampler.steps[0].evals: 2 evaluations, solver 'euler' makes 1"),
    "unknown solver": (lambda e: edit_manifest(e, lambda m: m["sampler"].update(solver="dpm")), "sampler.solver: 'dpm' is not supported"),
    "unknown scheduler": (lambda e: edit_manifest(e, lambda m: m["sampler"]["scheduler"].update({"class": "CosineScheduler"})),
                          "sampler.scheduler.class: 'CosineScheduler' is not supported by the C++ runner"),
    "unknown solver option": (lambda e: edit_manifest(e, lambda m: m["sampler"].update(solver_options={"S_churn": 1})),
                              "sampler.solver_options.S_churn: not an option of solver 'heun' (alpha)"),
    "patching": (lambda e: edit_manifest(e, lambda m: m["sampler"].update(patching={"img_shape": [32, 32]})),
                 "sampler.patching: patch-based sampling (multi-diffusion, global_index) is not supported by the C++ runner"),
    "edited step table": (lambda e: edit_manifest(e, lambda m: m["sampler"]["steps"][2].update(t_cur=1.5)),
                          "sampler.steps[2].t_cur: 1.500000 does not match"),
    "unknown sampler field": (lambda e: edit_manifest(e, lambda m: m["sampler"].update(dps={"scale": 2})),
                              "sampler.dps: not supported by the C++ runner"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_engine_fails_clearly(engine_ok, runner, tmp_path, case):
    engine = shutil.copytree(engine_ok, tmp_path / "engine")
    inputs = make_inputs(engine, tmp_path)
    breaks, message = BROKEN[case]
    breaks(engine)
    done = run(runner / BINARY, engine, inputs, tmp_path / "out.npy")
    assert done.returncode != 0
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out.npy").exists()


VERDICTS = {  # manifest edit, whether parity.json exists
    "failed": (lambda m: m.update(status="failed"), True),
    "unchecked": (lambda m: m.update(status="unchecked"), False),
    "no status": (lambda m: m.pop("status"), False),
    "aoti failed": (lambda m: m.update(status="ok", parity={**(m.get("parity") or {}), "backends": {"aoti": {"passed": False}, "onnxruntime": {"passed": True}}}), True),
    "aoti not checked": (lambda m: m.update(status="ok", parity={**(m.get("parity") or {}), "backends": {"onnxruntime": {"passed": True}}}), True),
    "ok without summary": (lambda m: (m.update(status="ok"), m.pop("parity", None)), False),
}


@pytest.mark.parametrize("case", VERDICTS)
def test_unverified_engine_refused(engine_ok, runner, tmp_path, case):
    """The runner refuses with exactly the line of diffexport.engines.verdict (exit 1, one line, no
    output written) unless --allow-unverified; the Python rule decides which engines are refused."""
    engine = shutil.copytree(engine_ok, tmp_path / "engine")
    edit, report = VERDICTS[case]
    edit_manifest(engine, edit)
    report_file = engine / ((manifest_of(engine).get("parity") or {}).get("report") or "parity.json")
    if not report:
        report_file.unlink(missing_ok=True)
    else:
        report_file.write_text("{}") if not report_file.exists() else None
    inputs = make_inputs(engine, tmp_path)
    want = refusal(str(engine), manifest_of(engine), "aoti")
    assert want is not None
    done = run(runner / BINARY, engine, inputs, tmp_path / "out.npy")
    assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: {want}\n")
    assert not (tmp_path / "out.npy").exists()
    done = run(runner / BINARY, engine, inputs, tmp_path / "out.npy", "--allow-unverified")
    assert done.returncode == 0, done.stderr


def test_verified_engine_runs_other_backend_failed(engine_ok, runner, tmp_path):
    """Status ok with only another backend failed: verified for aoti, as verdict.py says."""
    engine = shutil.copytree(engine_ok, tmp_path / "engine")
    edit_manifest(engine, lambda m: m.update(status="ok", parity={"backends": {"onnxruntime": {"passed": False}, "aoti": {"passed": True}}}))
    assert refusal(str(engine), manifest_of(engine), "aoti") is None
    assert run(runner / BINARY, engine, make_inputs(engine, tmp_path), tmp_path / "out.npy").returncode == 0


def test_bad_inputs_fail_clearly(engine_ok, runner, tmp_path):
    inputs = make_inputs(engine_ok, tmp_path)
    latents = np.load(inputs["latents"])
    n, c, h, w = latents.shape
    vector = next(s for s in manifest_of(engine_ok)["io"]["inputs"] if s["kind"] == "vector")

    def saved(name: str, a: np.ndarray) -> Path:
        np.save(tmp_path / name, a)
        return tmp_path / name

    cases = [  # (replaced inputs, conditions left out, message)
        ({"latents": saved("shape.npy", latents[:, :, :-1])}, (), f"shape.npy: latents must be [N, {c}, {h}, {w}], got shape [{n}, {c}, {h - 1}, {w}]"),
        ({"latents": saved("c8.npy", latents.astype(np.complex64))}, (), "c8.npy: dtype '<c8' is not supported"),
        ({}, (vector["name"],), f"conditions: the engine takes {[s['name'] for s in manifest_of(engine_ok)['io']['inputs'][2:]]}; missing ['{vector['name']}'], unexpected -"),
        ({vector["name"]: saved("v.npy", np.zeros((n, vector["shape"][1] + 1), np.float32))}, (),
         f"v.npy: condition '{vector['name']}' (vector) must have shape [{n}, {vector['shape'][1]}] or [{vector['shape'][1]}], got [{n}, {vector['shape'][1] + 1}]"),
        ({"extra": saved("extra.npy", np.zeros(n, np.float32))}, (), "missing -, unexpected ['extra']"),
    ]
    for replaced, skip, message in cases:
        done = run(runner / BINARY, engine_ok, {**inputs, **replaced}, tmp_path / "out.npy", skip=skip)
        assert done.returncode != 0 and message in done.stderr and done.stderr.count("\n") == 1, (message, done.stderr)
    for seed in ("-1", "9223372036854775808", "1e3"):  # diffexport sample's range 0..2^63-1: not wrapped around
        done = run(runner / BINARY, engine_ok, inputs, tmp_path / "out.npy", "--seed", seed)
        assert done.returncode == 1 and "--seed" in done.stderr and "0..9223372036854775807" in done.stderr, done.stderr
    (tmp_path / "trunc.npy").write_bytes(inputs["latents"].read_bytes()[:-7])
    done = run(runner / BINARY, engine_ok, {**inputs, "latents": tmp_path / "trunc.npy"}, tmp_path / "out.npy")
    assert done.returncode != 0 and "trunc.npy: file has" in done.stderr and "(truncated)" in done.stderr
    assert not (tmp_path / "out.npy").exists()


def test_existing_output_is_replaced_only_with_overwrite(engine_ok, runner, tmp_path):
    """As ``diffexport sample``: an existing --out file is refused before any work (one line naming it)
    unless --overwrite; a folder or a symlink is never replaced."""
    inputs, out = make_inputs(engine_ok, tmp_path), tmp_path / "out.npy"
    out.write_bytes(b"mine")
    done = run(runner / BINARY, engine_ok, inputs, out)
    assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: --out {out}: already exists; pass --overwrite to replace it, "
                                                 "or choose another --out\n")
    assert out.read_bytes() == b"mine"
    done = run(runner / BINARY, engine_ok, inputs, out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert np.load(out).shape[0] == N
    (tmp_path / "link.npy").symlink_to(out)
    for path, what in ((tmp_path, "folder"), (tmp_path / "link.npy", "symlink")):
        done = run(runner / BINARY, engine_ok, inputs, path, "--overwrite")
        assert (done.returncode, done.stderr) == (1, f"diffexport-sample: error: --out {path}: is a {what}; refusing to replace it\n")
    assert (tmp_path / "link.npy").is_symlink()


def test_cpp_stage_survives_rename_and_cli(engine_ok, runner, tmp_path):
    """The finalize stage installs a runner that still works once the temporary directory is renamed,
    with build.json listing the sha256 of every C++ build input and ``hashes.cpp`` covering cpp/;
    ``diffexport cpp`` prints the binary's path and refuses an engine without an aoti artifact."""
    from typer.testing import CliRunner

    from diffexport.cli import app
    from diffexport.deploy.cpp import source_files
    from diffexport.engines.manifest import verify_record

    building = shutil.copytree(engine_ok, tmp_path / ".tiny.building")
    manifest = manifest_of(building)
    cpp_stage(building, manifest)
    inputs = json.loads((building / "cpp" / "build.json").read_text())
    assert inputs["sources"] == source_files() and {"CMakeLists.txt", "src/sampler.cpp", "include/diffexport/verdict.h"} <= set(inputs["sources"])
    assert set(manifest["hashes"]["cpp"]["files"]) == {"cpp/diffexport-sample", "cpp/build.json"}
    verify_record(building, manifest["hashes"]["cpp"])
    engine = building.rename(tmp_path / "tiny")
    done = run(engine / "cpp" / BINARY, engine, make_inputs(engine, tmp_path), tmp_path / "out.npy")
    assert done.returncode == 0, done.stderr
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()

    result = CliRunner().invoke(app, ["cpp", str(engine)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(engine / "cpp" / BINARY)
    edit_manifest(engine, lambda m: m["artifacts"].pop("aoti"))
    result = CliRunner().invoke(app, ["cpp", str(engine)])
    assert result.exit_code != 0 and "needs an 'aoti' artifact (built: onnx)" in result.output


def test_embed_example(engine_ok, runner):
    """examples/embed.cpp, linked against diffexport_runtime like a user's program, samples 5 images."""
    done = subprocess.run([str(runner / "embed"), str(engine_ok), str(N), "1"], capture_output=True, text=True, timeout=300, env=runner_env())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"sample {i}" for i in range(N)]
    stds = [float(line.split("std ")[1]) for line in lines]
    assert all(np.isfinite(stds)) and max(stds) < 8  # denoised, not noise at sigma_max = 80


@pytest.mark.parametrize("cli11", [True, False], ids=["with-cli11", "without-cli11"])
def test_add_subdirectory_from_another_project(tmp_path, cli11):
    """README's CMakeLists.txt: add_subdirectory(<the package's cpp folder>) and link diffexport_runtime
    from the user's own directory configures and generates (libtorch's imported targets resolve there).
    CLI11 is the runner's alone: without it (CMAKE_DISABLE_FIND_PACKAGE_CLI11) the library still
    configures, the runner is skipped with a STATUS line; as the top-level project it is still required."""
    from diffexport.deploy.cpp import SOURCE_DIR

    (tmp_path / "main.cpp").write_text('#include "diffexport/runtime.h"\nint main() { return 0; }\n')
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\nproject(my_app CXX)\n"
        f"add_subdirectory({SOURCE_DIR.as_posix()} diffexport)\n"
        "add_executable(my_app main.cpp)\ntarget_link_libraries(my_app PRIVATE diffexport_runtime)\n")
    flags = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DCMAKE_DISABLE_FIND_PACKAGE_CLI11={'OFF' if cli11 else 'ON'}"]
    done = subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build"), *flags], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    build_files = [p for p in (tmp_path / "build" / "Makefile", tmp_path / "build" / "build.ninja") if p.exists()]
    assert build_files and "my_app" in build_files[0].read_text()
    assert (BINARY in build_files[0].read_text()) == cli11
    assert ("building diffexport_runtime without the diffexport-sample runner" in done.stdout) != cli11, done.stdout
    if not cli11:  # the runner's own project still needs it, named in the line diffexport/deploy/cpp.py parses
        done = subprocess.run(["cmake", "-S", str(SOURCE_DIR), "-B", str(tmp_path / "top"), *flags], capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and missing_packages(done.stderr) == ["libcli11-dev"], done.stderr[-2000:]


def _runpath(binary: Path) -> str:
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True).stdout
    return next((line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "RUNPATH" in line or "RPATH" in line), "")


@pytest.mark.skipif(shutil.which("readelf") is None or shutil.which("ldd") is None, reason="readelf/ldd (binutils, libc-bin) not installed")
def test_no_absolute_rpath_ld_library_path_or_bundle(engine_ok, runner, tmp_path):
    """The binary's only search path is $ORIGIN/lib (no venv path baked in): without libtorch on
    LD_LIBRARY_PATH it does not start; with it, it runs; a --bundle folder runs without it, also
    after being moved."""
    binary = runner / BINARY
    assert _runpath(binary) == "$ORIGIN/lib"
    assert str(torch_lib_dir()) not in binary.read_bytes().decode("latin-1")
    inputs = make_inputs(engine_ok, tmp_path)
    bare = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    done = run(binary, engine_ok, inputs, tmp_path / "out.npy", env=bare)
    assert done.returncode != 0 and "libtorch" in done.stderr and "cannot open shared object file" in done.stderr
    assert run(binary, engine_ok, inputs, tmp_path / "out.npy").returncode == 0
    moved = bundle(runner, tmp_path / "b").parent.rename(tmp_path / "moved")
    assert {"libtorch.so", "libtorch_cpu.so", "libc10.so"} <= {p.name for p in (moved / "lib").iterdir()}
    done = run(moved / BINARY, engine_ok, inputs, tmp_path / "bundled.npy", env=bare)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "bundled.npy"), np.load(tmp_path / "out.npy"))


def test_missing_package_named(engine_ok, tmp_path, monkeypatch):
    """With two of the three system packages made unfindable for CMake, `diffexport cpp` names exactly
    those two Debian packages."""
    from typer.testing import CliRunner

    from diffexport.cli import app

    monkeypatch.setenv("DIFFEXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIFFEXPORT_CMAKE_ARGS", "-DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON -DCMAKE_DISABLE_FIND_PACKAGE_CLI11=ON")
    result = CliRunner().invoke(app, ["cpp", str(engine_ok)])
    assert result.exit_code == 1
    assert "needs the Debian packages libssl-dev, libcli11-dev: apt-get install -y libssl-dev libcli11-dev (or ./setup.sh --dev)" in result.output
    assert missing_packages("diffexport-missing-packages: libcli11-dev\n") == ["libcli11-dev"]
