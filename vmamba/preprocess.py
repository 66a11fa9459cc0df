"""The one evaluation preprocessing of vmamba, defined by a ``data_config`` (see :mod:`vmamba.contract`).

Validation and test (the data modules), ``train.py predict`` and ``vmamba-predict`` all turn an ``(H, W, 3)``
uint8 RGB array (from :func:`vmamba.imageio.read_rgb`) into the network input with :class:`EvalPreprocess`,
so a file scored in validation gives the same tensor at inference:

* classification: resize the short side to ``input_size / crop_pct`` and centre-crop ``input_size``
  (``crop_mode="center"``, timm's eval transform), or resize straight to ``input_size``
  (``crop_mode="squash"``);
* segmentation: optionally resize the short side to ``base_size``; the whole image is kept (the sliding
  window, ``slide_window``/``slide_stride``, runs on the network side);
* both: with ``grayscale=True`` the image is first reduced to luma (ITU-R 601) and replicated to three
  channels; then ``(x / 255 - mean) / std`` and a ``(3, H, W)`` float32 tensor.

Resizing uses OpenCV through albumentations (the training augmentations use the same library). Nothing here
imports Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vmamba.contract import canonical_task

__all__ = [
    "CROP_MODES",
    "INTERPOLATIONS",
    "EvalPreprocess",
    "classification_eval_transform",
    "interpolation_flag",
    "normalize_and_tensor",
    "segmentation_eval_transform",
    "to_grayscale",
]

#: Interpolation names accepted by the presets (the names timm's data configs use).
INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}

#: Classification crop modes: timm's centre crop after a short-side resize, or a plain resize.
CROP_MODES = ("center", "squash")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def interpolation_flag(name: str) -> int:
    """Map an interpolation name to its OpenCV flag, with a clear error for unknown names."""
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown interpolation {name!r}; use one of {sorted(INTERPOLATIONS)}.") from None


def normalize_and_tensor(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    """The common tail of every pipeline: normalise to the model's statistics and convert to tensors."""
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def classification_eval_transform(
    img_size: int | Sequence[int] = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_mode: str = "center",
) -> A.Compose:
    """Evaluation preset for classification, timm's: resize the short side to ``img_size / crop_pct``,
    centre-crop ``img_size``, normalise (``crop_mode="squash"``: resize to ``img_size``, no crop).

    With ``crop_pct=1`` and a square input ``"center"`` is a plain resize to ``img_size``.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)[-2:]
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    flag = interpolation_flag(interpolation)
    if crop_mode == "center":
        resize = int(round(min(h, w) / crop_pct))
        transforms: list[A.BasicTransform] = [
            A.SmallestMaxSize(max_size=resize, interpolation=flag),
            A.CenterCrop(height=h, width=w),
        ]
    elif crop_mode == "squash":
        transforms = [A.Resize(height=h, width=w, interpolation=flag)]
    else:
        raise ValueError(f"Unknown crop_mode {crop_mode!r}; use one of {CROP_MODES}.")
    return A.Compose(transforms + normalize_and_tensor(mean, std))


def segmentation_eval_transform(
    base_size: int | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> A.Compose:
    """Evaluation preset for segmentation: optional short-side resize to ``base_size``, then normalise the
    whole image (the task or ``vmamba-predict`` slides a window over large images)."""
    transforms: list[A.BasicTransform] = []
    if base_size is not None:
        transforms.append(A.SmallestMaxSize(max_size=base_size))
    return A.Compose(transforms + normalize_and_tensor(mean, std))


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Reduce an ``(H, W, 3)`` uint8 RGB array to luma (ITU-R 601) replicated to three channels."""
    luma = np.clip(np.rint(image.astype(np.float32) @ _LUMA), 0, 255).astype(np.uint8)
    return np.repeat(luma[:, :, None], 3, axis=2)


class EvalPreprocess:
    """``(H, W, 3)`` uint8 RGB array -> ``(3, h, w)`` float32 tensor, as a ``data_config`` prescribes.

    Called like an albumentations pipeline (``preprocess(image=array)["image"]``, ``mask=`` transformed
    along), so the datasets take it in place of a ``Compose``. ``transform`` is the albumentations pipeline
    after the optional grayscale step. A class (not a closure) so that DataLoader workers can pickle it.
    """

    def __init__(self, data_config: Mapping[str, Any]) -> None:
        cfg = dict(data_config)
        self.grayscale = bool(cfg.get("grayscale", False))
        mean = cfg.get("mean", IMAGENET_DEFAULT_MEAN)
        std = cfg.get("std", IMAGENET_DEFAULT_STD)
        if canonical_task(cfg.get("task", "classification")) == "segmentation":
            self.transform = segmentation_eval_transform(cfg.get("base_size"), mean, std)
        else:
            self.transform = classification_eval_transform(
                tuple(cfg["input_size"])[-2:],
                float(cfg.get("crop_pct", 1.0)),
                cfg.get("interpolation", "bicubic"),
                mean,
                std,
                cfg.get("crop_mode", "center"),
            )

    def __call__(self, *, image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
        """``{"image": tensor}`` (and ``"mask"`` when given), like an albumentations pipeline."""
        if self.grayscale:
            image = to_grayscale(image)
        if mask is None:
            return self.transform(image=image)
        return self.transform(image=image, mask=mask)

    def __repr__(self) -> str:
        return f"EvalPreprocess(grayscale={self.grayscale}, transform={self.transform!r})"
