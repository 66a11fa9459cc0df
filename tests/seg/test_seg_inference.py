"""Whole-image and sliding-window inference: averaging, padding, flip, probabilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vmamba.seg import create_segmentation_model, predict_sliding, predict_whole


def _pointwise(num_classes: int = 4) -> nn.Module:
    """A per-pixel model: every window sees the same value at a pixel, so any tiling must equal one pass."""
    torch.manual_seed(0)
    return nn.Conv2d(3, num_classes, kernel_size=1).eval()


class _Ones(nn.Module):
    """Returns ones: the sliding average must stay one everywhere if the window counts are right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(x.shape[0], 2, *x.shape[-2:])


@pytest.fixture(scope="module")
def seg_model() -> nn.Module:
    torch.manual_seed(0)
    return create_segmentation_model(
        "vim_tiny_patch16_224", 3, backbone_kwargs=dict(depth=2, embed_dim=32, img_size=64), channels=16
    ).eval()


@pytest.mark.parametrize(
    ("size", "crop", "stride"),
    [
        ((40, 56), 16, 8),
        ((40, 56), (16, 24), (11, 7)),
        ((37, 53), 20, 20),
        ((12, 10), 16, 8),
        ((30, 50), 30, 100),
    ],
)
def test_sliding_tiles_equal_whole_for_pointwise_model(size, crop, stride) -> None:
    model = _pointwise()
    images = torch.randn(2, 3, *size)
    whole = predict_whole(model, images)
    sliding = predict_sliding(model, images, crop, stride, num_classes=4)
    assert sliding.shape == whole.shape == (2, 4, *size)
    torch.testing.assert_close(sliding, whole)


def test_overlaps_are_averaged_not_summed() -> None:
    out = predict_sliding(_Ones(), torch.randn(1, 3, 45, 70), crop_size=20, stride=7)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_sliding_equals_whole_when_window_covers_image(seg_model) -> None:
    images = torch.randn(2, 3, 65, 97)
    whole = predict_whole(seg_model, images)
    assert whole.shape == (2, 3, 65, 97)
    torch.testing.assert_close(predict_sliding(seg_model, images, crop_size=(65, 97), stride=32), whole)


def test_sliding_pads_images_smaller_than_crop(seg_model) -> None:
    images = torch.randn(1, 3, 40, 50)
    out = predict_sliding(seg_model, images, crop_size=64, stride=48)
    assert out.shape == (1, 3, 40, 50)
    padded = torch.nn.functional.pad(images, (0, 14, 0, 24))
    torch.testing.assert_close(out, predict_whole(seg_model, padded)[..., :40, :50])


def test_flip_averages_with_mirrored_prediction() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, kernel_size=3, padding=1).eval()  # not mirror-symmetric
    images = torch.randn(1, 3, 20, 30)
    expected = (model(images) + model(images.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(predict_whole(model, images, flip=True), expected)
    torch.testing.assert_close(
        predict_sliding(model, images, 20, 10, flip=True)[..., :, :10], expected[..., :, :10]
    )
    assert not torch.allclose(predict_whole(model, images), expected)


def test_probs_output(seg_model) -> None:
    images = torch.randn(1, 3, 64, 64)
    probs = predict_sliding(seg_model, images, crop_size=48, stride=16, output="probs", flip=True)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 64))
    assert (probs >= 0).all()


def test_inference_does_not_track_gradients_or_change_mode(seg_model) -> None:
    out = predict_whole(seg_model, torch.randn(1, 3, 32, 32))
    assert not out.requires_grad
    assert not seg_model.training


def test_bad_inputs() -> None:
    model = _pointwise()
    with pytest.raises(ValueError, match="crop_size"):
        predict_sliding(model, torch.randn(1, 3, 8, 8), crop_size=0, stride=4)
    with pytest.raises(ValueError, match="stride"):
        predict_sliding(model, torch.randn(1, 3, 8, 8), crop_size=4, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="output"):
        predict_whole(model, torch.randn(1, 3, 8, 8), output="argmax")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        predict_whole(model, torch.randn(3, 8, 8))
    with pytest.raises(RuntimeError, match="num_classes"):
        predict_sliding(model, torch.randn(1, 3, 8, 8), 4, 4, num_classes=5)
    with pytest.raises(RuntimeError, match="input resolution"):
        predict_whole(nn.Conv2d(3, 2, 2, stride=2), torch.randn(1, 3, 8, 8))
