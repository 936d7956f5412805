"""Shipped recipes validate and say what they are; broken recipes fail naming file and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GRID_CHANNELS, TINY_RECIPES

from diffexport.diffusion import preconditioners
from diffexport.engines.build import sampler_schedule
from diffexport.export import check_recipe, validate_recipe
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
    recipe = resolve_model(load_recipe(path))  # (the quickstart's class and args are its checkpoint's)
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
    "ADM head width": (lambda d: d["model"].update({"class": "DhariwalUNet", "args": {**TINY_RECIPES["dhariwal"]["model"]["args"], "label_dim": 0, "model_channels": 16}}),
                       "model.args.attn_resolutions: DhariwalUNet: attention on 32 channels has no head of 64 channels"),
    "label_dim without labels": (lambda d: d["model"]["args"].update(label_dim=3), "conditions: the model's label_dim is 3, so it needs class labels: add {name: class_labels, kind: vector, shape: [3]}"),
    "lead time without its input": (lambda d: d["model"].update({"class": "SongUNetPosLtEmbd"}) or d["model"]["args"].update(lead_time_channels=2, in_channels=3 + 4 + 2),
                                    "conditions: SongUNetPosLtEmbd needs its lead time: add {name: lead_time_label, kind: index}"),
    "bad condition shape": (lambda d: d.update(conditions=[{"name": "cond", "kind": "image", "shape": [3, 8, 8]}]), "conditions.cond.shape"),
    "unknown target": (lambda d: d["export"].update(targets=["onnx", "tflite"]), "export.targets[1]"),
    # solver and scheduler must fit (issue 9 item 7 / issue 13 item 5)
    "DDPM + heun": (lambda d: d["sampler"].update(scheduler={"class": "DDPMScheduler"}, num_steps=10), "sampler.solver: solver 'heun' needs a LinearGaussianNoiseScheduler"),
    "EDM + ddim": (lambda d: d["sampler"].update(solver="ddim"), "for EDMNoiseScheduler use one of: euler, heun, edm_stochastic_euler, edm_stochastic_heun"),
    "unknown solver option": (lambda d: d["sampler"].update(solver_options={"S_chrun": 1}), "sampler.solver_options: unknown argument(s) S_chrun for HeunSolver; expected some of: alpha"),
    "negative S_churn": (lambda d: d["sampler"].update(solver="edm_stochastic_heun", solver_options={"S_churn": -1}), "sampler.solver_options.S_churn: EDMStochasticHeunSolver: must be >= 0"),
    "solver option type": (lambda d: d["sampler"].update(solver="edm_stochastic_euler", solver_options={"S_noise": "loud"}), "sampler.solver_options.S_noise: must be float"),
    "solver option set by the sampler": (lambda d: d["sampler"].update(solver="edm_stochastic_heun", solver_options={"num_steps": 3}), "sampler.solver_options.num_steps: set by sampler.num_steps"),
    "heun alpha": (lambda d: d["sampler"].update(solver_options={"alpha": 0}), "sampler.solver_options.alpha: HeunSolver: must be in (0, 1]"),
    "sigma_min > sigma_max": (lambda d: d["sampler"]["scheduler"]["args"].update(sigma_min=100), "sampler.scheduler.args.sigma_max: EDMNoiseScheduler: must be > sigma_min = 100"),
    "sigma_min <= 0": (lambda d: d["sampler"]["scheduler"]["args"].update(sigma_min=0), "sampler.scheduler.args.sigma_min: EDMNoiseScheduler: must be > 0"),
    "rho <= 0": (lambda d: d["sampler"]["scheduler"]["args"].update(rho=0), "sampler.scheduler.args.rho: EDMNoiseScheduler: must be > 0"),
    "nan scheduler arg": (lambda d: d["sampler"]["scheduler"]["args"].update(rho=float("nan")), "sampler.scheduler.args.rho: must be a number, got nan"),
    "inf preconditioner arg": (lambda d: d["preconditioner"]["args"].update(sigma_data=float("inf")), "preconditioner.args.sigma_data: must be finite"),
    "nan schema field": (lambda d: d.update(parity={"final_rtol": float("nan")}), "parity.final_rtol"),
    "sigma_data <= 0": (lambda d: d["preconditioner"]["args"].update(sigma_data=0), "preconditioner.args.sigma_data: EDMPreconditioner: must be > 0"),
    "VP sigma over float32": (lambda d: d["sampler"].update(scheduler={"class": "VPNoiseScheduler", "args": {"beta_d": 100.0, "t_max": 2.0}}),
                              "sampler.scheduler.args: VPNoiseScheduler gives noise levels beyond float32"),
    "DDPM sigma over float32": (lambda d: d["sampler"].update(scheduler={"class": "DDPMScheduler", "args": {"beta_end": 0.9}}, solver="ddim", num_steps=4),
                                "sampler.scheduler.args: DDPMScheduler gives noise levels beyond float32"),
    "DDPM steps > T": (lambda d: d["sampler"].update(scheduler={"class": "DDPMScheduler", "args": {"num_train_timesteps": 5}}, solver="ddim", num_steps=10), "sampler.num_steps: DDPMScheduler: must be <= num_train_timesteps = 5"),
    "iDDPM steps > levels": (lambda d: d["sampler"].update(scheduler={"class": "IDDPMNoiseScheduler", "args": {"sigma_max": 0.01}}, num_steps=3),
                             "sampler.num_steps: IDDPMNoiseScheduler: must be <= 2: the iDDPM table of M = 1000 has 2 levels between "
                             "sigma_min = 0.002 and sigma_max = 0.01"),
    "guidance with patching": (lambda d: d.update(conditions=[{"name": "class_labels", "kind": "vector", "shape": [4]}],
                                                  model={**d["model"], "args": {**d["model"]["args"], "label_dim": 4}},
                                                  sampler={**d["sampler"], "guidance": {"cfg": 2.0}, "patching": {"img_shape": [24, 24]}}),
                               "sampler.guidance: classifier-free guidance is not supported with sampler.patching"),
    "image smaller than the patch": (lambda d: d["sampler"].update(patching={"img_shape": [8, 48]}),
                                     "sampler.patching.img_shape: [8, 48] is smaller than the engine's 16x16 patch"),
    "patch overlap > patch": (lambda d: d["sampler"].update(patching={"img_shape": [32, 32], "overlap_pix": 20}), "sampler.patching: GridPatching2D"),
    "absurd batch": (lambda d: d["inputs"]["batch"].update(max=10**21), "inputs.batch.max: Input should be less than or equal to 4096"),
    "absurd steps": (lambda d: d["sampler"].update(num_steps=10**9), "sampler.num_steps: Input should be less than or equal to 10000"),
    "opset": (lambda d: d["export"].update(opset=99), "export.opset: Input should be less than or equal to 23"),
    "in_channels 0": (lambda d: d["model"]["args"].update(in_channels=0), "model.args.in_channels: must be an int in [1, 4096], got 0"),
    "channel_mult []": (lambda d: d["model"]["args"].update(channel_mult=[]), "model.args.channel_mult: SongUNet: must be a non-empty list"),
    "model_channels 0": (lambda d: d["model"]["args"].update(model_channels=0), "model.args.model_channels: SongUNet: must be an int >= 1"),
    "model arg type": (lambda d: d["model"]["args"].update(model_channels=16.5), "model.args.model_channels: must be int"),
    "resolution vs levels": (lambda d: d["model"]["args"].update(img_resolution=15), "model.args.img_resolution: SongUNet: spatial size (15, 15)"),
    "missing checkpoint": (lambda d: d["model"].update(checkpoint="no/such/model.mdlus"), "model.checkpoint: "),
    "checkpoint is a folder": (lambda d: d["model"].update(checkpoint="/"), "model.checkpoint: / is not a file"),
    "huge image": (lambda d: d["model"]["args"].update(img_resolution=10**6), "model.args.img_resolution: must be an int in [1, 8192]"),
    # a precision the target cannot build: refused before any export, not an ONNX/OpenVINO error after it
    "bf16 onnx": (lambda d: d["export"].update(precision="bf16"), "export.precision: bf16 with target onnx: ONNX Runtime has no bf16 kernels"),
    "fp16 openvino": (lambda d: d["export"].update(targets=["openvino"], precision="fp16"), "export.precision: fp16 with target openvino"),
    "bf16 tensorrt opset 21": (lambda d: d["export"].update(targets=["tensorrt"], precision="bf16"), "export.opset >= 22 (got 21)"),
    # export.device is the aoti target's compile device: the manifest recorded 'cuda' for a CPU-only OpenVINO engine
    "cuda openvino": (lambda d: d["export"].update(targets=["openvino"], device="cuda"),
                      "export.device: cuda is the device the aoti target compiles for; targets openvino do not use it (openvino runs on the CPU"),
    "iDDPM levels repeated": (lambda d: d.update(preconditioner={"class": "IDDPMPreconditioner", "args": {}}),
                              "sampler.num_steps: 18 steps of EDMNoiseScheduler rounded to IDDPMPreconditioner's noise levels"),
    "cuda onnx tensorrt": (lambda d: d["export"].update(targets=["onnx", "tensorrt"], device="cuda"), "targets onnx, tensorrt do not use it"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_recipe_names_file_and_field(case: str, tmp_path: Path):
    edit, field = BROKEN[case]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(_with(edit)))
    with pytest.raises(RecipeError) as err:
        check_recipe(load_recipe(path))  # what every build runs first
    assert str(path) in str(err.value) and field in str(err.value), str(err.value)


@pytest.mark.parametrize("targets", [["aoti", "openvino"], "auto"])
def test_cuda_export_device_with_a_target_compiled_for_it_validates(targets):
    """``export.device: cuda`` is refused only without a target that compiles for it (aoti)."""
    assert validate_recipe(_with(lambda d: d["export"].update(targets=targets, device="cuda"))).export.device == "cuda"


def test_inf_is_refused_with_a_hint_where_it_is_the_default():
    """S_max's default is +inf: the message says to leave it out (the manifest is strict JSON)."""
    data = _with(lambda d: d["sampler"].update(solver="edm_stochastic_heun", solver_options={"S_churn": 10, "S_max": float("inf")}))
    with pytest.raises(RecipeError, match=r"sampler.solver_options.S_max: must be finite, got inf; leave it out for its default \(inf\)"):
        validate_recipe(data)


def test_every_problem_is_reported_at_once(tmp_path: Path):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(_with(lambda d: (d["sampler"].update(solver="ddim"), d["preconditioner"]["args"].update(sigma_data=-1)))))
    with pytest.raises(RecipeError) as err:
        validate_recipe(path)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2 and all(line.strip().startswith(str(path)) for line in lines), lines


def test_manifest_sampler_is_resolved():
    """Scheduler args with their defaults, the solver's resolved options, and a step table."""
    recipe = load_recipe(RECIPES / "quickstart.yaml").model_copy()
    s = sampler_schedule(recipe)
    assert s["scheduler"]["args"] == {"sigma_min": 0.002, "sigma_max": 80, "rho": 7, "sigma_data": 0.5, "P_mean": -1.2, "P_std": 1.2}
    assert s["solver_args"] == {"alpha": 1.0} and s["discrete"] is False
    assert len(s["steps"]) == recipe.sampler.num_steps and len(s["steps"][0]["evals"]) == 2 and len(s["steps"][-1]["evals"]) == 1
    e = s["steps"][0]["evals"][0]
    assert e["sigma"] == 80 and e["c_x"] == pytest.approx(1 / 80) and e["c_d"] == pytest.approx(-1 / 80)
    stochastic = _with(lambda d: d["sampler"].update(solver="edm_stochastic_heun", solver_options={"S_churn": 40}))
    s = sampler_schedule(validate_recipe(stochastic))
    assert s["solver_args"]["S_max"] == "inf" and s["solver_args"]["S_churn"] == 40 and s["steps"][0]["churn"]["x_scale"] == 1.0
    json.dumps(s, allow_nan=False)  # strict JSON, as the manifest is written
    ddpm = sampler_schedule(load_recipe(RECIPES / "ddpm-simple.yaml"))
    assert ddpm["discrete"] and ddpm["time_steps"][-1] == -1 and "ddim" in ddpm["steps"][0]


def test_not_yaml_and_missing_file_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="absent.yaml: cannot read"):
        load_recipe(tmp_path / "absent.yaml")


# --- the YAML reader (issue 13 item 3) -------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize("text, message", [
    (BOMB, "too large once its aliases are expanded"),
    ("a: &a [1]\nb: *a\nname: x\nname: y\n", "duplicate key 'name' (first on line 3)"),
    ("model:\n  class: SongUNet\n  class: DhariwalUNet\n", "duplicate key 'class' (first on line 2)"),
    ("a: &a\n  b: *a\n", "recursive alias"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
], ids=["alias bomb", "duplicate top-level key", "duplicate nested key", "recursive alias", "deep nesting"])
def test_yaml_reader_refuses_unsafe_documents(tmp_path: Path, text: str, message: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("data, message", [
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "a binary file"),
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    (b"# " + b"x" * (1 << 20) + b"\n", "larger than 1048576 bytes"),
    ("name: x\n".encode("utf-16"), "UTF-16 text; save the recipe as UTF-8"),
], ids=["binary", "latin-1", "oversized", "utf-16"])
def test_yaml_reader_refuses_files_that_are_not_small_utf8_text(tmp_path: Path, data: bytes, message: str):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_yaml_reader_keeps_shared_anchors_and_merge_keys(tmp_path: Path):
    base = {k: v for k, v in BASE.items() if k not in ("parity", "deploy")}
    path = tmp_path / "anchors.yaml"
    path.write_text(yaml.safe_dump(base) + "parity: &p {batch: 2}\ndeploy: {<<: {triton: false}, cpp: false}\n")
    recipe = load_recipe(path)
    assert recipe.parity.batch == 2 and recipe.deploy.triton is False


# --- one source of truth (issue 9 item 8) ----------------------------------------------------


def test_content_key_covers_diffexports_own_source():
    from diffexport.engines.manifest import content_key, source_sha256

    args = ("w" * 64, {"name": "x"}, {"torch": "2"}, {"type": "cpu"}, ["parity"])
    assert content_key(*args) == content_key(*args, source=source_sha256())
    assert content_key(*args, source="a" * 64) != content_key(*args, source="b" * 64)
    assert len(source_sha256()) == 64


def test_reference_is_built_from_the_manifests_recipe(built_quickstart: Path, tmp_path: Path):
    """recipe.yaml is a copy for people; the torch reference reads manifest["recipe"] (what the content key hashes)."""
    import shutil

    from diffexport.engines.manifest import read_manifest, write_manifest
    from diffexport.engines.torch_engine import TorchEngine
    from diffexport.recipes import IOSpec

    engine = tmp_path / "e"
    shutil.copytree(built_quickstart, engine)
    manifest = read_manifest(engine)
    io = IOSpec.from_dict(manifest["io"])
    x, sigma = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5, 3.0])
    before = TorchEngine(engine, io)(x, sigma)
    (engine / "recipe.yaml").write_text((engine / "recipe.yaml").read_text().replace("sigma_data: 0.5", "sigma_data: 0.9"))
    torch.testing.assert_close(TorchEngine(engine, io)(x, sigma), before, rtol=0, atol=0)
    manifest["recipe"]["preconditioner"]["args"]["sigma_data"] = 0.9
    write_manifest(engine, manifest)
    assert not torch.allclose(TorchEngine(engine, io)(x, sigma), before)


# --- property: any sampler either validates into a finite schedule or is refused by name -----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NUM = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 2000))
_SCHEDULER_ARGS = {
    "EDMNoiseScheduler": ["sigma_min", "sigma_max", "rho"], "VENoiseScheduler": ["sigma_min", "sigma_max"],
    "VPNoiseScheduler": ["beta_min", "beta_d", "epsilon_s", "t_max"], "IDDPMNoiseScheduler": ["sigma_min", "sigma_max", "C_1", "C_2"],
    "DDPMScheduler": ["num_train_timesteps", "beta_start", "beta_end"],
}
_OPTIONS = ["S_churn", "S_min", "S_max", "S_noise", "alpha", "eta"]


@st.composite
def _samplers(draw):
    cls = draw(st.sampled_from(sorted(_SCHEDULER_ARGS)))
    args = draw(st.dictionaries(st.sampled_from(_SCHEDULER_ARGS[cls]), _NUM, max_size=3))
    solver = draw(st.sampled_from(["euler", "heun", "edm_stochastic_euler", "edm_stochastic_heun", "ddim"]))
    options = draw(st.dictionaries(st.sampled_from(_OPTIONS), _NUM, max_size=2))
    return {"scheduler": {"class": cls, "args": args}, "solver": solver, "num_steps": draw(st.integers(1, 40)), "solver_options": options}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(sampler=_samplers())
def test_any_sampler_validates_to_a_finite_schedule_or_is_refused(sampler):
    data = _with(lambda d: d.update(sampler=sampler))
    try:
        recipe = validate_recipe(data)
    except RecipeError as e:
        lines = str(e).splitlines()
        assert lines[0] == "invalid recipe" and all(line.startswith("  <recipe>: sampler") for line in lines[1:]), str(e)
        return
    s = sampler_schedule(recipe)
    json.dumps(s, allow_nan=False)
    sig = s["sigmas"]
    assert all(a > b for a, b in zip(sig, sig[1:])) and sig[-1] == 0.0 and len(s["steps"]) == sampler["num_steps"]


def test_vp_recipe_exports_with_the_sigma_contract(tmp_path: Path):
    """A VP recipe (VPPreconditioner + VPNoiseScheduler) builds an ONNX engine that takes σ and
    matches the eager reference, from σ_max of the schedule down to its smallest σ."""
    from diffexport.engines import build_engine
    from diffexport.engines.manifest import read_manifest
    from diffexport.engines.onnxruntime import OnnxRuntimeEngine
    from diffexport.engines.torch_engine import TorchEngine
    from diffexport.recipes import IOSpec

    data = _with(lambda d: (d.update(preconditioner={"class": "VPPreconditioner", "args": {}}, name="tiny-vp"),
                            d["sampler"].update(scheduler={"class": "VPNoiseScheduler", "args": {}}, num_steps=4),
                            d["export"].update(targets=["onnx"]), d.update(deploy={})))
    path = tmp_path / "vp.yaml"
    path.write_text(yaml.safe_dump(data))
    engine = build_engine(path, tmp_path / "vp").engine_dir
    manifest = read_manifest(engine)
    sampler, io = manifest["sampler"], IOSpec.from_dict(manifest["io"])
    assert sampler["scheduler"]["args"] == {"beta_min": 0.1, "beta_d": 19.1, "epsilon_s": 1e-3, "t_max": 1.0}  # PhysicsNeMo 2.2's defaults
    ort, ref = OnnxRuntimeEngine(engine / manifest["artifacts"]["onnx"]["file"], io), TorchEngine(engine, io)
    sigma = torch.tensor([sampler["sigmas"][0], sampler["sigmas"][-2]], dtype=torch.float32)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * sigma.reshape(-1, 1, 1, 1)
    want = ref(x, sigma)
    torch.testing.assert_close(ort(x, sigma), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    pre = ref.denoiser.preconditioner  # PhysicsNeMo's API: forward at diffusion time t = sigma_inv(sigma)
    with torch.no_grad():
        torch.testing.assert_close(pre(x, pre.sigma_inv(sigma)), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@st.composite
def _grid_models(draw):
    """A consistent SongUNetPosEmbd / SongUNetPosLtEmbd recipe: in_channels = x + image condition
    + positional grid (any gridtype, 0 channels included) + lead-time channels."""
    cls = draw(st.sampled_from(["SongUNetPosEmbd", "SongUNetPosLtEmbd"]))
    gridtype = draw(st.sampled_from(["sinusoidal", "learnable", "linear", "test"]))
    grid = draw(st.sampled_from(GRID_CHANNELS[gridtype]))
    lead = draw(st.integers(1, 3)) if cls == "SongUNetPosLtEmbd" else 0
    x, cond = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    h, w = draw(st.sampled_from([8, 16])), draw(st.sampled_from([8, 16]))
    args = dict(img_resolution=[h, w], in_channels=x + cond + grid + lead, out_channels=x, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[], dropout=0.0, gridtype=gridtype, N_grid_channels=grid)
    conditions = [{"name": "cond", "kind": "image", "shape": [cond, h, w]}] if cond else []
    if lead:
        args.update(lead_time_channels=lead, lead_time_steps=3)
        conditions.append({"name": "lead_time_label", "kind": "index"})
    return {"class": cls, "args": args, "init": {"seed": 0}}, conditions, (x, h, w)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(drawn=_grid_models())
def test_grid_models_channel_accounting_matches_the_model(drawn):
    model, conditions, shape = drawn
    recipe = validate_recipe(_with(lambda d: d.update(model=model, conditions=conditions)))
    assert image_shape(recipe) == shape


# --- model class and args from the checkpoint ---------------------------------------------------

import zipfile  # noqa: E402

from diffexport.checkpoints import save_model  # noqa: E402
from diffexport.export import build_denoiser, resolve_model  # noqa: E402
from diffexport.models.init import randomize_  # noqa: E402

SONG = {**BASE["model"]["args"]}  # the tiny quickstart's SongUNet (3 channels, 16x16)


def _song(**args) -> torch.nn.Module:
    return randomize_(get_model_class("SongUNet")(**{**SONG, **args}), 0)


def _mdlus(path: Path, name: str, args: dict, state: dict) -> Path:
    """A PhysicsNeMo 2.x .mdlus of ``state`` whose args.json says ``name(**args)``."""
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model.pt", buffer.getvalue())
        archive.writestr("args.json", json.dumps({"__name__": name, "__module__": "physicsnemo.x", "__args__": args}))
    return path


def _recipe_file(folder: Path, model: dict, **top) -> Path:
    """The tiny quickstart with ``model`` (and top-level ``top``) replaced, written beside the checkpoints."""
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(_with(lambda d: d.update(model=model, **top))))
    return path


def _refusal(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as err:
        validate_recipe(path)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid recipe" and all(line.startswith(f"  {path}: ") for line in lines[1:]), lines
    return [line.removeprefix(f"  {path}: ") for line in lines[1:]]


def test_recipe_with_only_a_checkpoint_takes_its_class_and_args(tmp_path: Path):
    net = _song()
    save_model(net, tmp_path / "song.mdlus")
    path = _recipe_file(tmp_path, {"checkpoint": "song.mdlus"})
    assert load_recipe(path).model.class_name is None  # (parsing alone does not read the checkpoint)
    recipe = validate_recipe(path)
    assert recipe.model.class_name == "SongUNet" and recipe.model.args == net._init_args
    assert str(recipe._source) == str(path.resolve()) and io_spec(recipe).inputs[0].shape == [-1, 3, 16, 16]
    denoiser = build_denoiser(load_recipe(path))  # the build merges the same way
    assert type(denoiser.preconditioner.model.model).__name__ == "SongUNet"
    assert torch.equal(denoiser.preconditioner.model.model.enc["16x16_conv"].weight, net.enc["16x16_conv"].weight)


def test_recipe_args_override_single_checkpoint_args(tmp_path: Path):
    save_model(_song(), tmp_path / "song.mdlus")
    path = _recipe_file(tmp_path, {"class": "SongUNet", "checkpoint": "song.mdlus", "args": {"dropout": 0.25, "use_apex_gn": False}})
    recipe = validate_recipe(path)
    assert recipe.model.args == {**_song()._init_args, "dropout": 0.25, "use_apex_gn": False}
    assert build_denoiser(load_recipe(path)).preconditioner.model.model._init_args["dropout"] == 0.25
    # a refused override is the recipe's own field; the checkpoint's channel count meets the recipe's conditions
    path = _recipe_file(tmp_path, {"checkpoint": "song.mdlus", "args": {"model_channels": 0}})
    assert _refusal(path) == ["model.args.model_channels: SongUNet: must be an int >= 1, got 0"]
    path = _recipe_file(tmp_path, {"checkpoint": "song.mdlus"}, conditions=[{"name": "c", "kind": "image", "shape": [2, 16, 16]}])
    assert _refusal(path)[0].startswith("model.args: the model takes 3 image channels but x has 3 and the image conditions add 2")


def test_recipe_class_other_than_the_checkpoints_is_one_line_naming_both(tmp_path: Path):
    save_model(_song(), tmp_path / "song.mdlus")
    path = _recipe_file(tmp_path, {"class": "DhariwalUNet", "checkpoint": "song.mdlus"})
    assert _refusal(path) == [f"model.class: {tmp_path / 'song.mdlus'} holds a SongUNet, not a DhariwalUNet (class_name, recipe: "
                              "model.class): leave the class out to take the checkpoint's, or name SongUNet"]


def test_recipe_of_a_wrapped_corrdiff_checkpoint_takes_its_backbone(tmp_path: Path):
    """An EDMPrecondSuperResolution .mdlus (CorrDiff's diffusion model): its SongUNetPosEmbd backbone, in_channels =
    img_in_channels (image condition + grid) + img_out_channels."""
    tiny = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    wrapper = dict(img_resolution=[16, 8], img_in_channels=3, img_out_channels=2, use_fp16=False, model_type="SongUNetPosEmbd",
                   sigma_data=0.5, sigma_min=0.0, sigma_max=80.0, gridtype="linear", N_grid_channels=2, **tiny)
    backbone = dict(img_resolution=[16, 8], in_channels=5, out_channels=2, gridtype="linear", N_grid_channels=2, **tiny)
    net = randomize_(get_model_class("SongUNetPosEmbd")(**backbone), 0)
    _mdlus(tmp_path / "sr.mdlus", "EDMPrecondSuperResolution", wrapper, {f"model.{k}": v for k, v in net.state_dict().items()})
    cond = [{"name": "img_lr", "kind": "image", "shape": [1, 16, 8]}]
    recipe = validate_recipe(_recipe_file(tmp_path, {"checkpoint": "sr.mdlus"}, conditions=cond))
    assert recipe.model.class_name == "SongUNetPosEmbd" and recipe.model.args == backbone
    assert [s.shape for s in io_spec(recipe).inputs] == [[-1, 2, 16, 8], [-1], [-1, 1, 16, 8]]
    assert build_denoiser(recipe).preconditioner.model.model.state_dict().keys() == net.state_dict().keys()
    refused = _refusal(_recipe_file(tmp_path, {"class": "SongUNet", "checkpoint": "sr.mdlus"}, conditions=cond))
    assert refused == [f"model.class: {tmp_path / 'sr.mdlus'} holds a SongUNetPosEmbd (the backbone of its EDMPrecondSuperResolution), "
                       "not a SongUNet (class_name, recipe: model.class): leave the class out to take the checkpoint's, or name SongUNetPosEmbd"]


def test_recipe_of_a_plain_state_dict_needs_class_and_args(tmp_path: Path):
    torch.save(_song().state_dict(), tmp_path / "weights.pt")
    (line,) = _refusal(_recipe_file(tmp_path, {"checkpoint": "weights.pt"}))
    assert line.startswith(f"model.class: {tmp_path / 'weights.pt'} is a plain state_dict") and "model.class and model.args" in line
    (line,) = _refusal(_recipe_file(tmp_path, {"class": "SongUNet", "checkpoint": "weights.pt"}))
    assert line == f"model.args: {tmp_path / 'weights.pt'} is a plain state_dict, which records no constructor arguments: give them in model.args"
    recipe = validate_recipe(_recipe_file(tmp_path, {"class": "SongUNet", "checkpoint": "weights.pt", "args": SONG}))
    assert recipe.model.args == SONG
    assert _refusal(_recipe_file(tmp_path, {"args": SONG})) == ["model: class: required without a checkpoint (a .mdlus checkpoint names its class)"]


def test_bad_args_json_is_refused_naming_the_checkpoint(tmp_path: Path):
    state = _song().state_dict()
    ckpt = _mdlus(tmp_path / "m.mdlus", "SongUNet", {**SONG, "bogus": 1}, state)
    (line,) = _refusal(_recipe_file(tmp_path, {"checkpoint": "m.mdlus"}))
    assert line.startswith("model.args: unknown argument(s) bogus for SongUNet") and line.endswith(f" (from {ckpt} args.json)"), line
    _mdlus(ckpt, "SongUNet", {**SONG, "img_resolution": "16"}, state)
    (line,) = _refusal(_recipe_file(tmp_path, {"checkpoint": "m.mdlus"}))
    assert line.startswith("model.args.img_resolution: must be") and line.endswith(f"got '16' (Input should be a valid integer) (from {ckpt} args.json)"), line
    with zipfile.ZipFile(ckpt, "w") as archive:
        archive.writestr("model.pt", b"")
        archive.writestr("args.json", "{not json")
    (line,) = _refusal(_recipe_file(tmp_path, {"checkpoint": "m.mdlus"}))
    assert line.startswith(f"model.checkpoint: {ckpt}: args.json is not a PhysicsNeMo model description"), line


def test_engine_records_the_checkpoints_class_and_args_and_rebuilds_when_they_change(tmp_path: Path):
    """manifest["recipe"] and recipe.yaml hold the merged class and args (self-describing: the reference needs no
    checkpoint); new args.json, same weights: a new content key."""
    from diffexport.engines import build_engine
    from diffexport.engines.torch_engine import engine_recipe

    net = _song()
    save_model(net, tmp_path / "song.mdlus")
    path = _recipe_file(tmp_path, {"checkpoint": "song.mdlus", "args": {"dropout": 0.0}}, export={"targets": ["onnx"]}, deploy={})
    first = build_engine(path, tmp_path / "e")
    model = first.manifest["recipe"]["model"]
    assert (model["class"], model["args"]) == ("SongUNet", net._init_args)
    assert yaml.safe_load((first.engine_dir / "recipe.yaml").read_text())["model"] == model
    assert engine_recipe(first.engine_dir).model.args == net._init_args
    net._init_args["label_dropout"] = 0.5  # (no effect at eval, no weight changes)
    save_model(net, tmp_path / "song.mdlus")
    second = build_engine(path, tmp_path / "e")
    assert second.built and second.manifest["weights"] == first.manifest["weights"]
    assert second.manifest["content_key"] != first.manifest["content_key"]
    assert second.manifest["recipe"]["model"]["args"]["label_dropout"] == 0.5
    from diffexport.engines.base import EngineError
    from diffexport.engines.manifest import read_manifest, write_manifest

    manifest = read_manifest(second.engine_dir)
    del manifest["recipe"]["model"]["class"]  # an unresolved recipe: the engine would no longer describe itself
    write_manifest(second.engine_dir, manifest)
    with pytest.raises(EngineError, match="field 'recipe' is not a valid recipe: model.class: missing"):
        read_manifest(second.engine_dir)


_OVERRIDES = {"dropout": st.sampled_from([0.0, 0.3, -0.5]), "model_channels": st.sampled_from([0, 8]), "label_dim": st.sampled_from([0, 3]),
              "channel_mult": st.sampled_from([[1], [1, 2], []]), "out_channels": st.sampled_from([3, 2]), "img_resolution": st.sampled_from([16, 15])}


@pytest.fixture(scope="module")
def song_mdlus(tmp_path_factory) -> Path:
    return save_model(_song(), tmp_path_factory.mktemp("ckpt") / "song.mdlus")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], derandomize=True)
@given(overrides=st.fixed_dictionaries({}, optional=_OVERRIDES))
def test_checkpoint_recipe_validates_as_the_recipe_spelling_out_its_args(song_mdlus, overrides):
    """Validation sees the merged class and args: the same verdict, the same lines (less the note naming args.json)."""
    def verdict(model: dict):
        try:
            recipe = validate_recipe(_with(lambda d: d.update(model=model)))
        except RecipeError as e:
            return str(e).replace(f" (from {song_mdlus} args.json)", "")
        return recipe.model.class_name, recipe.model.args

    merged = {**_song()._init_args, **overrides}
    assert verdict({"checkpoint": str(song_mdlus), "args": overrides}) == verdict({"class": "SongUNet", "args": merged})


@pytest.mark.parametrize("target", ["onnx", "aoti", "openvino", "tensorrt"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("opset", [21, 22])
def test_validation_refuses_exactly_the_unsupported_precisions(target: str, precision: str, opset: int, tmp_path: Path):
    """Named targets: refused by validation iff ``precision_unsupported``; ``targets: auto``: skipped with that reason."""
    from diffexport.engines.build import unavailable
    from diffexport.export import precision_unsupported

    why = precision_unsupported(target, precision, opset)
    assert (why is not None) == ((target, precision) in {("onnx", "bf16"), ("openvino", "fp16")} or (target, precision, opset) == ("tensorrt", "bf16", 21))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_with(lambda d: d["export"].update(targets=[target], precision=precision, opset=opset))))
    if why is None:
        check_recipe(load_recipe(path))
    else:
        with pytest.raises(RecipeError, match=re.escape(f"export.precision: {precision} with target {target}: {why}")):
            check_recipe(load_recipe(path))
        assert unavailable(target, precision, opset) == why  # targets: auto skips it before lowering anything
