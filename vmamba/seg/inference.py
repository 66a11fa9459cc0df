"""Whole-image and sliding-window segmentation inference, with optional horizontal-flip averaging.

Both functions take a model mapping (N, C, h, w) to (N, K, h, w) logits (any `vmamba.seg.SegmentationModel`) and
return (N, K, H, W) scores at the full input size, as logits (default) or softmax probabilities; every average
(overlapping windows, flips) is taken in that output space. They run under ``torch.no_grad()`` and leave the
model's train/eval mode alone: call ``model.eval()`` first.

Sliding window follows mmsegmentation's ``slide_inference``: windows of ``crop_size`` every ``stride`` pixels, the
last window in each direction shifted back to end at the image border, overlapping scores averaged. Images smaller
than the crop are zero-padded (bottom/right) to the crop size, predicted, and the result cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["predict_whole", "predict_sliding"]

Output = Literal["logits", "probs"]


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of positive ints, got {v!r}")
    return pair  # type: ignore[return-value]


def _check(images: torch.Tensor, output: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if output not in ("logits", "probs"):
        raise ValueError(f"output must be 'logits' or 'probs', got {output!r}")


def _forward(model: nn.Module, images: torch.Tensor, flip: bool, output: Output) -> torch.Tensor:
    """One prediction in the output space; with ``flip``, the mean of the plain and the h-flipped prediction."""

    def run(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if out.shape[-2:] != x.shape[-2:]:
            raise RuntimeError(
                f"model returned scores of size {tuple(out.shape[-2:])} for an input of size {tuple(x.shape[-2:])};"
                f" the model must return logits at the input resolution"
            )
        return out.softmax(dim=1) if output == "probs" else out

    scores = run(images)
    if flip:
        scores = (scores + run(images.flip(-1)).flip(-1)) / 2
    return scores


@torch.no_grad()
def predict_whole(
    model: nn.Module, images: torch.Tensor, flip: bool = False, output: Output = "logits"
) -> torch.Tensor:
    """Predict the whole image in one pass: (N, C, H, W) -> (N, K, H, W) logits or probabilities.

    Args:
        model: segmentation model returning logits at the input size.
        images: normalised image batch.
        flip: also predict the horizontally flipped image and average.
        output: ``"logits"`` or ``"probs"`` (softmax over classes).
    """
    _check(images, output)
    return _forward(model, images, flip, output)


@torch.no_grad()
def predict_sliding(
    model: nn.Module,
    images: torch.Tensor,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int | None = None,
    flip: bool = False,
    output: Output = "logits",
) -> torch.Tensor:
    """Sliding-window prediction: (N, C, H, W) -> (N, K, H, W), overlapping windows averaged.

    Args:
        model: segmentation model returning logits at the input size.
        images: normalised image batch.
        crop_size: window size, int or (h, w) (the training crop, e.g. 512).
        stride: step between windows, int or (h, w) (e.g. 341 for a 512 crop, as Vim's ADE20K test config).
        num_classes: expected K; checked against the model's output when given.
        flip: average each window with its horizontally flipped prediction.
        output: ``"logits"`` or ``"probs"`` (softmax over classes).
    """
    _check(images, output)
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride_h, stride_w = _pair(stride, "stride")
    height, width = images.shape[-2:]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    full_h, full_w = images.shape[-2:]
    rows = max(full_h - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(full_w - crop_w + stride_w - 1, 0) // stride_w + 1

    scores: torch.Tensor | None = None
    count = images.new_zeros((1, 1, full_h, full_w))
    for r in range(rows):
        for c in range(cols):
            y1 = max(min(r * stride_h, full_h - crop_h), 0)
            x1 = max(min(c * stride_w, full_w - crop_w), 0)
            y2, x2 = y1 + crop_h, x1 + crop_w
            window = _forward(model, images[..., y1:y2, x1:x2], flip, output)
            if scores is None:
                if num_classes is not None and window.shape[1] != num_classes:
                    raise RuntimeError(
                        f"model returned {window.shape[1]} classes, expected num_classes={num_classes}"
                    )
                scores = window.new_zeros((images.shape[0], window.shape[1], full_h, full_w))
            scores[..., y1:y2, x1:x2] += window
            count[..., y1:y2, x1:x2] += 1
    assert scores is not None  # at least one window always runs
    return (scores / count)[..., :height, :width]
