"""Pretrained configs of the official dense-prediction (ADE20K / COCO) VMamba backbones."""

from __future__ import annotations

import pytest
import timm
import torch
from official_vmamba import TINY, as_mmseg_checkpoint, official_backbone_features, random_official_state_dict

import vmamba  # noqa: F401  (registers the models)

DENSE_TAGS = {
    "vmamba_tiny_s1l8": ("ade20k_upernet", "coco_maskrcnn_1x", "coco_maskrcnn_3x"),
    "vmamba_tiny_s2l5": ("ade20k_upernet", "coco_maskrcnn_1x", "coco_maskrcnn_3x"),
    "vmamba_small_s2l15": ("ade20k_upernet", "coco_maskrcnn_1x", "coco_maskrcnn_3x"),
    "vmamba_base_s2l15": ("ade20k_upernet", "coco_maskrcnn_1x", "coco_maskrcnn_1x_bs8"),
}


def test_dense_cfgs_name_the_official_release_files():
    listed = set(timm.list_models("vmamba_*", include_tags=True))
    for arch, tags in DENSE_TAGS.items():
        for tag in tags:
            assert f"{arch}.{tag}" in listed
            cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}").to_dict()
            release = (
                "%23v2seg/upernet_vssm_" if tag.startswith("ade20k") else "%23v2det/mask_rcnn_vssm_fpn_coco_"
            )
            assert cfg["origin_url"].startswith(
                "https://github.com/MzeroMiko/VMamba/releases/download/" + release
            )
            assert cfg["num_classes"] == 0 and any("features_only=True" in n for n in cfg["notes"])
    # The default (first) tag of each architecture stays the ImageNet classifier.
    assert timm.models.get_pretrained_cfg("vmamba_tiny_s1l8").to_dict()["num_classes"] == 1000


def test_dense_checkpoint_loads_through_its_tag(tmp_path):
    """The documented one line: the dense tag, features_only, and the downloaded file in the overlay."""
    backbone_sd = random_official_state_dict(TINY, seed=3, classifier=False, outnorms=True)
    path = tmp_path / "upernet_vssm_4xb4-160k_ade20k-512x512_tiny_s_iter_160000.pth"
    torch.save(as_mmseg_checkpoint(backbone_sd), path)
    model = timm.create_model(
        "vmamba_tiny_s1l8.ade20k_upernet",
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        dims=16,
        depths=(1, 1, 2, 1),
    ).eval()
    assert model.pretrained_cfg["tag"] == "ade20k_upernet"
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        for ours, official in zip(model(x), official_backbone_features(backbone_sd, x, TINY), strict=True):
            torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="features_only=True"):
        timm.create_model(
            "vmamba_tiny_s1l8.ade20k_upernet",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path)),
            dims=16,
            depths=(1, 1, 2, 1),
        )
