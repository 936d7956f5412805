"""Shipped recipes validate and say what they are; broken recipes fail naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPES

from diffexport.diffusion import preconditioners
from diffexport.engines.build import sampler_schedule
from diffexport.export import check_recipe
from diffexport.models import get_model_class
from diffexport.recipes import RecipeError, image_shape, io_spec, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))

# name -> (model class, parameter count in millions, rounded as published)
KNOWN = {
    "edm-cifar10-ddpmpp": ("SongUNet", 55.7),  # EDM paper, Table 7 (VP, DDPM++)
    "edm-cifar10-ncsnpp": ("SongUNet", 56.4),
    "adm-imagenet64": ("DhariwalUNet", 295.9),  # EDM paper, ImageNet-64 ADM
}


def meta_model(recipe) -> torch.nn.Module:
    with torch.device("meta"):
        return get_model_class(recipe.model.class_name)(**recipe.model.args)


def test_every_expected_recipe_is_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "edm-cifar10-ddpmpp", "edm-cifar10-ncsnpp", "adm-imagenet64", "corrdiff-like", "stormcast-like", "ddpm-simple"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_builds_its_pieces(path: Path):
    """Schema, model constructor (meta device), channel arithmetic, preconditioner and schedule."""
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    model = meta_model(recipe)
    c, h, w = image_shape(recipe)
    assert io_spec(recipe).inputs[0].shape == [-1, c, h, w]
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) or type(m).__name__ == "Conv2d")
    in_ch = first_conv.weight.shape[1]
    grid = recipe.model.args.get("N_grid_channels", 4) if recipe.model.class_name == "SongUNetPosEmbd" else 0
    assert in_ch == c + sum(cnd.shape[0] for cnd in recipe.conditions if cnd.kind == "image") + grid
    getattr(preconditioners, recipe.preconditioner.class_name)(model, **recipe.preconditioner.args)
    schedule = sampler_schedule(recipe)
    assert len(schedule["sigmas"]) == recipe.sampler.num_steps + 1 and schedule["sigmas"][-1] == 0.0


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_published_parameter_counts(name: str):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    cls, millions = KNOWN[name]
    assert recipe.model.class_name == cls
    count = sum(p.numel() for p in meta_model(recipe).parameters())
    assert round(count / 1e6, 1) == millions, count


def test_ddpmpp_is_edms_cifar10_config():
    a = load_recipe(RECIPES / "edm-cifar10-ddpmpp.yaml").model.args
    expected = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4,
                    num_blocks=4, attn_resolutions=[16], dropout=0.13, embedding_type="positional", encoder_type="standard",
                    decoder_type="standard", resample_filter=[1, 1])  # fmt: skip
    assert {k: a[k] for k in expected} == expected


def test_patch_recipe_samples_a_larger_image():
    recipe = load_recipe(RECIPES / "corrdiff-like.yaml")
    _, h, w = image_shape(recipe)
    H, W = recipe.sampler.patching.img_shape
    assert H > h and W > w


# --- broken recipes -------------------------------------------------------------------------

BASE = TINY_RECIPES["quickstart"]  # the tiny random-weights quickstart (no conditions, no checkpoint)


def _with(edit) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    edit(data)
    return data


BROKEN = {
    "unknown key": (lambda d: d["sampler"].update(num_stepz=4), "sampler.num_stepz: unknown key"),
    "wrong type": (lambda d: d["sampler"].update(num_steps="many"), "sampler.num_steps"),
    "impossible value": (lambda d: d["inputs"]["batch"].update(min=8, max=2), "inputs.batch"),
    "unknown model arg": (lambda d: d["model"]["args"].update(n_layers=3), "n_layers"),
    "unknown model class": (lambda d: d["model"].update({"class": "SongNet"}), "model.class"),
    "missing model arg": (lambda d: d["model"]["args"].pop("out_channels"), "model.args: SongUNet needs 'out_channels'"),
    "unknown preconditioner arg": (lambda d: d["preconditioner"].update(args={"sigma_dat": 0.5}), "preconditioner.args: unknown argument(s) sigma_dat"),
    "unknown scheduler arg": (lambda d: d["sampler"]["scheduler"].update(args={"rhoo": 7}), "sampler.scheduler.args: unknown argument(s) rhoo"),
    "channel mismatch": (lambda d: d.update(conditions=[{"name": "cond", "kind": "image", "shape": [2, 16, 16]}]), "model.args"),
    "bad condition shape": (lambda d: d.update(conditions=[{"name": "cond", "kind": "image", "shape": [3, 8, 8]}]), "conditions.cond.shape"),
    "unknown target": (lambda d: d["export"].update(targets=["onnx", "tflite"]), "export.targets[1]"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_recipe_names_file_and_field(case: str, tmp_path: Path):
    edit, field = BROKEN[case]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(_with(edit)))
    with pytest.raises(RecipeError) as err:
        check_recipe(load_recipe(path))  # what every build runs first
    assert str(path) in str(err.value) and field in str(err.value), str(err.value)


def test_not_yaml_and_missing_file_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="absent.yaml: cannot read"):
        load_recipe(tmp_path / "absent.yaml")
