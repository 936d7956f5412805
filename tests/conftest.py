"""Shared, session-scoped tiny engines: each is built once per test session and reused.

Fixtures (stable names; every engine directory follows docs/ENGINE_FORMAT.md, weights seeded and
redrawn by ``randomize_``, batch range [1, 4] unless noted):

* ``tiny_recipe_paths`` -- ``{name: Path}`` of the tiny recipe YAML files below (written once).
* ``built_quickstart`` -- the tiny recipe ``quickstart`` below (the pre-digits quickstart: SongUNet
  16x16, 3 channels, unconditional, seeded random weights, batch [1, 16]), target onnx only. The
  shipped ``recipes/quickstart.yaml`` (the trained digits model) is tested in test_digits.py.
* ``onnx_engine_dir`` -- alias of ``built_quickstart`` (an unconditional ONNX engine).
* ``built_conditional`` -- SongUNetPosEmbd 16x16, x 2 channels, an image condition ``cond``
  [3, 16, 16], a vector condition ``class_labels`` [4], sinusoidal grid; targets onnx **and aoti**
  (the session's only AOTInductor compile, about 60-100 s on 2 cores).
* ``aoti_engine_dir`` -- alias of ``built_conditional``.
* ``built_dhariwal`` -- DhariwalUNet 16x16 (32 channels) with ``class_labels`` [4]; onnx only.
* ``built_seed_unet`` -- the seed DDPM ``DiffusionModel`` (16x16, hidden dims [8, 16]) inside the
  DDPMPreconditioner (epsilon prediction, 1000 discrete steps), DDPMScheduler + ddim; onnx only.
* ``built_lead_time`` -- SongUNetPosLtEmbd 16x16, x 2 channels, an index condition ``lead_time_label``
  (``lead_time_steps: 4``, so values in [0, 4)), batch [1, 4], Heun x 4; onnx only.
* ``perturbed_onnx_engine`` -- ``(engine_dir, onnx.ModelProto, weight)``: a copy of ``built_quickstart``
  whose ONNX has one element of one decoder conv weight changed, the manifest hashes re-signed.

Every fixture engine is built with the parity stage (status ``ok``): ``engines.load`` refuses
unverified engines. Copy an engine directory (``shutil.copytree``) before modifying it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffexport.diffusion.testing import single_thread

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
EDM = {
    "preconditioner": {"class": "EDMPreconditioner", "args": {"sigma_data": 0.5}},
    "sampler": {"scheduler": {"class": "EDMNoiseScheduler", "args": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}}, "num_steps": 6},
}
# SongUNetPosEmbd's valid N_grid_channels per gridtype (0: no grid): what recipe strategies draw from.
GRID_CHANNELS = {"sinusoidal": [0, 4, 8], "learnable": [0, 1, 3], "linear": [0, 2], "test": [0, 2]}
TINY_RECIPES: dict[str, dict] = {
    "quickstart": {
        "name": "quickstart",
        "model": {"class": "SongUNet", "init": {"seed": 0}, "args": {**TINY, "in_channels": 3, "out_channels": 3}},
        "inputs": {"batch": {"min": 1, "opt": 4, "max": 16}},
        **EDM,
        "sampler": {**EDM["sampler"], "solver": "heun", "num_steps": 18},
        "export": {"targets": ["onnx", "aoti"], "precision": "fp32"},
        "deploy": {"triton": True, "cpp": False},
    },
    "conditional": {
        "name": "tiny-conditional",
        "model": {"class": "SongUNetPosEmbd", "init": {"seed": 1},
                  "args": {**TINY, "in_channels": 2 + 3 + 4, "out_channels": 2, "label_dim": 4, "gridtype": "sinusoidal", "N_grid_channels": 4}},
        "conditions": [{"name": "cond", "kind": "image", "shape": [3, 16, 16]}, {"name": "class_labels", "kind": "vector", "shape": [4]}],
        "inputs": {"batch": {"min": 1, "opt": 2, "max": 4}},
        "export": {"targets": ["onnx", "aoti"]},
        **EDM,
    },
    "dhariwal": {
        "name": "tiny-dhariwal",
        "model": {"class": "DhariwalUNet", "init": {"seed": 2},  # 64 channels at 8x8: one attention head
                  "args": {**TINY, "model_channels": 32, "in_channels": 3, "out_channels": 3, "label_dim": 4}},
        "conditions": [{"name": "class_labels", "kind": "vector", "shape": [4]}],
        "inputs": {"batch": {"min": 1, "opt": 2, "max": 4}},
        "export": {"targets": ["onnx"]},
        **EDM,
    },
    "lead_time": {
        "name": "tiny-lead-time",
        "model": {"class": "SongUNetPosLtEmbd", "init": {"seed": 5},
                  "args": {**TINY, "in_channels": 2 + 4 + 2, "out_channels": 2, "gridtype": "sinusoidal", "N_grid_channels": 4,
                           "lead_time_channels": 2, "lead_time_steps": 4}},
        "conditions": [{"name": "lead_time_label", "kind": "index"}],
        "inputs": {"batch": {"min": 1, "opt": 2, "max": 4}},
        "export": {"targets": ["onnx"]},
        **EDM,
        "sampler": {**EDM["sampler"], "num_steps": 4},
    },
    "seed_unet": {
        "name": "tiny-seed-unet",
        "model": {"class": "DiffusionModel", "init": {"seed": 3}, "args": {"image_size": 16, "channels": 3, "hidden_dims": [8, 16], "time_dim": 16}},
        "preconditioner": {"class": "DDPMPreconditioner", "args": {"num_train_timesteps": 1000}},
        "inputs": {"batch": {"min": 1, "opt": 2, "max": 4}},
        "sampler": {"scheduler": {"class": "DDPMScheduler", "args": {"num_train_timesteps": 1000}}, "solver": "ddim", "num_steps": 6},
        "export": {"targets": ["onnx"]},
    },
}


@pytest.fixture(scope="session")
def tiny_recipe_paths(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("recipes")
    paths = {}
    for key, data in TINY_RECIPES.items():
        paths[key] = folder / f"{data['name']}.yaml"
        paths[key].write_text(yaml.safe_dump(data, sort_keys=False))
    return paths


def _build(tmp_path_factory, recipe: Path, targets: list[str] | None = None) -> Path:
    """Build with the parity stage, as `diffexport build` does: consumers refuse unverified engines."""
    from diffexport.engines import build_engine
    from diffexport.parity import parity_stage

    out = tmp_path_factory.mktemp("engines") / recipe.stem
    result = build_engine(recipe, out, targets, finalize=[("parity", parity_stage)])
    assert result.manifest["status"] == "ok", f"{recipe}: fixture engine failed parity; see {out / 'parity.md'}"
    return result.engine_dir


@pytest.fixture(scope="session")
def built_quickstart(tmp_path_factory, tiny_recipe_paths) -> Path:
    return _build(tmp_path_factory, tiny_recipe_paths["quickstart"], ["onnx"])


@pytest.fixture(scope="session")
def onnx_engine_dir(built_quickstart) -> Path:
    return built_quickstart


@pytest.fixture(scope="session")
def built_conditional(tmp_path_factory, tiny_recipe_paths) -> Path:
    return _build(tmp_path_factory, tiny_recipe_paths["conditional"])


@pytest.fixture(scope="session")
def aoti_engine_dir(built_conditional) -> Path:
    return built_conditional


@pytest.fixture(scope="session")
def built_dhariwal(tmp_path_factory, tiny_recipe_paths) -> Path:
    return _build(tmp_path_factory, tiny_recipe_paths["dhariwal"])


@pytest.fixture(scope="session")
def built_lead_time(tmp_path_factory, tiny_recipe_paths) -> Path:
    return _build(tmp_path_factory, tiny_recipe_paths["lead_time"])


@pytest.fixture(scope="session")
def built_seed_unet(tmp_path_factory, tiny_recipe_paths) -> Path:
    return _build(tmp_path_factory, tiny_recipe_paths["seed_unet"])


@pytest.fixture
def one_thread():
    """Torch on one thread for a test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models run fastest so, and CI's 2 cores are shared."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def perturbed_onnx_engine(built_quickstart, tmp_path_factory):
    import shutil

    import onnx
    from onnx import numpy_helper

    from diffexport.engines import read_manifest
    from diffexport.engines.manifest import file_record, write_manifest

    weight = "preconditioner.model.model.dec.8x8_block0.conv0.weight"  # a conv of the quickstart decoder
    engine_dir = tmp_path_factory.mktemp("perturbed") / "perturbed"
    shutil.copytree(built_quickstart, engine_dir)
    model = onnx.load(str(engine_dir / "denoiser.onnx"))
    init = next(i for i in model.graph.initializer if i.name == weight)
    w = numpy_helper.to_array(init).copy()
    w.flat[3] += 1.0
    init.CopyFrom(numpy_helper.from_array(w, weight))
    onnx.save(model, str(engine_dir / "denoiser.onnx"))
    manifest = read_manifest(engine_dir)
    manifest["artifacts"]["onnx"].update(file_record(engine_dir, ["denoiser.onnx"]))
    write_manifest(engine_dir, manifest)
    return engine_dir, model, weight
