"""``pretrained=True`` without a file and without a network: a clear error that says how to pass a file."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import timm
import torch

import vmamba.models  # noqa: F401


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(
    "name, filename",
    [("vim_tiny_patch16_224", "vim_t_midclstok_76p1acc.pth"), ("vmamba_tiny_s1l8", "vssm1_tiny_0230s")],
)
def test_pretrained_offline_names_the_file_overlay(offline, name, filename):
    with pytest.raises(RuntimeError) as info:
        timm.create_model(name, pretrained=True)
    message = str(info.value)
    assert "pretrained_cfg_overlay=dict(file=" in message
    assert filename in message


def test_pretrained_with_local_file_needs_no_network(offline, tmp_path):
    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_classes=3)
    source = timm.create_model("vim_tiny_patch16_224", **kwargs)
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    model = timm.create_model(
        "vim_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=3),
        **kwargs,
    )
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
