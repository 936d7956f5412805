"""The embedded C++ runner (``diffexport-sample``) against the Python runtime sampler.

Engines: the shared ``aoti_engine_dir`` (tiny conditional SongUNet, built by ``build_engine``) and
one tiny engine of our own with an int64 ``index`` condition and batch range [2, 3] (the shared
one has no index input). The C++ project is built once into the shared cache (``build_tree``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffexport.deploy.cpp import BINARY, build_tree, cpp_stage

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
    np.save(paths["latents"], (manifest["sampler"]["sigmas"][0] * rng.standard_normal((n, *x["shape"][1:]))).astype(np.float32))
    for s in conditions:
        paths[s["name"]] = folder / f"{s['name']}.npy"
        shape = (n, *s["shape"][1:])
        np.save(paths[s["name"]], rng.integers(0, 5, shape) if s["dtype"] == "int64" else rng.standard_normal(shape).astype(np.float32))
    return paths


def run(binary: Path, engine: Path, inputs: dict[str, Path], out: Path, *extra: str, skip: tuple[str, ...] = ()):
    cmd = [str(binary), "--engine", str(engine), "--latents", str(inputs["latents"]), "--out", str(out), "--threads", "1", *extra]
    for name, path in inputs.items():
        if name != "latents" and name not in skip:
            cmd += ["--condition", f"{name}={path}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def python_samples(engine: Path, inputs: dict[str, Path], num_steps: int | None = None) -> torch.Tensor:
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
        return sample(aoti, manifest["sampler"], latents=arrays.pop("latents"), conditions=arrays, num_steps=num_steps)
    finally:
        torch.set_num_threads(threads)


def check_parity(runner: Path, engine: Path, inputs: dict[str, Path], out: Path, steps: int | None = None) -> str:
    """Run both samplers; assert relative L2 <= 1e-4 and a denoised result; return the runner's log line."""
    done = run(runner / BINARY, engine, inputs, out, *(["--steps", str(steps)] if steps else []))
    assert done.returncode == 0, done.stderr
    ours, ref = torch.from_numpy(np.load(out)), python_samples(engine, inputs, steps)
    assert ours.shape == ref.shape == np.load(inputs["latents"]).shape
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-4, f"C++ vs Python relative L2 {rel:.2e}"
    assert float(ours.std()) < 0.1 * float(torch.from_numpy(np.load(inputs["latents"])).std()), "not denoised"
    return done.stderr


@pytest.mark.parametrize("solver,steps,batch_min", [("heun", None, 1), ("euler", None, 1), ("heun", 4, 1), ("heun", None, 2)])
def test_matches_python_sampler(aoti_engine_dir, runner, tmp_path, solver, steps, batch_min):
    """Heun (2N-1 evaluations) and Euler (N), the manifest's or a recomputed EDM schedule (--steps),
    N = 5 rows in chunks of the batch max 4; with batch min 2 the last chunk is padded."""
    engine = shutil.copytree(aoti_engine_dir, tmp_path / "engine")
    edit_manifest(engine, lambda m: (m["sampler"].update(solver=solver), m["io"]["batch"].update(min=batch_min)))
    num_steps = steps or manifest_of(engine)["sampler"]["num_steps"]
    log = check_parity(runner, engine, make_inputs(engine, tmp_path), tmp_path / "out.npy", steps)
    assert f"{2 * num_steps - 1 if solver == 'heun' else num_steps} evaluations per batch" in log


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
                 TensorSpec("cond", [-1, 1, 8, 8], "float32", "image"), TensorSpec("lead", [-1], "int64", "index")],
                [TensorSpec("denoised", [-1, 2, 8, 8], kind="denoised")], {"min": 2, "opt": 2, "max": 3})
    g, batch = torch.Generator().manual_seed(0), torch.export.Dim("batch", min=2, max=3)
    example = (torch.randn(2, 2, 8, 8, generator=g), torch.tensor([0.5, 3.0]), torch.randn(2, 1, 8, 8, generator=g), torch.tensor([1, 4]))
    program = torch.export.export(randomize_(IndexDenoiser(), seed=1).eval(), example, dynamic_shapes=[{0: batch}] * 4, strict=False)
    art = export_aoti(program, io, out / "denoiser.pt2")
    scheduler = {"class": "EDMNoiseScheduler", "args": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}}
    times = EDMNoiseScheduler(**scheduler["args"]).timesteps(5, dtype=torch.float64).tolist()
    write_manifest(out, {
        "format": FORMAT, "name": "index", "status": "unchecked", "io": io.to_dict(),
        "sampler": {"scheduler": scheduler, "solver": "heun", "num_steps": 5, "solver_options": {},
                    "time_steps": times, "sigmas": times, "alphas": [1.0] * len(times), "patching": None},
        "artifacts": {"aoti": {**file_record(out, art["files"]), "device": art["device"], "precision": art["precision"]}},
    })  # fmt: skip
    return out


def test_index_condition_and_padding(index_engine_dir, runner, tmp_path):
    """int64 conditions reach the package; 4 rows run as chunks of 3 and 1, the 1 padded to the
    minimum batch 2 by repeating its row (the padding must not leak into the kept rows)."""
    inputs = make_inputs(index_engine_dir, tmp_path, n=4)
    check_parity(runner, index_engine_dir, inputs, tmp_path / "out.npy")
    bad = tmp_path / "lead_f32.npy"
    np.save(bad, np.load(inputs["lead"]).astype(np.float32))
    done = run(runner / BINARY, index_engine_dir, {**inputs, "lead": bad}, tmp_path / "bad.npy")
    assert done.returncode != 0 and "condition 'lead': expected int64 [4], got float32 [4]" in done.stderr


def test_npy_versions_and_robust_manifest(aoti_engine_dir, runner, tmp_path):
    """v2/v3 .npy headers read like v1; a manifest with escapes, unicode and extra fields still loads."""
    engine = shutil.copytree(aoti_engine_dir, tmp_path / "engine")
    edit_manifest(engine, lambda m: m.update(note="caf\u00e9 \U0001F600 \"q\" \\ / \t", extra=[1.5e-3, -2, True, None, {}, []]))
    inputs = make_inputs(engine, tmp_path)
    assert run(runner / BINARY, engine, inputs, tmp_path / "v1.npy").returncode == 0
    for major in (2, 3):
        path = tmp_path / f"latents_v{major}.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.load(inputs["latents"]), version=(major, 0))
        done = run(runner / BINARY, engine, {**inputs, "latents": path}, tmp_path / "v.npy")
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), np.load(tmp_path / "v1.npy"))


def _flip_byte(engine: Path) -> None:
    data = bytearray((engine / "denoiser.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (engine / "denoiser.pt2").write_bytes(bytes(data))


BROKEN = {
    "missing manifest": (lambda e: (e / "manifest.json").unlink(), "manifest.json: missing"),
    "bad json": (lambda e: (e / "manifest.json").write_text('{"format": "diffexport-engine/1", "io": [1, }'), "manifest.json:1:45: invalid JSON"),
    "missing key": (lambda e: edit_manifest(e, lambda m: m["io"].pop("batch")), "manifest.json: io.batch: required key is missing"),
    "wrong type": (lambda e: edit_manifest(e, lambda m: m["io"]["inputs"][0].update(shape="B")), "io.inputs[0].shape: expected an array"),
    "missing artifact": (lambda e: (e / "denoiser.pt2").unlink(), "denoiser.pt2: missing"),
    "sha256 mismatch": (_flip_byte, "denoiser.pt2: corrupted: its sha256"),
    "unsupported solver": (lambda e: edit_manifest(e, lambda m: m["sampler"].update(solver="ddim")), "sampler.solver: 'ddim'"),
    "unsupported scheduler": (lambda e: edit_manifest(e, lambda m: m["sampler"]["scheduler"].update({"class": "VENoiseScheduler"})),
                              "sampler.scheduler.class: 'VENoiseScheduler'"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_engine_fails_clearly(aoti_engine_dir, runner, tmp_path, case):
    engine = shutil.copytree(aoti_engine_dir, tmp_path / "engine")
    inputs = make_inputs(engine, tmp_path)
    breaks, message = BROKEN[case]
    breaks(engine)
    done = run(runner / BINARY, engine, inputs, tmp_path / "out.npy")
    assert done.returncode != 0
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out.npy").exists()


def test_bad_inputs_fail_clearly(aoti_engine_dir, runner, tmp_path):
    inputs = make_inputs(aoti_engine_dir, tmp_path)
    latents = np.load(inputs["latents"])
    n, c, h, w = latents.shape
    vector = next(s for s in manifest_of(aoti_engine_dir)["io"]["inputs"] if s["kind"] == "vector")

    def saved(name: str, a: np.ndarray) -> Path:
        np.save(tmp_path / name, a)
        return tmp_path / name

    cases = [  # (replaced inputs, conditions left out, message)
        ({"latents": saved("shape.npy", latents[:, :, :-1])}, (), f"latents: expected float32 [N, {c}, {h}, {w}]"),
        ({"latents": saved("f64.npy", latents.astype(np.float64))}, (), "f64.npy: dtype '<f8' is not supported"),
        ({"latents": saved("fortran.npy", np.asfortranarray(latents))}, (), "fortran.npy: Fortran-order arrays are not supported"),
        ({}, (vector["name"],), f"missing condition '{vector['name']}'"),
        ({vector["name"]: saved("v.npy", np.zeros((n, vector["shape"][1] + 1), np.float32))}, (),
         f"condition '{vector['name']}': expected float32 [{n}, {vector['shape'][1]}]"),
        ({"extra": saved("extra.npy", np.zeros(n, np.float32))}, (), "unknown condition 'extra'"),
    ]
    for replaced, skip, message in cases:
        done = run(runner / BINARY, aoti_engine_dir, {**inputs, **replaced}, tmp_path / "out.npy", skip=skip)
        assert done.returncode != 0 and message in done.stderr and done.stderr.count("\n") == 1, (message, done.stderr)
    (tmp_path / "trunc.npy").write_bytes(inputs["latents"].read_bytes()[:-7])
    done = run(runner / BINARY, aoti_engine_dir, {**inputs, "latents": tmp_path / "trunc.npy"}, tmp_path / "out.npy")
    assert done.returncode != 0 and "trunc.npy: file has" in done.stderr and "(truncated)" in done.stderr
    assert not (tmp_path / "out.npy").exists()


def test_cpp_stage_survives_rename_and_cli(aoti_engine_dir, runner, tmp_path):
    """The finalize stage installs a runner that still works once the temporary directory is renamed;
    ``diffexport cpp`` prints the binary's path and refuses an engine without an aoti artifact."""
    from typer.testing import CliRunner

    from diffexport.cli import app

    building = shutil.copytree(aoti_engine_dir, tmp_path / ".tiny.building")
    cpp_stage(building, manifest_of(building))
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


def test_embed_example(aoti_engine_dir, runner):
    """examples/embed.cpp, linked against diffexport_runtime like a user's program, samples 5 images."""
    done = subprocess.run([str(runner / "embed"), str(aoti_engine_dir), str(N), "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"sample {i}" for i in range(N)]
    stds = [float(line.split("std ")[1]) for line in lines]
    assert all(np.isfinite(stds)) and max(stds) < 8  # denoised, not noise at sigma_max = 80
