"""Decoders (UperNet, FPN, conv/linear, FCN aux) and the plain-backbone pyramid adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vmamba.seg import ConvHead, FCNHead, FPNHead, PlainPyramidAdapter, UperNetHead, create_segmentation_model

IN_CHANNELS = [8, 16, 32, 64]
STRIDES = [4, 8, 16, 32]


def _features(batch: int = 2, height: int = 64, width: int = 96) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, c, -(-height // s), -(-width // s)) for c, s in zip(IN_CHANNELS, STRIDES)]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _conv_bn(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + 2 * cout  # bias-free conv + BN affine


@pytest.mark.parametrize(
    "head",
    [
        lambda: UperNetHead(IN_CHANNELS, 5, channels=16),
        lambda: FPNHead(IN_CHANNELS, STRIDES, 5, fpn_channels=16, channels=8),
        lambda: ConvHead(IN_CHANNELS, 5, channels=16, num_convs=2),
        lambda: ConvHead(IN_CHANNELS, 5, num_convs=0),
    ],
    ids=["upernet", "fpn", "conv", "linear"],
)
def test_heads_predict_at_finest_resolution(head) -> None:
    features = _features(height=65, width=97)
    out = head()(features)
    assert out.shape == (2, 5, 17, 25)
    assert torch.isfinite(out).all()


def test_upernet_layout_matches_mmseg_uperhead() -> None:
    """Parameter count of the mmseg UPerHead layout: PPM (1x1 per scale + 3x3 bottleneck), 1x1 laterals,
    3x3 FPN convs, 3x3 fusion over the concatenated levels, 1x1 classifier."""
    channels, scales, classes = 16, (1, 2, 3, 6), 5
    head = UperNetHead(IN_CHANNELS, classes, channels=channels, pool_scales=scales)
    expected = (
        len(scales) * _conv_bn(IN_CHANNELS[-1], channels, 1)
        + _conv_bn(IN_CHANNELS[-1] + len(scales) * channels, channels, 3)
        + sum(_conv_bn(c, channels, 1) for c in IN_CHANNELS[:-1])
        + 3 * _conv_bn(channels, channels, 3)
        + _conv_bn(4 * channels, channels, 3)
        + channels * classes
        + classes
    )
    assert _count(head) == expected
    assert UperNetHead(IN_CHANNELS, classes).classifier.in_channels == 512  # published default width


def test_upernet_top_down_path_reaches_finest_output() -> None:
    """A change in the deepest map alone must change the logits (PPM -> top-down -> fusion)."""
    head = UperNetHead(IN_CHANNELS, 3, channels=16).eval()
    features = _features()
    base = head(features)
    features[-1] = features[-1] + 1.0
    assert not torch.allclose(base, head(features))


def test_fpn_branches_upsample_to_stride4() -> None:
    head = FPNHead(IN_CHANNELS, STRIDES, 3, fpn_channels=16, channels=8)
    # stride 4: one conv; 8: conv+up; 16: 2x(conv+up); 32: 3x(conv+up)
    n_convs = [sum(isinstance(m, nn.Conv2d) for m in branch.modules()) for branch in head.scale_heads]
    assert n_convs == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="in_strides"):
        FPNHead(IN_CHANNELS, [4, 8, 16], 3)


def test_linear_head_is_bn_plus_1x1() -> None:
    head = ConvHead(IN_CHANNELS, 7, num_convs=0)
    assert isinstance(head.convs, nn.BatchNorm2d)
    assert _count(head) == 2 * sum(IN_CHANNELS) + sum(IN_CHANNELS) * 7 + 7


def test_fcn_head_reads_its_level() -> None:
    head = FCNHead(IN_CHANNELS[2], 4, in_index=2, channels=8)
    out = head(_features(height=64, width=96))
    assert out.shape == (2, 4, 4, 6)
    concat = FCNHead(IN_CHANNELS[1], 4, in_index=1, channels=8, num_convs=2, concat_input=True)
    assert concat(_features()).shape == (2, 4, 8, 12)
    with pytest.raises(ValueError, match="num_convs"):
        FCNHead(8, 4, num_convs=0)


def test_heads_reject_wrong_number_of_maps() -> None:
    with pytest.raises(ValueError, match="4 feature maps"):
        UperNetHead(IN_CHANNELS, 3, channels=8)(_features()[:3])
    with pytest.raises(ValueError, match="num_classes"):
        UperNetHead(IN_CHANNELS, 0)


def _kinds(branch: nn.Module) -> list[str]:
    mods = list(branch) if isinstance(branch, nn.Sequential) else [branch]
    return [type(m).__name__ for m in mods]


def test_pyramid_for_patch16_matches_vim_seg() -> None:
    adapter = PlainPyramidAdapter([24] * 4, in_stride=16)
    assert [_kinds(b) for b in adapter.branches] == [
        ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"],
        ["ConvTranspose2d"],
        ["Identity"],
        ["MaxPool2d"],
    ]
    maps = [torch.randn(2, 24, 8, 12) for _ in range(4)]
    assert [tuple(o.shape[-2:]) for o in adapter(maps)] == [(32, 48), (16, 24), (8, 12), (4, 6)]


def test_pyramid_for_stride8() -> None:
    adapter = PlainPyramidAdapter([24] * 4, in_stride=8)
    assert [_kinds(b) for b in adapter.branches] == [
        ["ConvTranspose2d"],
        ["Identity"],
        ["MaxPool2d"],
        ["MaxPool2d"],
    ]
    assert adapter.branches[3].kernel_size == 4
    out = adapter([torch.randn(1, 24, 7, 7)] * 4)  # odd map: pooling keeps the border (ceil mode)
    assert [o.shape[-1] for o in out] == [14, 7, 4, 2]


def test_pyramid_shares_a_single_map_and_rejects_bad_strides() -> None:
    adapter = PlainPyramidAdapter([16], in_stride=16)
    assert len(adapter([torch.randn(1, 16, 4, 4)])) == 4
    with pytest.raises(ValueError, match="power-of-two"):
        PlainPyramidAdapter([16] * 4, in_stride=14)
    with pytest.raises(ValueError, match="output strides"):
        PlainPyramidAdapter([16] * 3, in_stride=16)


def _params(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.slow
def test_published_upernet_sizes() -> None:
    """ADE20K UperNet + FCN aux (150 classes): VMamba-T ~62M (published 62M), Vim-Ti with 192-channel decoder
    ~12.2M (published 13M, see docs/segmentation.md)."""
    vmamba_t = create_segmentation_model("vmamba_tiny_s1l8", 150, aux_head=True)
    assert 61.0 < _params(vmamba_t) < 62.5
    vim_t = create_segmentation_model("vim_tiny_patch16_224", 150, aux_head=True, channels=192)
    assert 11.5 < _params(vim_t) < 13.0
