"""Behaviour of the reference UNets in ``diffexport.models``: layers, positional / lead-time
embeddings, the CorrDiff wrapper, argument errors, gradient checkpointing and ``torch.export``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import diffexport.models.song_unet as song_unet_module
from diffexport.models import DhariwalUNet, SongUNet, SongUNetPosEmbd, SongUNetPosLtEmbd, UNet
from diffexport.models.init import randomize_ as randomize  # N(0, 1/fan_in): no zero layer
from diffexport.models.layers import Attention, GroupNorm
from diffexport.models.song_unet import positional_grid

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)




def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------
# Layers.


def test_groupnorm_unbiased_in_eval_biased_in_train() -> None:
    norm = randomize(GroupNorm(16, eps=1e-6))
    x = torch.randn(2, 16, 5, 3) * 3 + 1
    g = x.reshape(2, norm.num_groups, -1)
    unbiased = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, keepdim=True) + 1e-6).sqrt()).reshape(x.shape)
    expected_eval = unbiased * norm.weight[:, None, None] + norm.bias[:, None, None]
    expected_train = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(norm.eval()(x), expected_eval, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.train()(x), expected_train, rtol=1e-5, atol=1e-6)
    assert rel(expected_eval, expected_train) > 1e-3  # the two really differ


def test_attention_matches_edm_interleaved_heads() -> None:
    attn = randomize(Attention(8, num_heads=2, eps=1e-6)).eval()
    x = torch.randn(2, 8, 3, 4)
    with torch.no_grad():
        q, k, v = attn.qkv(attn.norm(x)).reshape(2 * 2, 4, 3, -1).unbind(2)  # EDM layout
        w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(4)).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", w, v).reshape(x.shape)
        torch.testing.assert_close(attn(x), attn.proj(a) + x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Positional grids and patch selection.


def test_positional_grids() -> None:
    lin = positional_grid("linear", 2, 3, 5)
    torch.testing.assert_close(lin[0], torch.linspace(-1, 1, 5).expand(3, 5))
    torch.testing.assert_close(lin[1], torch.linspace(-1, 1, 3)[:, None].expand(3, 5))
    test = positional_grid("test", 2, 3, 5)
    assert test[0, 2, 4] == 2 and test[1, 2, 4] == 4
    sin = positional_grid("sinusoidal", 4, 3, 5)
    x, y = torch.linspace(0, 2 * math.pi, 5).expand(3, 5), torch.linspace(0, 2 * math.pi, 3)[:, None].expand(3, 5)
    torch.testing.assert_close(sin, torch.stack([x.sin(), y.sin(), x.cos(), y.cos()]), atol=1e-6, rtol=0)
    assert positional_grid("sinusoidal", 8, 3, 5).shape == (8, 3, 5)
    assert positional_grid("learnable", 3, 3, 5).shape == (3, 3, 5)
    assert positional_grid("linear", 0, 3, 5) is None


def _global_index(corners: list[tuple[int, int]], h: int, w: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.stack([rows + r, cols + c]) for r, c in corners])  # (P, 2, h, w)


def test_global_index_and_selector_pick_the_patch() -> None:
    model = randomize(
        SongUNetPosLtEmbd(16, 3 + 2 + 1, 3, gridtype="test", N_grid_channels=2, lead_time_channels=1,
                          lead_time_steps=2, **TINY)  # fmt: skip
    ).eval()
    corners, B = [(0, 8), (4, 0)], 2
    gi = _global_index(corners, 8, 8)
    x, sigma, lt = torch.randn(B * 2, 3, 8, 8), torch.rand(B * 2), torch.tensor([0, 1, 1, 0])
    emb = model.positional_embedding_indexing(x, gi, lead_time_label=lt[:B])
    for k in range(B * 2):
        r, c = corners[k % 2]
        torch.testing.assert_close(emb[k, :2], model.pos_embd[:, r : r + 8, c : c + 8])
        torch.testing.assert_close(emb[k, 2:], model.lt_embd[lt[k // 2], :, r : r + 8, c : c + 8])

    def selector(grid: torch.Tensor) -> torch.Tensor:  # same patches, PhysicsNeMo layout
        grid = grid[None].expand(B, -1, -1, -1) if grid.ndim == 3 else grid
        return torch.cat([grid[:, :, r : r + 8, c : c + 8] for r, c in corners]).reshape(2, B, -1, 8, 8).transpose(0, 1).reshape(B * 2, -1, 8, 8)  # noqa: E501

    with torch.no_grad():
        by_index = model(x, sigma, None, lead_time_label=lt[:B], global_index=gi)
        by_selector = model(x, sigma, None, lead_time_label=lt[:B], embedding_selector=selector)
        torch.testing.assert_close(by_index, by_selector)
        whole = torch.randn(2, 3, 16, 16)
        full = model(whole, sigma[:2], None, lead_time_label=lt[:2], global_index=_global_index([(0, 0)], 16, 16))
        torch.testing.assert_close(full, model(whole, sigma[:2], None, lead_time_label=lt[:2]))
    with pytest.raises(ValueError, match="not both"):
        model(x, sigma, None, lead_time_label=lt[:B], global_index=gi, embedding_selector=selector)


def test_lead_time_label_shapes_physicsnemo_accepts() -> None:
    """PhysicsNeMo reshapes the chosen lead-time grids to (B, C_LT, H, W): labels (B,), (B, 1), and a
    0-d label for one sample (as its own tests pass) all select the same grids."""
    kwargs = dict(gridtype="linear", N_grid_channels=2, lead_time_channels=2, lead_time_steps=3, **TINY)
    model = randomize(SongUNetPosLtEmbd(8, 2 + 2 + 2, 2, **kwargs)).eval()
    x, sigma = torch.randn(2, 2, 8, 8), torch.rand(2)
    with torch.no_grad():
        ref = model(x, sigma, None, lead_time_label=torch.tensor([2, 0]))
        torch.testing.assert_close(model(x, sigma, None, lead_time_label=torch.tensor([[2], [0]])), ref)
        torch.testing.assert_close(model(x[:1], sigma[:1], None, lead_time_label=torch.tensor(2)), ref[:1])


def test_prob_channels_logits_in_train_softmax_in_eval() -> None:
    kwargs = dict(gridtype="linear", N_grid_channels=2, lead_time_channels=2, lead_time_steps=3, **TINY)
    model = randomize(SongUNetPosLtEmbd(8, 2 + 2 + 2, 4, prob_channels=[3, 1], **kwargs))
    base = SongUNetPosLtEmbd(8, 2 + 2 + 2, 4, **kwargs)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k != "scalar"})
    x, sigma, lt = torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([2, 0])
    scale = model.scalar.detach()
    with torch.no_grad():
        for train in (True, False):
            out, ref = model.train(train)(x, sigma, None, lt), base.train(train)(x, sigma, None, lt)
            logits = ref[:, [3, 1]] * scale
            torch.testing.assert_close(out[:, [3, 1]], logits if train else logits.softmax(dim=1))
            torch.testing.assert_close(out[:, [0, 2]], ref[:, [0, 2]])
    assert torch.allclose(out[:, [1, 3]].sum(1), torch.ones(1))


# ----------------------------------------------------------------------------
# SongUNet options, the CorrDiff wrapper, checkpointing.


@pytest.mark.parametrize(
    "options",
    [
        dict(encoder_type="skip", embedding_type="zero"),
        dict(encoder_type="residual", decoder_type="skip", embedding_type="fourier", resample_filter=[1, 3, 3, 1]),
        dict(additive_pos_embed=True, bottleneck_attention=False, label_dim=3, augment_dim=2),
    ],
)
def test_songunet_variants_rectangular(options: dict) -> None:
    model = randomize(SongUNet([8, 16], 3, 2, **{**TINY, **options})).eval()
    labels = torch.randn(2, 3) if options.get("label_dim") else None
    out = model(torch.randn(2, 3, 8, 16), torch.rand(2), labels)
    assert out.shape == (2, 2, 8, 16) and out.isfinite().all()
    assert ("enc.4x4_aux_skip.weight" in model.state_dict()) == (options.get("encoder_type") == "skip")
    assert ("dec.4x4_in0.attn.qkv.weight" in model.state_dict()) == (options.get("bottleneck_attention", True))


def test_label_dropout_drops_whole_labels_in_training() -> None:
    model = randomize(SongUNet(8, 2, 2, label_dim=3, label_dropout=1.0, **TINY)).train()
    x, sigma, labels = torch.randn(2, 2, 8, 8), torch.rand(2), torch.randn(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma, labels), model(x, sigma, torch.zeros(2, 3)))
        model.eval()
        assert rel(model(x, sigma, labels), model(x, sigma, torch.zeros(2, 3))) > 1e-4


def test_unet_wrapper_concatenates_and_zeroes_noise() -> None:
    # As in CorrDiff, img_in_channels counts the grid and lead-time channels the backbone appends.
    wrapper = UNet(8, 3 + 2 + 1, 2, model_type="SongUNetPosLtEmbd", gridtype="linear", N_grid_channels=2,
                   lead_time_channels=1, lead_time_steps=2, **TINY)  # fmt: skip
    randomize(wrapper).eval()
    backbone = wrapper.model
    assert all(k.startswith("model.") for k in wrapper.state_dict())
    assert backbone.enc["8x8_conv"].in_channels == 3 + 2 + 2 + 1
    x, img_lr, lt = torch.zeros(2, 2, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    with torch.no_grad():
        expected = backbone(torch.cat([x, img_lr], 1), torch.zeros(2), None, lead_time_label=lt)
        torch.testing.assert_close(wrapper(x, img_lr, lead_time_label=lt), expected)
        wrapper.use_fp16 = True  # casts the weights; on CPU the backbone still runs in float32
        assert backbone.map_layer0.weight.dtype == torch.float16
        assert wrapper(x, img_lr, lead_time_label=lt).dtype == torch.float32


def test_checkpoint_level_recomputes_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(song_unet_module, "checkpoint", counting_checkpoint)
    plain = randomize(SongUNet(8, 2, 2, **TINY)).train()
    ckpt = SongUNet(8, 2, 2, checkpoint_level=1, **TINY).train()
    ckpt.load_state_dict(plain.state_dict())
    x, sigma = torch.randn(2, 2, 8, 8), torch.rand(2)
    plain(x, sigma, None).square().sum().backward()
    ckpt(x, sigma, None).square().sum().backward()
    assert calls  # the 8x8 blocks were checkpointed
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x, sigma, None)
    assert not calls  # inference never checkpoints


# ----------------------------------------------------------------------------
# Argument errors.


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SongUNet(8, 2, 2, use_apex_gn=True, **TINY), "use_apex_gn"),
        (lambda: SongUNet([8, 7], 2, 2, **TINY), "img_resolution"),
        (lambda: DhariwalUNet(9, 2, 2, model_channels=64, channel_mult=[1, 2], num_blocks=1), "img_resolution"),
        (lambda: SongUNet(8, 2, 2, embedding_type="sinusoid", **TINY), "embedding_type"),
        (lambda: SongUNet(8, 2, 2, encoder_type="dense", **TINY), "encoder_type"),
        (lambda: SongUNet(8, 2, 2, decoder_type="residual", **TINY), "decoder_type"),
        (lambda: SongUNetPosEmbd(8, 4, 2, gridtype="random", **TINY), "gridtype"),
        (lambda: SongUNetPosEmbd(8, 5, 2, gridtype="sinusoidal", N_grid_channels=3, **TINY), "N_grid_channels"),
        (lambda: SongUNetPosEmbd(8, 5, 2, gridtype="linear", N_grid_channels=3, **TINY), "N_grid_channels"),
        (lambda: SongUNetPosEmbd(8, 6, 2, lead_time_channels=2, **TINY), "lead_time"),
        (lambda: SongUNetPosLtEmbd(8, 6, 2, **TINY), "lead_time_channels"),
        (lambda: UNet(8, 2, 2, model_type="UNet"), "model_type"),
        (lambda: DhariwalUNet(8, 2, 2, **{**TINY, "model_channels": 16}), "attn_resolutions: attention on 32 channels has no head of 64"),
    ],
)
def test_constructor_errors(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_forward_errors() -> None:
    sigma = torch.rand(2)
    with pytest.raises(ValueError, match="x"):
        SongUNet(8, 2, 2, **TINY)(torch.randn(2, 2, 8, 9), sigma, None)
    with pytest.raises(ValueError, match="additive_pos_embed"):
        SongUNet(8, 2, 2, additive_pos_embed=True, **TINY)(torch.randn(2, 2, 16, 16), sigma, None)
    for labelled in (SongUNet(8, 2, 2, label_dim=3, **TINY), DhariwalUNet(8, 2, 2, label_dim=3, **{**TINY, "model_channels": 64})):
        with pytest.raises(ValueError, match="class_labels: the model has label_dim > 0"):
            labelled(torch.randn(2, 2, 8, 8), sigma, None)
    lt_model = SongUNetPosLtEmbd(8, 2 + 4 + 1, 2, lead_time_channels=1, **TINY)
    with pytest.raises(ValueError, match="lead_time_label"):
        lt_model(torch.randn(2, 2, 8, 8), sigma, None)


# ----------------------------------------------------------------------------
# torch.export with a dynamic batch.

EXPORTABLE = {
    "SongUNet": lambda: SongUNet(8, 2, 2, encoder_type="residual", decoder_type="skip", embedding_type="fourier",
                                 resample_filter=[1, 3, 3, 1], label_dim=3, augment_dim=2, **TINY),
    "SongUNetPosEmbd": lambda: SongUNetPosEmbd(8, 2 + 4, 2, gridtype="learnable", **TINY),
    "SongUNetPosLtEmbd": lambda: SongUNetPosLtEmbd(8, 2 + 4 + 2, 3, lead_time_channels=2, lead_time_steps=3,
                                                   prob_channels=[0, 2], **TINY),
    "DhariwalUNet": lambda: DhariwalUNet(8, 2, 2, label_dim=3, model_channels=64, channel_mult=[1, 2],
                                         num_blocks=1, attn_resolutions=[4], dropout=0.0),
    "UNet": lambda: UNet(8, 3, 2, model_type="SongUNet", **TINY),
}  # fmt: skip


def _example(name: str, batch: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(batch)
    if name == "UNet":
        return (torch.randn(batch, 2, 8, 8, generator=g), torch.randn(batch, 3, 8, 8, generator=g)), {}
    labels = torch.randn(batch, 3, generator=g) if name in ("SongUNet", "DhariwalUNet") else None
    args = (torch.randn(batch, 2, 8, 8, generator=g), torch.rand(batch, generator=g), labels)
    kwargs = {"lead_time_label": torch.randint(0, 3, (batch,), generator=g)} if name == "SongUNetPosLtEmbd" else {}
    if name == "SongUNet":
        kwargs["augment_labels"] = torch.randn(batch, 2, generator=g)
    return args, kwargs


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_torch_export_dynamic_batch(name: str) -> None:
    model = randomize(EXPORTABLE[name]()).eval()
    args, kwargs = _example(name, 2)
    batch = Dim("batch", min=1, max=64)
    dims = tuple(None if a is None else {0: batch} for a in args)
    program = torch.export.export(
        model, args, kwargs, dynamic_shapes=(*dims, *({0: batch} for _ in kwargs)), strict=False
    )
    ops = {str(node.target) for node in program.graph.nodes}
    assert "aten.group_norm.default" in ops and not any("var" in op for op in ops)
    args, kwargs = _example(name, 3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*args, **kwargs), model(*args, **kwargs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["SongUNetPosLtEmbd", "DhariwalUNet", "UNet"])
def test_constructor_args_are_recorded_for_checkpoints(name: str) -> None:
    model = EXPORTABLE[name]()
    args = json.loads(json.dumps(model._init_args))  # what args.json holds
    assert "lead_time_mode" not in args and args.get("img_resolution") == 8
    rebuilt = type(model)(**args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("package", ["models", "diffusion"])
def test_no_import_cycles_inside_the_package(package: str):
    """Imports inside diffexport.models / diffexport.diffusion (function-level ones included) form
    no cycle, e.g. no noise_schedulers <-> samplers, no layers <-> legacy."""
    import ast
    import graphlib

    root = Path(__file__).resolve().parents[1] / "diffexport" / package
    names = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module.split(".")[-1] if node.level or node.module.startswith(f"diffexport.{package}.") else None
                deps |= {mod} & names
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[-1] for a in node.names if a.name.startswith(f"diffexport.{package}.")} & names
        graph[name] = deps - {name}
    graphlib.TopologicalSorter(graph).prepare()  # CycleError names the cycle
