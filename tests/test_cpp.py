"""The embedded C++ runner (``diffexport-sample``) against the Python runtime sampler.

One tiny conditioned engine (image, vector and index conditions; batch range [2, 3]) is
exported to AOTInductor once per session, and the C++ project is built once into the shared
cache; every test copies or runs them.
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

C, H, W, N = 3, 8, 8, 4  # N = 4 rows with batch max 3: chunks of 3 and 1 (padded to min 2)
STEPS = 6


class TinyBackbone(nn.Module):
    """``F(x, t, condition, class_labels, lead)``: every input reaches the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C + 2, C, 3, padding=1)
        self.labels, self.lead, self.noise = nn.Linear(4, C), nn.Embedding(5, C), nn.Linear(1, C)

    def forward(self, x, t, condition=None, class_labels=None, lead=None):
        emb = self.labels(class_labels) + self.lead(lead) + self.noise(t[:, None])
        return torch.tanh(self.conv(torch.cat([x, condition], 1)) + emb[:, :, None, None])


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory) -> Path:
    """A conditioned AOTI engine directory per docs/ENGINE_FORMAT.md (one AOTI compile)."""
    from diffexport.diffusion import EDMNoiseScheduler, EDMPreconditioner
    from diffexport.engines.manifest import FORMAT, file_record, write_manifest
    from diffexport.export import Denoiser, example_inputs, export_aoti
    from diffexport.models.init import randomize_
    from diffexport.recipes import IOSpec, TensorSpec

    out = tmp_path_factory.mktemp("cpp") / "tiny"
    out.mkdir()
    conditions = [TensorSpec("cond_img", [-1, 2, H, W], "float32", "image"), TensorSpec("labels", [-1, 4], "float32", "vector"),
                  TensorSpec("lead", [-1], "int64", "index")]
    io = IOSpec([TensorSpec("x", [-1, C, H, W], kind="x"), TensorSpec("sigma", [-1], kind="sigma"), *conditions],
                [TensorSpec("denoised", [-1, C, H, W], kind="denoised")], {"min": 2, "opt": 2, "max": 3})
    denoiser = Denoiser(EDMPreconditioner(randomize_(TinyBackbone(), seed=1), sigma_data=0.5), conditions, index_high=5)
    # export_program passes one dynamic-shape entry per input, which torch.export rejects for
    # Denoiser.forward(x, sigma, *conditions); the conditions need one nested tuple.
    batch = torch.export.Dim("batch", min=2, max=3)
    program = torch.export.export(denoiser.eval(), example_inputs(io, 2, index_high=5), strict=False,
                                  dynamic_shapes=({0: batch}, {0: batch}, tuple({0: batch} for _ in conditions)))
    art = export_aoti(program, io, out / "denoiser.pt2")
    scheduler = {"class": "EDMNoiseScheduler", "args": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}}
    times = EDMNoiseScheduler(**scheduler["args"]).timesteps(STEPS, dtype=torch.float64).tolist()
    write_manifest(out, {
        "format": FORMAT, "name": "tiny", "status": "unchecked", "io": io.to_dict(),
        "sampler": {"scheduler": scheduler, "solver": "heun", "num_steps": STEPS, "solver_options": {},
                    "time_steps": times, "sigmas": times, "alphas": [1.0] * len(times), "patching": None},
        "artifacts": {"aoti": {**file_record(out, art["files"]), "device": art["device"], "precision": art["precision"]}},
    })  # fmt: skip
    return out


@pytest.fixture(scope="session")
def runner() -> Path:
    """The build folder holding ``diffexport-sample`` and the ``embed`` example (one cached build)."""
    return build_tree(targets=(BINARY, "embed"))


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Seeded latents (x_N = σ_max·ε) and conditions as .npy files."""
    d, rng = tmp_path_factory.mktemp("inputs"), np.random.default_rng(0)
    arrays = {"latents": 80.0 * rng.standard_normal((N, C, H, W)), "cond_img": rng.standard_normal((N, 2, H, W)),
              "labels": rng.standard_normal((N, 4)), "lead": rng.integers(0, 5, N)}
    for name, a in arrays.items():
        np.save(d / f"{name}.npy", a.astype(np.int64 if name == "lead" else np.float32))
    return {name: d / f"{name}.npy" for name in arrays}


def copy_engine(src: Path, dst: Path, **sampler) -> Path:
    """A copy of ``src`` with ``sampler`` fields replaced in its manifest."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["sampler"].update(sampler)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def run(binary: Path, engine: Path, inputs: dict[str, Path], out: Path, *extra: str, conditions=("cond_img", "labels", "lead")):
    cmd = [str(binary), "--engine", str(engine), "--latents", str(inputs["latents"]), "--out", str(out), *extra]
    for name in conditions:
        cmd += ["--condition", f"{name}={inputs[name]}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def python_samples(engine: Path, inputs: dict[str, Path], num_steps: int | None = None) -> torch.Tensor:
    """The Python runtime sampler (diffexport.diffusion.samplers.sample) on the same AOTI package."""
    from diffexport.engines.aoti import AOTIEngine
    from diffexport.recipes import IOSpec
    from diffexport.runtime.sampler import sample

    manifest = json.loads((engine / "manifest.json").read_text())
    aoti = AOTIEngine(engine / "denoiser.pt2", IOSpec.from_dict(manifest["io"]))
    conds = {k: torch.from_numpy(np.load(inputs[k])) for k in ("cond_img", "labels", "lead")}
    return sample(aoti, manifest["sampler"], latents=torch.from_numpy(np.load(inputs["latents"])), conditions=conds, num_steps=num_steps)


@pytest.mark.parametrize("solver,steps,evaluations", [("heun", None, 2 * STEPS - 1), ("euler", None, STEPS), ("heun", 4, 7)])
def test_matches_python_sampler(engine_dir, runner, inputs, tmp_path, solver, steps, evaluations):
    engine = copy_engine(engine_dir, tmp_path / "engine", solver=solver)
    extra = ["--steps", str(steps)] if steps else []
    done = run(runner / BINARY, engine, inputs, tmp_path / "out.npy", *extra, "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert f"{evaluations} evaluations per batch" in done.stderr
    ours = torch.from_numpy(np.load(tmp_path / "out.npy"))
    ref = python_samples(engine, inputs, steps)
    assert ours.shape == ref.shape == (N, C, H, W)
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-4, f"C++ vs Python relative L2 {rel:.2e}"
    assert float(ours.std()) < 10, "samples should be denoised, not the latents' noise (std 80)"


def test_npy_versions_and_robust_manifest(engine_dir, runner, inputs, tmp_path):
    """v2/v3 .npy headers read like v1; a manifest with unicode escapes and extra fields still loads."""
    engine = copy_engine(engine_dir, tmp_path / "engine", note="caf\u00e9 \U0001F600 \"q\" \\ /", extra=[1.5e-3, -2, True, None])
    assert run(runner / BINARY, engine, inputs, tmp_path / "v1.npy").returncode == 0
    latents = np.load(inputs["latents"])
    for version in [(2, 0), (3, 0)]:
        path = tmp_path / f"latents{version[0]}.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array(f, latents, version=version)
        done = run(runner / BINARY, engine, {**inputs, "latents": path}, tmp_path / "v.npy")
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), np.load(tmp_path / "v1.npy"))


def _flip_bytes(engine: Path) -> None:
    data = bytearray((engine / "denoiser.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (engine / "denoiser.pt2").write_bytes(bytes(data))


BROKEN = {
    "missing manifest": (lambda e: (e / "manifest.json").unlink(), "manifest.json: missing"),
    "bad json": (lambda e: (e / "manifest.json").write_text('{"format": "diffexport-engine/1", "io": [1, }'), "invalid JSON"),
    "missing key": (lambda e: _edit_manifest(e, lambda m: m["io"].pop("batch")), "io.batch: required key is missing"),
    "missing artifact": (lambda e: (e / "denoiser.pt2").unlink(), "denoiser.pt2: missing"),
    "sha256 mismatch": (_flip_bytes, "denoiser.pt2: corrupted"),
    "unsupported solver": (lambda e: _edit_manifest(e, lambda m: m["sampler"].update(solver="ddim")), "sampler.solver: 'ddim'"),
    "unsupported scheduler": (lambda e: _edit_manifest(e, lambda m: m["sampler"]["scheduler"].update({"class": "VENoiseScheduler"})),
                              "sampler.scheduler.class: 'VENoiseScheduler'"),
}


def _edit_manifest(engine: Path, edit) -> None:
    manifest = json.loads((engine / "manifest.json").read_text())
    edit(manifest)
    (engine / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", BROKEN)
def test_broken_engine_fails_clearly(engine_dir, runner, inputs, tmp_path, case):
    engine = tmp_path / "engine"
    shutil.copytree(engine_dir, engine)
    breaks, message = BROKEN[case]
    breaks(engine)
    done = run(runner / BINARY, engine, inputs, tmp_path / "out.npy")
    assert done.returncode != 0
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out.npy").exists()


def test_bad_inputs_fail_clearly(engine_dir, runner, inputs, tmp_path):
    def save(name, a):
        np.save(tmp_path / name, a)
        return tmp_path / name

    rng = np.random.default_rng(1)
    cases = [
        ({"latents": save("shape.npy", rng.standard_normal((N, C, H + 1, W)).astype(np.float32))}, (), "latents: expected float32 [N, 3, 8, 8]"),
        ({"latents": save("f64.npy", rng.standard_normal((N, C, H, W)))}, (), "dtype '<f8' is not supported"),
        ({"latents": save("fortran.npy", np.asfortranarray(rng.standard_normal((N, C, H, W)).astype(np.float32)))}, (), "Fortran-order"),
        ({}, ("cond_img", "labels"), "missing condition 'lead'"),
        ({"labels": save("labels3.npy", rng.standard_normal((N, 3)).astype(np.float32))}, None, "condition 'labels': expected float32 [4, 4]"),
        ({"lead": save("leadf.npy", np.zeros(N, np.float32))}, None, "condition 'lead': expected int64 [4]"),
    ]
    for override, conditions, message in cases:
        done = run(runner / BINARY, engine_dir, {**inputs, **override}, tmp_path / "out.npy",
                   conditions=conditions if conditions is not None else ("cond_img", "labels", "lead"))
        assert done.returncode != 0 and message in done.stderr, (message, done.stderr)
    (tmp_path / "trunc.npy").write_bytes(inputs["latents"].read_bytes()[:-7])
    done = run(runner / BINARY, engine_dir, {**inputs, "latents": tmp_path / "trunc.npy"}, tmp_path / "out.npy")
    assert done.returncode != 0 and "trunc.npy" in done.stderr and "truncated" in done.stderr


def test_cpp_stage_survives_rename_and_cli(engine_dir, runner, inputs, tmp_path):
    """The finalize stage installs a binary that works after the temp dir is renamed; `diffexport cpp` prints it."""
    from typer.testing import CliRunner

    from diffexport.cli import app

    tmp_engine = tmp_path / ".tiny.tmp"
    shutil.copytree(engine_dir, tmp_engine)
    manifest = json.loads((tmp_engine / "manifest.json").read_text())
    assert cpp_stage(tmp_engine, manifest) == tmp_engine / "cpp" / BINARY
    final = tmp_engine.rename(tmp_path / "tiny")
    done = run(final / "cpp" / BINARY, final, inputs, tmp_path / "out.npy")
    assert done.returncode == 0, done.stderr
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()

    result = CliRunner().invoke(app, ["cpp", str(final)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(final / "cpp" / BINARY)
    _edit_manifest(final, lambda m: m["artifacts"].pop("aoti"))
    result = CliRunner().invoke(app, ["cpp", str(final)])
    assert result.exit_code != 0 and "needs an 'aoti' artifact" in result.output


def test_embed_example(engine_dir, runner):
    done = subprocess.run([str(runner / "embed"), str(engine_dir), "5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith(f"sample {i}: mean ") for i, line in enumerate(lines))
    stds = [float(line.split("std ")[1]) for line in lines]
    assert all(np.isfinite(stds)) and max(stds) < 10  # denoised, not noise at sigma_max = 80
