"""Albumentations training presets for classification and segmentation, and per-worker reseeding.

The evaluation presets live in :mod:`vmamba.preprocess` (the one preprocessing of validation and inference)
and are re-exported here.

The presets build ordinary ``albumentations.Compose`` pipelines, so a YAML config can replace any of them with
its own list of transforms (``class_path: albumentations.HorizontalFlip``...). Every pipeline ends with
``Normalize`` + ``ToTensorV2``: images come out as ``(3, H, W) float32`` tensors, masks as ``(H, W)`` uint8
tensors (cast to ``long`` by the datasets).

``albumentations.Compose`` owns its random generator, which neither ``torch`` nor Lightning's
``seed_everything`` touches: without reseeding, every DataLoader worker replays the same augmentation stream.
:func:`seed_worker` is the ``worker_init_fn`` used by all data modules of this package to fix that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vmamba.preprocess import (
    INTERPOLATIONS,
    classification_eval_transform,
    interpolation_flag,
    normalize_and_tensor,
    segmentation_eval_transform,
)

__all__ = [
    "INTERPOLATIONS",
    "TransformSpec",
    "build_transform",
    "classification_eval_transform",
    "classification_train_transform",
    "find_transform",
    "rand_augment",
    "seed_transform",
    "seed_worker",
    "segmentation_eval_transform",
    "segmentation_train_transform",
]

#: What a data module accepts in place of a preset: a ready ``Compose`` or a list of transforms.
TransformSpec = A.BaseCompose | list[A.BasicTransform | A.BaseCompose]


def rand_augment(num_ops: int = 2, magnitude: float = 9.0) -> A.SomeOf:
    """A RandAugment-style policy in albumentations: ``num_ops`` ops drawn per image from timm's RandAugment
    op list, at strength ``magnitude`` out of 10 (timm's ``rand-m9-n2``).

    It mirrors the ops and ranges of ``timm.data.auto_augment`` (rotate 30 deg, shear 0.3, translate 45 %,
    solarize, posterize, colour/contrast/brightness/sharpness 0.9 at magnitude 10, autocontrast, equalize),
    drawn uniformly up to the magnitude (as timm's increasing ``inc1`` ops); it is a faithful approximation,
    not bit-identical to timm's PIL implementation.
    """
    m = magnitude / 10.0
    enhance = 0.9 * m
    ops: list[A.BasicTransform] = [
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.Affine(rotate=(-30 * m, 30 * m), p=1.0),
        A.Affine(shear={"x": (-16.7 * m, 16.7 * m), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-16.7 * m, 16.7 * m)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.45 * m, 0.45 * m)}, p=1.0),
        A.Solarize(threshold_range=(1.0 - m, 1.0), p=1.0),
        A.Posterize(num_bits=(max(1, round(8 - 4 * m)), 8), p=1.0),
        A.ColorJitter(brightness=enhance, contrast=0, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=enhance, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=enhance, hue=0, p=1.0),
        A.Sharpen(alpha=(0.0, min(enhance, 1.0)), lightness=(1.0, 1.0), p=1.0),
    ]
    return A.SomeOf(ops, n=num_ops, p=1.0)


def classification_train_transform(
    img_size: int | Sequence[int] = 224,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | None = None,
    rand_augment_magnitude: float | None = None,
    re_prob: float = 0.0,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> A.Compose:
    """Training preset for classification: ``RandomResizedCrop`` + horizontal flip (+ colour jitter,
    RandAugment, random erasing) + normalise.

    Args:
        img_size: output size, an int or ``(height, width)``.
        scale: area range of the random crop relative to the image.
        ratio: aspect-ratio range of the random crop.
        hflip: probability of a horizontal flip (0 disables it; digits and text must not be mirrored).
        color_jitter: brightness/contrast/saturation strength, ``None`` to skip.
        rand_augment_magnitude: apply :func:`rand_augment` (2 ops) at this magnitude, ``None`` to skip (the
            DeiT/Swin ImageNet recipes use 9).
        re_prob: probability of random erasing (a random-noise rectangle of 2-33 % of the image; 0.25 in the
            recipes).
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"area"``.
        mean: per-channel mean of the model's input normalisation (0-1 scale).
        std: per-channel standard deviation (0-1 scale).
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    transforms: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(h, w),
            scale=tuple(scale),
            ratio=tuple(ratio),
            interpolation=interpolation_flag(interpolation),
        )
    ]
    if hflip > 0:
        transforms.append(A.HorizontalFlip(p=hflip))
    if color_jitter:
        transforms.append(
            A.ColorJitter(
                brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0, p=0.8
            )
        )
    return A.Compose(transforms + normalize_and_tensor(mean, std))


def segmentation_train_transform(
    crop_size: int | Sequence[int] = 512,
    base_size: int | None = None,
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: float | None = None,
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> A.Compose:
    """Training preset for segmentation, the mmseg recipe: scale jitter, pad, random crop, flip, normalise.

    Args:
        crop_size: crop fed to the network, an int or ``(height, width)``.
        base_size: if given, first resize the image so its short side is ``base_size`` (mmseg resizes ADE20K
            to a 512 short side before the ``0.5-2.0`` ratio jitter); ``None`` jitters the original size.
        scale_range: random rescale factor range.
        hflip: probability of a horizontal flip.
        color_jitter: brightness/contrast/saturation strength, ``None`` to skip.
        ignore_index: label written into padded mask pixels, so they do not count in the loss.
        mean: per-channel mean of the input normalisation (0-1 scale).
        std: per-channel standard deviation (0-1 scale).
    """
    h, w = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}.")
    transforms: list[A.BasicTransform] = []
    if base_size is not None:
        transforms.append(A.SmallestMaxSize(max_size=base_size))
    transforms += [
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0),
        A.PadIfNeeded(
            min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
        ),
        A.RandomCrop(height=h, width=w),
    ]
    if hflip > 0:
        transforms.append(A.HorizontalFlip(p=hflip))
    if color_jitter:
        transforms.append(
            A.ColorJitter(
                brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0, p=0.5
            )
        )
    return A.Compose(transforms + normalize_and_tensor(mean, std))


def build_transform(spec: TransformSpec | None, default: Any) -> Any:
    """Turn a YAML-given pipeline (a ``Compose`` or a list of transforms) into a ``Compose``; ``None`` ->
    ``default`` (a preset, or :class:`vmamba.preprocess.EvalPreprocess` for evaluation)."""
    if spec is None:
        return default
    if isinstance(spec, A.BaseCompose):
        return spec
    if isinstance(spec, (list, tuple)):
        return A.Compose(list(spec))
    raise TypeError(f"Expected an albumentations Compose or a list of transforms, got {type(spec).__name__}.")


def find_transform(dataset: Any) -> A.BaseCompose | None:
    """The albumentations pipeline of ``dataset``, looking through ``Subset``/wrapper ``.dataset`` chains."""
    seen = 0
    while dataset is not None and seen < 16:
        transform = getattr(dataset, "transform", None)
        if isinstance(transform, A.BaseCompose):
            return transform
        dataset = getattr(dataset, "dataset", None)
        seen += 1
    return None


def seed_transform(dataset: Any, seed: int) -> None:
    """Reseed the albumentations pipeline of ``dataset`` (no-op if it has none)."""
    transform = find_transform(dataset)
    if transform is not None:
        transform.set_random_seed(int(seed) % 2**32)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` that gives every DataLoader worker its own augmentation stream.

    It first runs Lightning's ``pl_worker_init_function`` (rank- and worker-aware seeds for ``torch``,
    ``random`` and ``numpy``), then reseeds the worker's copy of the dataset's albumentations ``Compose`` from
    the new torch seed. The streams are distinct per worker, per rank and per epoch, and reproducible under
    ``seed_everything``.
    """
    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        seed_transform(info.dataset, torch.initial_seed())
