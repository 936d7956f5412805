"""PhysicsNeMo 2.2.2 compatibility of ``diffexport.models``: state-dict keys and shapes, outputs for
the same weights and inputs (eval and train), and legacy (EDM / PhysicsNeMo 1.x) checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffexport.models import get_model_class
from diffexport.models.legacy import upgrade_legacy_state_dict

# PhysicsNeMo 2.2.2's own outputs, kept in the repository (tests/data/physicsnemo-2.2.2/README.md): never skipped
REF = Path(__file__).resolve().parent / "data" / "physicsnemo-2.2.2"
CONFIGS = ["songunet_ddpmpp", "songunet_ncsnpp", "dhariwalunet", "songunet_posembd_learnable", "songunet_posltembd"]
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")




def _reference(name: str) -> dict:
    return torch.load(REF / "physicsnemo-2.2.2-outputs" / f"{name}.pt", weights_only=True)


def _build(ref: dict) -> torch.nn.Module:
    return get_model_class(ref["class"])(**ref["args"])


def _run(model: torch.nn.Module, ref: dict) -> torch.Tensor:
    inputs = ref["inputs"]
    with torch.no_grad():
        return model(inputs["x"], inputs["noise_labels"], inputs.get("class_labels"), **ref["forward_kwargs"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _legacy(sd: dict, positional: bool) -> dict:
    """``sd`` as PhysicsNeMo 1.x / EDM saved it: attention on the block, no ``map_noise.freqs``."""
    out = {}
    for key, value in sd.items():
        if positional and key.endswith("map_noise.freqs"):
            continue
        for new, old in ((".attn.norm.", ".norm2."), (".attn.qkv.", ".qkv."), (".attn.proj.", ".proj.")):
            key = key.replace(new, old)
        out[key] = value
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes(name: str) -> None:
    spec = json.loads((REF / "physicsnemo-2.2.2-state-dicts" / f"{name}.json").read_text())
    model = get_model_class(spec["class"])(**spec["args"])
    mine = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert mine == [(k, list(v)) for k, v in spec["state_dict"].items()]


@pytest.mark.parametrize("name", CONFIGS)
def test_outputs_match_physicsnemo(name: str) -> None:
    ref = _reference(name)
    model = _build(ref)
    model.load_state_dict(ref["state_dict"], strict=True)
    # The two modes differ by far more than the tolerance (GroupNorm variance), so each is checked.
    assert _rel(ref["output_train"], ref["output_eval"]) > 10 * TOL
    assert _rel(_run(model.eval(), ref), ref["output_eval"]) < TOL
    assert _rel(_run(model.train(), ref), ref["output_train"]) < TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_legacy_state_dict_loads_strict(name: str) -> None:
    ref = _reference(name)
    positional = ref["args"].get("embedding_type", "positional") == "positional"
    legacy = _legacy(ref["state_dict"], positional)
    assert legacy.keys() != ref["state_dict"].keys()

    model = _build(ref)
    model.load_state_dict(legacy, strict=True)  # pre-hooks rename / fill in
    assert _rel(_run(model.eval(), ref), ref["output_eval"]) < TOL

    upgraded = upgrade_legacy_state_dict(legacy, model)
    assert set(upgraded) == set(ref["state_dict"])
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(upgraded[key], value, rtol=0, atol=0)


def test_upgrade_without_model_renames_only() -> None:
    sd = {
        "enc.8x8_block0.norm2.weight": torch.ones(2),
        "enc.8x8_block0.qkv.bias": torch.ones(6),
        "dec.4x4_in0.attn.norm2.bias": torch.zeros(2),
        "dec.4x4_in0.attn.proj.weight": torch.ones(2, 2, 1, 1),
        "map_layer0.weight": torch.ones(2, 2),
    }
    assert sorted(upgrade_legacy_state_dict(sd)) == [
        "dec.4x4_in0.attn.norm.bias",
        "dec.4x4_in0.attn.proj.weight",
        "enc.8x8_block0.attn.norm.weight",
        "enc.8x8_block0.attn.qkv.bias",
        "map_layer0.weight",
    ]
    assert "enc.8x8_block0.norm2.weight" in sd  # the input is not modified
    with pytest.raises(ValueError, match="legacy"):
        upgrade_legacy_state_dict({"b.proj.weight": torch.ones(1), "b.attn.proj.weight": torch.ones(1)})


def test_legacy_persistent_fixed_grid_is_ignored() -> None:
    ref = _reference("songunet_posltembd")  # sinusoidal grid: a non-persistent buffer in 2.x
    model = _build(ref)
    sd = dict(ref["state_dict"], pos_embd=model.pos_embd.clone())  # as PhysicsNeMo 1.x saved it
    model.load_state_dict(sd, strict=True)
    assert "pos_embd" not in upgrade_legacy_state_dict(sd, model)
    assert _rel(_run(model.eval(), ref), ref["output_eval"]) < TOL
