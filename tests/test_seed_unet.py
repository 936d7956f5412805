"""The seed DDPM U-Net (diffexport.models.diffusion): shapes, structure, export, validation."""

import pytest
import torch
from torch import nn

from diffexport.models import get_model_class
from diffexport.models.diffusion import (
    BottleneckBlock,
    DiffusionModel,
    DownBlock,
    ResBlock,
    SelfAttention,
    TimeEmbedding,
    UpBlock,
)

TINY = dict(image_size=8, channels=2, hidden_dims=[8, 16], time_dim=16)


def inputs(batch: int, channels: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, channels, size, size), torch.randint(0, 1000, (batch,))


def test_output_has_input_shape():
    torch.manual_seed(0)
    model = DiffusionModel(16, 3).eval()  # default hidden_dims (32, 64, 128), time_dim 128
    x, t = inputs(2, 3, 16)
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert get_model_class("DiffusionModel") is DiffusionModel


def test_block_structure():
    model = DiffusionModel(16, 3, hidden_dims=[8, 16, 32], time_dim=16)
    te, lin1, act, lin2 = model.time_mlp
    assert isinstance(te, TimeEmbedding) and isinstance(act, nn.SiLU)
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (16, 64, 16)
    assert (model.init_conv.in_channels, model.init_conv.out_channels) == (3, 8)
    assert model.init_conv.kernel_size == (3, 3)

    assert [type(b) for b in model.down_blocks] == [DownBlock] * 3
    assert [(b.res.conv1.in_channels, b.res.conv1.out_channels) for b in model.down_blocks] == [
        (8, 8), (8, 16), (16, 32)
    ]
    down = model.down_blocks[1].down
    assert (down.kernel_size, down.stride, down.padding) == ((4, 4), (2, 2), (1, 1))
    assert isinstance(model.down_blocks[1].res.skip, nn.Conv2d)  # 8 -> 16 channels
    assert isinstance(model.down_blocks[0].res.skip, nn.Identity)

    assert isinstance(model.bottleneck, BottleneckBlock)
    assert isinstance(model.bottleneck.res1, ResBlock) and isinstance(model.bottleneck.res2, ResBlock)
    assert isinstance(model.bottleneck.attn, SelfAttention) and model.bottleneck.attn.num_heads == 4

    assert [type(b) for b in model.up_blocks] == [UpBlock] * 3
    up = model.up_blocks[0].up
    assert isinstance(up, nn.ConvTranspose2d) and (up.kernel_size, up.stride) == ((4, 4), (2, 2))
    # input = upsampled + skip channels; output steps back down the hidden dims
    assert [(b.res.conv1.in_channels, b.res.conv1.out_channels) for b in model.up_blocks] == [
        (64, 16), (32, 8), (16, 8)
    ]
    assert isinstance(model.out_norm, nn.GroupNorm) and model.out_norm.num_groups == 8
    assert (model.out_conv.in_channels, model.out_conv.out_channels) == (8, 3)


def test_time_embedding_is_sin_then_cos():
    emb = TimeEmbedding(8)(torch.tensor([0, 5]))
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # t=0: sin 0, cos 0
    assert torch.allclose(emb[1, :4] ** 2 + emb[1, 4:] ** 2, torch.ones(4))
    assert emb[1, 0] == pytest.approx(torch.sin(torch.tensor(5.0)).item())  # first freq is 1


def test_time_conditioning_changes_output():
    torch.manual_seed(0)
    model = DiffusionModel(**TINY).eval()
    x, _ = inputs(1)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


def test_export_with_dynamic_batch_matches_eager():
    torch.manual_seed(0)
    model = DiffusionModel(**TINY).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        model, inputs(2), dynamic_shapes={"x": {0: batch}, "t": {0: batch}}, strict=False
    )
    exported = program.module()
    for n in (1, 3):
        x, t = inputs(n)
        torch.testing.assert_close(exported(x, t), model(x, t))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(image_size=10), "image_size"),  # not a multiple of 2**2
        (dict(image_size=0), "image_size"),
        (dict(hidden_dims=[8, 12]), "hidden_dims"),  # 12 % 8
        (dict(hidden_dims=[]), "hidden_dims"),
        (dict(channels=0), "channels"),
        (dict(time_dim=15), "time_dim"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DiffusionModel(**{**TINY, **kwargs})


def test_records_constructor_args_with_defaults():
    model = DiffusionModel(8, channels=2, hidden_dims=[8, 16])
    assert model._init_args == {"image_size": 8, "channels": 2, "hidden_dims": [8, 16], "time_dim": 128}
