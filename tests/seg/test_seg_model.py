"""create_segmentation_model: every decoder on every backbone family, any input size, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmamba.seg import DECODERS, PlainPyramidAdapter, SegmentationModel, create_segmentation_model

NUM_CLASSES = 5

# Tiny configs: two timm CNNs (hierarchical), a timm ViT and our Vim (plain, stride 16 and 8), our VMamba.
BACKBONES = {
    "resnet18": ("resnet18", dict(zero_init_last=False)),  # timm zero-inits the last BN of each block
    "convnext": ("convnext_atto", {}),
    "vit": ("vit_tiny_patch16_224", dict(depth=4, embed_dim=64, num_heads=2, img_size=64)),
    "vim": ("vim_tiny_patch16_224", dict(depth=4, embed_dim=32, img_size=64)),
    "vim_stride8": ("vim_tiny_patch16_stride8_224", dict(depth=4, embed_dim=32, img_size=64)),
    "vmamba": ("vmamba_tiny_s1l8", dict(depths=(1, 1, 2, 1), dims=16, drop_path_rate=0.0)),
}
PLAIN = {"vit", "vim", "vim_stride8"}


def _build(family: str, decoder: str = "upernet", **kwargs) -> SegmentationModel:
    torch.manual_seed(0)
    name, backbone_kwargs = BACKBONES[family]
    kwargs.setdefault("channels", 32)
    if decoder == "fpn":
        kwargs.setdefault("fpn_channels", 32)
    return create_segmentation_model(
        name, NUM_CLASSES, decoder=decoder, backbone_kwargs=backbone_kwargs, **kwargs
    )


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("family", [f for f in BACKBONES if f != "resnet18"])
def test_output_shape_and_finite(family: str, decoder: str) -> None:
    model = _build(family, decoder).eval()
    assert model.feature_strides == [4, 8, 16, 32]
    assert isinstance(model.neck, PlainPyramidAdapter) == (family in PLAIN)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 65, 97))  # odd size: padded to the backbone stride, cropped back
    assert logits.shape == (1, NUM_CLASSES, 65, 97)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", list(BACKBONES))
def test_gradient_reaches_every_parameter(family: str) -> None:
    model = _build(family, aux_head=True).train()
    images = torch.randn(2, 3, 32, 48)
    target = torch.randint(0, NUM_CLASSES, (2, 32, 48))
    logits, aux = model.forward_with_aux(images)
    assert logits.shape == aux.shape == (2, NUM_CLASSES, 32, 48)
    loss = F.cross_entropy(logits, target) + model.aux_weight * F.cross_entropy(aux, target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    dead = [n for n, p in model.named_parameters() if not (torch.isfinite(p.grad).all() and p.grad.any())]
    assert not dead, f"zero or non-finite gradient for {dead}"


@pytest.mark.parametrize("decoder", ["fpn", "conv", "linear"])
def test_gradient_reaches_every_decoder_parameter(decoder: str) -> None:
    model = _build("vim", decoder).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.any(), name


def test_forward_with_aux_without_aux_head_and_forward_equivalence() -> None:
    model = _build("convnext").eval()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        logits, aux = model.forward_with_aux(x)
        assert aux is None
        torch.testing.assert_close(logits, model(x))


def test_aux_head_reads_stride16_map_by_default() -> None:
    model = _build("resnet18", aux_head=True, aux_kwargs=dict(channels=16))
    assert model.aux_head.in_index == 2
    assert model.aux_head.convs[0][0].in_channels == model.feature_channels[2] == 256
    assert model.aux_weight == pytest.approx(0.4)


def test_plain_backbone_gets_evenly_spaced_blocks() -> None:
    name, kwargs = BACKBONES["vit"]
    model = create_segmentation_model(name, 3, backbone_kwargs=dict(kwargs, depth=8), channels=16)
    assert list(model.backbone.out_indices) == [1, 3, 5, 7]
    vim = create_segmentation_model(
        "vim_tiny_patch16_224", 3, backbone_kwargs=dict(depth=24, embed_dim=16), channels=16
    )
    assert list(vim.backbone.out_indices) == [5, 11, 17, 23]  # as Vim's ADE20K config


def test_user_out_indices_are_kept() -> None:
    name, kwargs = BACKBONES["vit"]
    model = create_segmentation_model(name, 3, backbone_kwargs=dict(kwargs, out_indices=(3,)), channels=16)
    assert list(model.backbone.out_indices) == [3]
    # one block's map is shared by the four pyramid branches, as in Vim's segmentation backbone
    assert [f.shape[-1] for f in model.forward_features(torch.randn(1, 3, 64, 64))] == [16, 8, 4, 2]
    # three same-stride maps cannot fill a four-level pyramid
    with pytest.raises(ValueError, match="output strides"):
        create_segmentation_model(name, 3, backbone_kwargs=dict(kwargs, out_indices=(0, 2, 3)))


def test_hierarchical_backbone_keeps_last_four_levels() -> None:
    model = _build("resnet18")
    assert model.feature_channels == [64, 128, 256, 512]
    out = model.forward_features(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in out] == [16, 8, 4, 2]


def test_stride8_plain_pyramid() -> None:
    model = _build("vim_stride8")
    assert model.backbone.feature_info.reduction() == [8, 8, 8, 8]
    assert model.pad_multiple == 8


def test_pretrained_cfg_is_exposed() -> None:
    model = _build("convnext")
    assert len(model.pretrained_cfg["mean"]) == 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown decoder"):
        create_segmentation_model("resnet18", 3, decoder="segformer")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_segmentation_model("no_such_model_xyz", 3)
    with pytest.raises(ValueError, match="num_classes"):
        create_segmentation_model("resnet18", 0)
    with pytest.raises(ValueError, match="features_only"):
        create_segmentation_model("resnet18", 3, backbone_kwargs=dict(features_only=True))
    with pytest.raises(ValueError, match="in_index"):
        create_segmentation_model("resnet18", 3, aux_head=True, aux_kwargs=dict(in_index=7), channels=16)
    model = _build("convnext")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.randn(3, 32, 32))
