"""``global_index`` engine input: a patch-trained SongUNetPosEmbd (CorrDiff) whose positional grid
spans the global image, exported patch-sized, fed each patch's global pixel coordinates.

One tiny ONNX-only engine (learnable, randomised grid so the positions matter) is built per session.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from tensordict import TensorDict

from diffexport.diffusion import samplers
from diffexport.diffusion.multi_diffusion import GridPatching2D, PatchBasedPredictor
from diffexport.diffusion.utils import edm_x0_predictor
from diffexport.engines import load, read_manifest
from diffexport.export import random_global_index
from diffexport.recipes import RecipeError, parse_recipe
from diffexport.runtime import SamplerSpec, sample
from diffexport.runtime.inputs import random_call
from diffexport.testing import assert_engine_parity

GLOBAL, PATCH = [24, 32], [16, 16]
RECIPE = {
    "name": "tiny-global-index",
    "model": {"class": "SongUNetPosEmbd", "args": {
        "img_resolution": GLOBAL, "in_channels": 2 + 2 + 4, "out_channels": 2, "model_channels": 16,
        "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [12], "gridtype": "learnable",
        "N_grid_channels": 4}, "init": {"seed": 3}},  # attention at the 2nd level: 24 >> 1 = 12
    "conditions": [{"name": "coarse", "kind": "image", "shape": [2, *PATCH]}],
    "inputs": {"batch": {"min": 1, "opt": 4, "max": 8}},
    "sampler": {"scheduler": {"class": "EDMNoiseScheduler", "args": {"sigma_max": 80.0}}, "solver": "heun", "num_steps": 4,
                "patching": {"img_shape": GLOBAL, "patch_shape": PATCH, "overlap_pix": 4, "boundary_pix": 2, "global_index": True}},
    "export": {"targets": ["onnx"]},
    "parity": {"enabled": False, "num_sigmas": 3, "batch": 2},
}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from diffexport.engines import build_engine

    path = tmp_path_factory.mktemp("recipes") / "tiny-global-index.yaml"
    path.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return build_engine(path, tmp_path_factory.mktemp("engines") / "tiny-global-index", ["onnx"]).engine_dir


@pytest.fixture(scope="module")
def engines(engine_dir):
    return load(engine_dir, "onnxruntime", allow_unverified=True), load(engine_dir, "torch")  # built with parity off


def test_manifest_declares_the_global_index_input(engine_dir):
    io = read_manifest(engine_dir)["io"]
    assert [s["name"] for s in io["inputs"]] == ["x", "sigma", "coarse", "global_index"]
    gi = io["inputs"][-1]
    assert (gi["dtype"], gi["shape"], gi["kind"], gi["grid"]) == ("int64", [-1, 2, *PATCH], "global_index", GLOBAL)


def test_random_global_index_is_a_window_of_the_grid(engines):
    spec = engines[0].io.inputs[-1]
    gi = random_global_index(spec, 64, torch.Generator().manual_seed(0))
    assert gi.dtype == torch.int64 and list(gi.shape) == [64, 2, *PATCH]
    assert gi.min() >= 0 and (gi[:, 0].max() < GLOBAL[0]) and (gi[:, 1].max() < GLOBAL[1])
    assert torch.equal(gi[:, 0, 1:] - gi[:, 0, :-1], torch.ones(64, PATCH[0] - 1, PATCH[1], dtype=torch.long))  # rows step down
    assert torch.equal(gi[:, 1, :, 1:] - gi[:, 1, :, :-1], torch.ones(64, PATCH[0], PATCH[1] - 1, dtype=torch.long))
    assert len({tuple(g[:, 0, 0].tolist()) for g in gi}) > 1  # windows differ between samples


def window(top: int, left: int, batch: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(PATCH[0]) + top, torch.arange(PATCH[1]) + left, indexing="ij")
    return torch.stack([rows, cols])[None].repeat(batch, 1, 1, 1)


def test_onnx_matches_torch_and_uses_global_index(engines):
    onnx, ref = engines
    g = torch.Generator().manual_seed(1)
    for sigma in (0.05, 2.0, 40.0):
        inputs = random_call(onnx, sigma, 3, g)
        assert rel_l2(onnx(**inputs), ref(**inputs)) <= 1e-5
    top_left = onnx(**{**inputs, "global_index": window(0, 0, 3)})
    bottom_right = onnx(**{**inputs, "global_index": window(GLOBAL[0] - PATCH[0], GLOBAL[1] - PATCH[1], 3)})
    assert rel_l2(top_left, bottom_right) > 1e-3


def test_patched_sampling_matches_the_reference_model(engine_dir, engines):
    onnx, ref = engines
    spec = SamplerSpec.from_manifest(read_manifest(engine_dir)["sampler"])
    g = torch.Generator().manual_seed(2)
    latents, coarse = 80.0 * torch.randn(2, 2, *GLOBAL, generator=g), torch.randn(2, 2, *GLOBAL, generator=g)
    # batch 2 x 12 patches = 24 rows: chunked into engine calls of 8 with their global_index rows
    out = sample(onnx, spec, latents=latents, conditions={"coarse": coarse})
    assert rel_l2(out, sample(ref, spec, latents=latents, conditions={"coarse": coarse})) <= 1e-4
    # the whole batch through the reference model's own global_index path (one grid per patch row)
    patching = GridPatching2D(tuple(GLOBAL), tuple(PATCH), 4, 2)
    x0 = edm_x0_predictor(ref.denoiser.preconditioner, spec.scheduler)
    predictor = PatchBasedPredictor(x0, patching, condition=TensorDict({"cond_concat": coarse}, batch_size=[2]), pass_global_index=True)
    with torch.no_grad():
        expected = samplers.sample(spec.scheduler.get_denoiser(x0_predictor=predictor), latents, spec.scheduler, spec.num_steps,
                                   solver=spec.solver, time_steps=spec.time_steps)
    assert rel_l2(out, expected) <= 1e-4
    # and batch 1 through the engine
    one = sample(onnx, spec, latents=latents[:1], conditions={"coarse": coarse[:1]})
    assert rel_l2(one, expected[:1]) <= 1e-4


def test_parity_passes(engine_dir):
    report = assert_engine_parity(engine_dir, "onnxruntime")
    assert report["backends"]["onnxruntime"]["passed"]


def _broken(edit) -> dict:
    data = copy.deepcopy(RECIPE)
    edit(data)
    return data


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["model"].update({"class": "SongUNet"}), "sampler.patching.global_index"),
    (lambda d: d["sampler"]["patching"].pop("patch_shape"), "patch_shape"),
    (lambda d: d["model"]["args"].update({"img_resolution": [24, 24]}), "model.args.img_resolution"),
])
def test_recipe_errors_name_the_field(edit, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        parse_recipe(_broken(edit), "tiny.yaml")


def test_triton_configs(engine_dir):
    from diffexport.deploy.triton.config import denoiser_config, sampler_io
    from diffexport.recipes import IOSpec

    io = IOSpec.from_dict(read_manifest(engine_dir)["io"])
    from diffexport.deploy.triton.config import pb2

    gi = denoiser_config("m", io, platform="onnxruntime_onnx").input[-1]
    assert (gi.name, pb2().DataType.Name(gi.data_type), list(gi.dims)) == ("global_index", "TYPE_INT64", [2, *PATCH])
    assert "global_index" not in [s.name for s in sampler_io(io).inputs]  # the sampler fills it
    # clients of the sampler send and receive whole images, not patches
    manifest = read_manifest(engine_dir)
    sio = sampler_io(io, manifest["sampler"]["patching"]["img_shape"])
    shapes = {s.name: s.shape for s in [*sio.inputs, *sio.outputs]}
    assert shapes["latents"][2:] == list(GLOBAL) and shapes["samples"][2:] == list(GLOBAL) and shapes["coarse"][2:] == list(GLOBAL)
