"""Checkpoint import/export (diffexport.checkpoints): .mdlus 2.x ZIP / 1.x tar, plain state_dicts."""

import copy
import io
import json
import math
import os
import shlex
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from diffexport.checkpoints import CheckpointError, checkpoint_model, constructor_args, load_model, save_model
from diffexport.models import get_model_class
from diffexport.models.base import Module
from diffexport.models.diffusion import DiffusionModel
from diffexport.models.legacy import upgrade_legacy_state_dict

ARGS = dict(image_size=8, channels=2, hidden_dims=[8, 16], time_dim=16)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter drawn from N(0, 1/fan_in): all non-zero, unlike init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model.eval()


@pytest.fixture
def model() -> DiffusionModel:
    return randomized(DiffusionModel(**ARGS))


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        return torch.equal(a(x, t), b(x, t))


def write_archive(path: Path, members: dict[str, bytes], fmt: str = "zip") -> Path:
    """A .mdlus-like archive: ZIP (PhysicsNeMo 2.x) or tar (1.x) of ``members``."""
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(path, "w") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def mdlus_members(state_dict, name="DiffusionModel", args=ARGS, module="physicsnemo.x") -> dict:
    spec = {"__name__": name, "__module__": module, "__args__": args}
    return {
        "model.pt": torch_bytes(state_dict),
        "args.json": json.dumps(spec).encode(),
        "metadata.json": b'{"mdlus_file_version": "0.1.0"}',
    }


# --- save -> load ---------------------------------------------------------------------------


def test_save_load_round_trip(model, tmp_path):
    path = save_model(model, tmp_path / "seed.mdlus")
    loaded = load_model(path)
    assert type(loaded) is DiffusionModel and not loaded.training
    assert loaded._init_args == model._init_args
    assert same_outputs(model, loaded)
    assert not same_outputs(randomized(DiffusionModel(**ARGS), seed=1), loaded)  # test can fail


def test_saved_archive_has_physicsnemo_2x_layout(model, tmp_path):
    path = save_model(model, tmp_path / "seed.mdlus")
    assert not tarfile.is_tarfile(path)  # PhysicsNeMo tries the 1.x tar layout first
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["args.json", "metadata.json", "model.pt"]
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
        spec = json.loads(archive.read("args.json"))
        metadata = json.loads(archive.read("metadata.json"))
        state = torch.load(io.BytesIO(archive.read("model.pt")), weights_only=True)
    assert spec == {"__name__": "DiffusionModel", "__module__": "diffexport.models.diffusion", "__args__": ARGS}
    assert metadata["mdlus_file_version"] == "0.1.0"
    assert state.keys() == model.state_dict().keys()
    assert not list(tmp_path.glob("*.tmp"))


def test_save_model_needs_recorded_constructor_args(tmp_path):
    with pytest.raises(TypeError, match="diffexport.models.base.Module"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.mdlus")
    assert not list(tmp_path.iterdir())


def test_save_model_refuses_args_json_cannot_hold(tmp_path):
    class Typed(Module):
        def __init__(self, dtype=torch.float64):
            super().__init__()

    with pytest.raises(TypeError, match="JSON serializable"):
        save_model(Typed(), tmp_path / "x.mdlus")


def test_base_module_records_bound_args():
    class Net(Module):
        def __init__(self, a, b=2, *rest, c=3, **extra):
            super().__init__()
            self.lin = torch.nn.Linear(a, b)

    net = Net(4, 5, 6, d=7)
    assert constructor_args(net) == {"a": 4, "b": 5, "c": 3, "d": 7}  # *rest cannot be rebuilt
    assert copy.deepcopy(net)._init_args == net._init_args
    constructor_args(net)["a"] = 0  # a copy
    assert net._init_args["a"] == 4


# --- PhysicsNeMo archives and plain state_dicts -----------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_loads_physicsnemo_archives_with_model_prefix(model, tmp_path, fmt):
    state = {f"model.{k}": v for k, v in model.state_dict().items()}  # 1.x wrapper prefix
    members = mdlus_members(state, module="modulus.models.diffusion.song_unet")
    loaded = load_model(write_archive(tmp_path / "old.mdlus", members, fmt))
    assert same_outputs(model, loaded)


def test_tar_with_dot_slash_member_names(model, tmp_path):
    members = {f"./{k}": v for k, v in mdlus_members(model.state_dict()).items()}
    assert same_outputs(model, load_model(write_archive(tmp_path / "m.mdlus", members, "tar")))


def test_mdlus_args_override(model, tmp_path):
    members = mdlus_members(model.state_dict(), args={**ARGS, "image_size": 16})
    loaded = load_model(write_archive(tmp_path / "m.mdlus", members), args={"image_size": 8})
    assert loaded._init_args["image_size"] == 8


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd}, lambda sd: {"model": sd, "epoch": 3}])
def test_plain_state_dict_with_class_and_args(model, tmp_path, wrap):
    path = tmp_path / "weights.pt"
    torch.save(wrap(model.state_dict()), path)
    loaded = load_model(path, class_name="DiffusionModel", args=ARGS)
    assert type(loaded) is DiffusionModel and same_outputs(model, loaded)


def test_plain_state_dict_with_ddp_prefix(model, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    assert same_outputs(model, load_model(path, class_name="DiffusionModel", args=ARGS))


def test_map_location(model, tmp_path):
    loaded = load_model(save_model(model, tmp_path / "m.mdlus"), map_location="meta")
    assert loaded.device.type == "meta"


# --- errors -------------------------------------------------------------------------------------


def test_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    state = {"init_conv.weight": torch.zeros(1), "evil": Payload()}
    archive = write_archive(tmp_path / "evil.mdlus", mdlus_members(state))
    plain = tmp_path / "evil.pt"
    plain.write_bytes(torch_bytes(state))
    for path, kwargs in ((archive, {}), (plain, {"class_name": "DiffusionModel", "args": ARGS})):
        with pytest.raises(CheckpointError, match=r"refused .*references (posix|os)\.system"):
            load_model(path, **kwargs)
        assert not marker.exists()
    torch.load(plain, weights_only=False)  # control: the payload is live
    assert marker.exists()


def test_pickled_module_is_refused(model, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="references diffexport.models.diffusion.DiffusionModel.*state_dict"):
        load_model(path, class_name="DiffusionModel", args=ARGS)


def test_unknown_class_lists_known(model, tmp_path):
    path = write_archive(tmp_path / "m.mdlus", mdlus_members(model.state_dict(), name="FNO"))
    with pytest.raises(CheckpointError, match="'FNO'.*known classes: .*DiffusionModel.*SongUNet"):
        load_model(path)


def test_missing_and_unexpected_keys_are_listed(model, tmp_path):
    state = dict(model.state_dict())
    del state["out_conv.bias"], state["init_conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_model(write_archive(tmp_path / "m.mdlus", mdlus_members(state)))
    message = str(err.value)
    assert "missing keys (2): init_conv.weight, out_conv.bias" in message
    assert "unexpected keys (1): extra.weight" in message


def test_shape_mismatch_names_key_expected_and_got(model, tmp_path):
    state = dict(model.state_dict())
    state["out_conv.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"out_conv.bias \(model expects \[2\], checkpoint has \[5\]\)"):
        load_model(write_archive(tmp_path / "m.mdlus", mdlus_members(state)))


def test_wrong_constructor_args(model, tmp_path):
    path = write_archive(tmp_path / "m.mdlus", mdlus_members(model.state_dict(), args={"bogus": 1}))
    with pytest.raises(CheckpointError, match="cannot build DiffusionModel.*bogus"):
        load_model(path)


@pytest.mark.parametrize("missing", ["args.json", "model.pt"])
def test_archive_missing_member(model, tmp_path, missing):
    members = mdlus_members(model.state_dict())
    del members[missing]
    with pytest.raises(CheckpointError, match=f"lacks {missing}"):
        load_model(write_archive(tmp_path / "m.mdlus", members))


def test_bad_args_json(model, tmp_path):
    members = {**mdlus_members(model.state_dict()), "args.json": b'{"__args__": {}}'}
    with pytest.raises(CheckpointError, match="args.json is not a PhysicsNeMo model description"):
        load_model(write_archive(tmp_path / "m.mdlus", members))


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_truncated_archive(model, tmp_path, fmt):
    path = write_archive(tmp_path / "m.mdlus", mdlus_members(model.state_dict()), fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_truncated_plain_file(model, tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(torch_bytes(model.state_dict())[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path, class_name="DiffusionModel", args=ARGS)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", bytes(range(256)) * 4])
def test_non_checkpoint_file(tmp_path, content):
    path = tmp_path / "junk.mdlus"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt, truncated, or neither a .mdlus archive nor a torch.save file"):
        load_model(path)


def test_plain_state_dict_needs_class_name(model, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="pass class_name="):
        load_model(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"net": {"w": 1}, "step": 3}, path)
    with pytest.raises(CheckpointError, match="entries net, step are not tensors"):
        load_model(path, class_name="DiffusionModel", args=ARGS)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state_dict"):
        load_model(path, class_name="DiffusionModel", args=ARGS)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.mdlus")


# --- SongUNet (PhysicsNeMo's diffusion backbone) ---------------------------------------------

SONG = dict(
    img_resolution=16, in_channels=2, out_channels=2, model_channels=16,
    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
)


def song_unet() -> torch.nn.Module:
    model = randomized(get_model_class("SongUNet")(**SONG))
    model._init_args = dict(SONG)  # in case SongUNet does not subclass models.base.Module yet
    return model


def same_song_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, sigma = torch.randn(2, 2, 16, 16), torch.tensor([0.3, 20.0])
    with torch.no_grad():
        return torch.equal(a(x, sigma, None), b(x, sigma, None))


def test_song_unet_round_trip_names_physicsnemo_module(tmp_path):
    model = song_unet()
    path = save_model(model, tmp_path / "song.mdlus")
    with zipfile.ZipFile(path) as archive:
        spec = json.loads(archive.read("args.json"))
    assert spec["__name__"] == "SongUNet"
    assert spec["__module__"] == "physicsnemo.models.diffusion_unets"
    loaded = load_model(path)
    assert type(loaded) is type(model) and same_song_outputs(model, loaded)
    assert not same_song_outputs(randomized(get_model_class("SongUNet")(**SONG), seed=1), loaded)


@pytest.mark.parametrize("act", ["default", None])
def test_saved_song_unet_names_its_activation(tmp_path, act):
    """PhysicsNeMo 2.x builds U-Net blocks *without* activation from ``"act": null``: args.json must
    say ``"silu"`` (PhysicsNeMo's default) for a model that uses SiLU, as must the shipped digits.mdlus."""
    kwargs = {} if act == "default" else {"act": act}
    with zipfile.ZipFile(save_model(get_model_class("SongUNet")(**SONG, **kwargs), tmp_path / "m.mdlus")) as archive:
        assert json.loads(archive.read("args.json"))["__args__"]["act"] == "silu"
    with zipfile.ZipFile(Path(__file__).resolve().parents[1] / "recipes" / "models" / "digits.mdlus") as archive:
        assert json.loads(archive.read("args.json"))["__args__"]["act"] == "silu"


def test_song_unet_physicsnemo_1x_tar_with_legacy_names(tmp_path):
    """1.x: tar, ``model.``-prefixed keys, attention on the block (``norm2``/``qkv``/``proj``),
    no ``map_noise.freqs``; the model's own load hooks map the names, load_model the rest."""
    model = song_unet()
    legacy = {
        "model." + k.replace("attn.norm.", "norm2.").replace("attn.", ""): v
        for k, v in model.state_dict().items()
        if k != "map_noise.freqs"
    }
    assert "model.enc.8x8_block0.norm2.weight" in legacy
    members = mdlus_members(legacy, "SongUNet", SONG, "modulus.models.diffusion.song_unet")
    loaded = load_model(write_archive(tmp_path / "old.mdlus", members, "tar"))
    assert same_song_outputs(model, loaded)


def test_physicsnemo_1x_device_buffer_is_ignored(tmp_path):
    """PhysicsNeMo 1.x's Module base persisted an empty ``device_buffer`` in every model.pt."""
    model = song_unet()
    state = {"device_buffer": torch.empty(0), **model.state_dict()}
    members = mdlus_members(state, "SongUNet", SONG, "modulus.models.diffusion.song_unet")
    assert same_song_outputs(model, load_model(write_archive(tmp_path / "old.mdlus", members, "tar")))
    fresh = get_model_class("SongUNet")(**SONG).eval()
    fresh.load_state_dict(state, strict=True)  # the models accept it directly too
    assert same_song_outputs(model, fresh)
    with pytest.raises(CheckpointError, match="unexpected keys.*device_buffer"):  # a real tensor is not dropped
        load_model(write_archive(tmp_path / "bad.mdlus", mdlus_members(
            {**state, "device_buffer": torch.ones(1)}, "SongUNet", SONG), "tar"))


TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
INF = float("inf")
# PhysicsNeMo preconditioner checkpoints (args.json as Module.__new__ records them, defaults applied):
# (wrapper, its args, the backbone diffexport builds, its args, the wrapper's own state-dict entries)
WRAPPED = [
    ("EDMPrecond", dict(img_resolution=16, img_channels=2, label_dim=3, use_fp16=False, sigma_min=0.0, sigma_max=INF,
                        sigma_data=0.5, model_type="SongUNet", img_in_channels=5, img_out_channels=None, **TINY),
     "SongUNet", dict(img_resolution=16, in_channels=5, out_channels=2, label_dim=3, **TINY), {}),
    ("EDMPrecondSuperResolution", dict(img_resolution=[16, 8], img_in_channels=3, img_out_channels=2, use_fp16=False,
                                       model_type="SongUNetPosEmbd", sigma_data=0.5, sigma_min=0.0, sigma_max=INF,
                                       gridtype="linear", N_grid_channels=2, **TINY),
     "SongUNetPosEmbd", dict(img_resolution=[16, 8], in_channels=5, out_channels=2, gridtype="linear", N_grid_channels=2, **TINY), {}),
    ("EDMPrecondSR", dict(img_resolution=16, img_channels=2, img_in_channels=3, img_out_channels=2, use_fp16=False,
                          sigma_min=0.0, sigma_max=INF, sigma_data=0.5, model_type="SongUNet", scale_cond_input=False, **TINY),
     "SongUNet", dict(img_resolution=16, in_channels=5, out_channels=2, **TINY), {}),
    ("VPPrecond", dict(img_resolution=16, img_channels=2, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
                       epsilon_t=1e-5, model_type="SongUNet", **TINY),
     "SongUNet", dict(img_resolution=16, in_channels=2, out_channels=2, label_dim=0, **TINY), {}),
    ("VEPrecond", dict(img_resolution=16, img_channels=2, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100.0,
                       model_type="SongUNet", **TINY),
     "SongUNet", dict(img_resolution=16, in_channels=2, out_channels=2, label_dim=0, **TINY), {}),
    ("iDDPMPrecond", dict(img_resolution=16, img_channels=2, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                          model_type="DhariwalUNet", **{**TINY, "model_channels": 32}),
     "DhariwalUNet", dict(img_resolution=16, in_channels=2, out_channels=4, label_dim=0, **{**TINY, "model_channels": 32}),
     {"u": torch.linspace(80, 0.002, 1001)}),
]


@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize("wrapper,wrapper_args,backbone,backbone_args,own", WRAPPED, ids=[w[0] for w in WRAPPED])
def test_physicsnemo_preconditioner_checkpoint_loads_its_backbone(tmp_path, fmt, wrapper, wrapper_args, backbone, backbone_args, own):
    """A PhysicsNeMo EDMPrecond / EDMPrecondSuperResolution / ... .mdlus (CorrDiff's diffusion checkpoints) holds
    the backbone under ``model.``; load_model builds that backbone (the recipe's preconditioner replaces the wrapper)."""
    net = randomized(get_model_class(backbone)(**backbone_args))
    state = {"device_buffer": torch.empty(0), **own, **{f"model.{k}": v for k, v in net.state_dict().items()},
             "model.device_buffer": torch.empty(0)}
    module = "physicsnemo.diffusion.preconditioners" if fmt == "zip" else "modulus.models.diffusion.preconditioning"
    path = write_archive(tmp_path / "precond.mdlus", mdlus_members(state, wrapper, wrapper_args, module), fmt)
    for loaded in (load_model(path), load_model(path, class_name=backbone)):  # the recipe path names the backbone
        assert type(loaded) is type(net) and loaded._init_args == net._init_args
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())


def test_class_name_other_than_the_checkpoints_is_refused_naming_both(tmp_path):
    wrapper, args, backbone, backbone_args, _ = WRAPPED[1]  # EDMPrecondSuperResolution around SongUNetPosEmbd
    net = get_model_class(backbone)(**backbone_args)
    path = write_archive(tmp_path / "sr.mdlus", mdlus_members({f"model.{k}": v for k, v in net.state_dict().items()}, wrapper, args))
    for read in (load_model, checkpoint_model):
        with pytest.raises(CheckpointError, match="holds a SongUNetPosEmbd .the backbone of its EDMPrecondSuperResolution., "
                                                  "not a SongUNet .class_name, recipe: model.class.") as err:
            read(path, class_name="SongUNet")
        assert err.value.field == "class" and "\n" not in str(err.value)


def test_class_name_builds_a_class_diffexport_does_not_know_as_one_it_does(model, tmp_path):
    """The documented override: a checkpoint of a class diffexport lacks (e.g. a renamed subclass) loads as a named one."""
    path = write_archive(tmp_path / "m.mdlus", mdlus_members(model.state_dict(), name="MyDiffusionModel"))
    assert checkpoint_model(path, class_name="DiffusionModel") == ("DiffusionModel", ARGS, "MyDiffusionModel", None)
    assert same_outputs(model, load_model(path, class_name="DiffusionModel"))
    with pytest.raises(CheckpointError, match="'MyDiffusionModel' model, which diffexport does not implement"):
        checkpoint_model(path)


@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize("wrapper,wrapper_args,backbone,backbone_args,own", WRAPPED, ids=[w[0] for w in WRAPPED])
def test_checkpoint_model_is_what_load_model_builds_from_args_json_alone(tmp_path, monkeypatch, fmt, wrapper, wrapper_args,
                                                                          backbone, backbone_args, own):
    net = get_model_class(backbone)(**backbone_args)
    members = mdlus_members({**own, **{f"model.{k}": v for k, v in net.state_dict().items()}}, wrapper, wrapper_args)
    path = write_archive(tmp_path / "w.mdlus", {"big-unused.bin": bytes(1 << 20), **members}, fmt)
    read = []
    real_zip, real_tar = zipfile.ZipFile.open, tarfile.TarFile.extractfile
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: read.append(getattr(name, "filename", name)) or real_zip(self, name, *a, **k))
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or real_tar(self, m))
    found = checkpoint_model(path)
    assert read == ["args.json"]  # no weights
    assert found == (backbone, backbone_args, backbone, wrapper)
    assert checkpoint_model(path, class_name=backbone, args={"dropout": 0.5}).args == {**backbone_args, "dropout": 0.5}
    monkeypatch.undo()
    loaded = load_model(path, args={"dropout": 0.5})
    assert type(loaded) is type(net) and loaded._init_args == type(net)(**{**backbone_args, "dropout": 0.5})._init_args


def test_checkpoint_model_of_a_plain_state_dict_is_the_given_class_and_args(model, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    assert checkpoint_model(path, class_name="DiffusionModel", args=ARGS) == ("DiffusionModel", ARGS, None, None)
    with pytest.raises(CheckpointError, match="plain state_dict.*recipe: model.class and model.args") as err:
        checkpoint_model(path)
    assert err.value.field == "class"


def test_bad_args_json_is_named_by_checkpoint_model(model, tmp_path):
    for raw in (b"{not json", b'{"__name__": 3}', b'{"__name__": "SongUNet", "__args__": []}'):
        path = write_archive(tmp_path / "bad.mdlus", {**mdlus_members(model.state_dict()), "args.json": raw})
        with pytest.raises(CheckpointError, match=f"{path}: args.json is not a PhysicsNeMo model description"):
            checkpoint_model(path)


def test_edm_precond_sr_with_scaled_condition_warns(tmp_path):
    args = dict(WRAPPED[2][1], scale_cond_input=True)
    net = randomized(get_model_class("SongUNet")(**WRAPPED[2][3]))
    members = mdlus_members({f"model.{k}": v for k, v in net.state_dict().items()}, "EDMPrecondSR", args)
    with pytest.warns(UserWarning, match="scale_cond_input"):
        load_model(write_archive(tmp_path / "sr.mdlus", members))


def test_unet_checkpoint_version_0_1_0_arguments(tmp_path):
    """PhysicsNeMo's UNet 0.1.0 (CorrDiff regression) recorded img_channels and sigma_* that 2.2 drops."""
    args = dict(img_resolution=16, img_in_channels=3, img_out_channels=2, use_fp16=False, model_type="SongUNet", **TINY)
    net = randomized(get_model_class("UNet")(**args))
    old = dict(args, img_channels=2, sigma_min=0.0, sigma_max=INF, sigma_data=0.5)
    loaded = load_model(write_archive(tmp_path / "reg.mdlus", mdlus_members(net.state_dict(), "UNet", old), "tar"))
    assert loaded._init_args == net._init_args
    x, img_lr = torch.zeros(2, 2, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x, img_lr), loaded(x, img_lr))


@pytest.mark.parametrize("legacy_names", [False, True])
def test_apex_group_norm_checkpoint_loads_with_use_apex_gn_false(tmp_path, legacy_names):
    """PhysicsNeMo 1.x trained with ``use_apex_gn=True`` kept each GroupNorm's weights under
    ``<norm>.gn.*`` (beside unused ``<norm>.weight/bias``); PhysicsNeMo loads them with the
    override ``use_apex_gn=False``, and so does diffexport (the refusal says how)."""
    model = song_unet()
    state = {}
    for k, v in model.state_dict().items():
        norm, _, param = k.rpartition(".")
        if norm.rpartition(".")[2] in ("norm0", "norm1", "norm", "aux_norm") and param in ("weight", "bias"):
            state[f"{norm}.{param}"] = torch.ones_like(v) if param == "weight" else torch.zeros_like(v)  # apex left these
            state[f"{norm}.gn.{param}"] = v
        else:
            state[k] = v
    if legacy_names:  # and attention on the block (norm2 / qkv / proj), as 1.x stored it
        state = {k.replace("attn.norm.", "norm2.").replace("attn.", ""): v for k, v in state.items()}
        assert "enc.8x8_block0.norm2.gn.weight" in state
    upgraded = upgrade_legacy_state_dict(state)
    assert upgraded.keys() == model.state_dict().keys() and torch.equal(upgraded["dec.16x16_aux_norm.weight"], model.dec["16x16_aux_norm"].weight)
    path = write_archive(tmp_path / "apex.mdlus", mdlus_members(state, "SongUNet", {**SONG, "use_apex_gn": True}), "tar")
    with pytest.raises(CheckpointError, match=r"use_apex_gn.*args=\{'use_apex_gn': False\}"):
        load_model(path)
    assert same_song_outputs(model, load_model(path, args={"use_apex_gn": False}))


# --- archives: member by member, only what is needed, bounded (issue 13 item 3) ---------------


def _zip_with_unused(path: Path, members: dict[str, bytes], unused_mib: int) -> Path:
    """``members`` plus an unused deflated member of ``unused_mib`` MiB of zeros (about 1000x smaller on disk)."""
    write_archive(path, members)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive, archive.open("unused.bin", "w", force_zip64=True) as f:
        block = bytes(1 << 20)
        for _ in range(unused_mib):
            f.write(block)
    return path


def test_zip_reads_only_the_needed_members(model, tmp_path, monkeypatch):
    path = _zip_with_unused(tmp_path / "m.mdlus", mdlus_members(model.state_dict()), unused_mib=64)
    assert path.stat().st_size < 2 << 20
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(getattr(name, "filename", name)) or real_open(self, name, *a, **k))
    assert same_outputs(load_model(path), model)
    assert sorted(opened) == ["args.json", "model.pt"]


def test_tar_reads_only_the_needed_members(model, tmp_path, monkeypatch):
    members = {"big-unused.bin": bytes(4 << 20), **mdlus_members(model.state_dict())}
    path = write_archive(tmp_path / "m.mdlus", members, "tar")
    extracted = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: extracted.append(m.name) or real(self, m))
    assert same_outputs(load_model(path), model)
    assert sorted(extracted) == ["args.json", "model.pt"]


def test_zip_bomb_member_is_refused(model, tmp_path):
    """model.pt declared as 64 MiB of zeros deflated to ~64 kB: refused before it is inflated."""
    members = mdlus_members(model.state_dict())
    path = tmp_path / "bomb.mdlus"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("args.json", members["args.json"])
        with archive.open("model.pt", "w", force_zip64=True) as f:
            for _ in range(64):
                f.write(bytes(1 << 20))
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_model(path)


def test_oversized_member_is_refused(model, tmp_path, monkeypatch):
    import diffexport.checkpoints as checkpoints

    monkeypatch.setitem(checkpoints.LIMITS, "args.json", 100)
    members = {**mdlus_members(model.state_dict()), "args.json": json.dumps({"__name__": "DiffusionModel", "__args__": ARGS, "pad": "x" * 200}).encode()}
    for fmt in ("zip", "tar"):
        with pytest.raises(CheckpointError, match="args.json is .* over the limit"):
            load_model(write_archive(tmp_path / f"m.{fmt}", members, fmt))


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/hostname", "/dev/null"])
def test_system_files_are_a_checkpoint_error(path):
    if not Path(path).exists():
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(CheckpointError):
        load_model(path, class_name="DiffusionModel", args=ARGS)


def test_compressed_tar_is_refused_with_its_reason(model, tmp_path):
    path = tmp_path / "m.mdlus"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in mdlus_members(model.state_dict()).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CheckpointError, match="compressed tar archive"):
        load_model(path)
