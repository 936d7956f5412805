"""Legacy state-dict names (NVlabs EDM, PhysicsNeMo 1.x) -> PhysicsNeMo 2.2 names.

Differences handled:

* attention weights stored directly on the U-Net block (``<block>.norm2``, ``<block>.qkv``,
  ``<block>.proj``) or as ``<block>.attn.norm2``; 2.x uses ``<block>.attn.{norm,qkv,proj}``;
* ``map_noise.freqs`` absent (``PositionalEmbedding`` computed it on the fly);
* ``pos_embd`` saved for fixed (non-learnable) grids, which 2.x no longer stores;
* ``<norm>.gn.weight/bias``: a GroupNorm trained with ``use_apex_gn=True`` (1.x) held its
  weights in an apex submodule ``gn`` (its own ``weight/bias`` unused); they replace those;
* ``device_buffer``: an empty tensor PhysicsNeMo 1.x's ``Module`` base persisted in every
  model (and in a wrapped backbone, ``model.device_buffer``) to track the device.

The same renaming runs as a ``load_state_dict`` pre-hook inside the modules
(:func:`rename_attention_keys`), so ``model.load_state_dict(sd, strict=True)`` accepts legacy
checkpoints directly; :func:`upgrade_legacy_state_dict` applies it to a whole state dict, for
checkpoint import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["upgrade_legacy_state_dict", "rename_attention_keys", "drop_device_buffers", "adopt_apex_group_norm"]

_ATTN = {"norm2": "norm", "qkv": "qkv", "proj": "proj"}  # legacy attribute -> name under ``attn.``
_LEGACY_ATTN_KEY = re.compile(r"^(?P<block>(?:.*\.)?)(?P<name>norm2|qkv|proj)\.(?P<p>(?:gn\.)?(?:weight|bias))$")  # gn.: apex


def _new_attention_key(key: str) -> str | None:
    """The 2.x name of a legacy attention key, or ``None`` if ``key`` is not one."""
    m = _LEGACY_ATTN_KEY.match(key)
    if m is None:
        return None
    if m["block"].endswith("attn."):  # already under ``attn``: only ``attn.norm2`` is legacy
        return f"{m['block']}norm.{m['p']}" if m["name"] == "norm2" else None
    return f"{m['block']}attn.{_ATTN[m['name']]}.{m['p']}"


def rename_attention_keys(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Rename, in place, legacy attention keys that start with ``prefix`` (one U-Net block's prefix
    in the pre-hook, ``""`` for a whole state dict). ``ValueError`` if old and new names coexist."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = _new_attention_key(key)
        if new is None:
            continue
        if new in state_dict:
            raise ValueError(f"state_dict holds both legacy key {key!r} and its new name {new!r}")
        state_dict[new] = state_dict.pop(key)


def drop_device_buffers(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Remove, in place, the empty ``device_buffer`` entries (PhysicsNeMo 1.x) under ``prefix``;
    a non-empty one is left for the load to report."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict[key]
        if key.rpartition(".")[2] == "device_buffer" and isinstance(value, torch.Tensor) and value.numel() == 0:
            del state_dict[key]


def adopt_apex_group_norm(state_dict: dict[str, Any], prefix: str) -> None:
    """In place: one GroupNorm's apex weights ``prefix + "gn.weight/bias"`` become its ``weight/bias``."""
    for param in ("weight", "bias"):
        if prefix + f"gn.{param}" in state_dict:
            state_dict[prefix + param] = state_dict.pop(prefix + f"gn.{param}")


def upgrade_legacy_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with EDM / PhysicsNeMo 1.x names upgraded to PhysicsNeMo 2.2's.

    With ``model``, also fills deterministic buffers the checkpoint lacks (``map_noise.freqs``)
    and drops stale fixed positional grids (``pos_embd`` that ``model`` does not persist), so the
    result loads with ``strict=True``. A 2.2 state dict comes back unchanged.
    """
    sd = dict(state_dict)
    rename_attention_keys(sd)
    drop_device_buffers(sd)
    for norm in {k.removesuffix(f"gn.{p}") for k in list(sd) for p in ("weight", "bias") if k.endswith(f".gn.{p}")}:
        adopt_apex_group_norm(sd, norm)
    if model is not None:
        expected = model.state_dict()
        for key, value in expected.items():
            owner, _, name = key.rpartition(".")
            if key not in sd and name in getattr(model.get_submodule(owner), "derived_buffers", ()):
                sd[key] = value.detach().clone()
        for key in [k for k in sd if k not in expected and k.rsplit(".", 1)[-1] == "pos_embd"]:
            del sd[key]
    return sd
