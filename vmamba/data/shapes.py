"""A generated segmentation dataset: light circles, squares and triangles on dark, noisy backgrounds.

Every image is a pure function of ``(seed, index)``, so the dataset needs no download and is identical on
every machine. Classes: 0 background, 1 circle, 2 square, 3 triangle. Shapes are drawn in random colours,
sizes, positions and rotations and may overlap (later shapes cover earlier ones, in the image and the mask
alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from vmamba.contract import segmentation_data_config
from vmamba.data.base import BaseDataModule
from vmamba.data.transforms import TransformSpec, build_transform, segmentation_train_transform
from vmamba.preprocess import EvalPreprocess

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_MEAN",
    "SHAPES_STD",
    "ShapesDataModule",
    "ShapesDataset",
    "make_shapes_sample",
]

SHAPES_CLASSES = ("background", "circle", "square", "triangle")
#: Normalisation used for the shapes images (0-1 scale).
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.25, 0.25, 0.25)


def _shape_mask(kind: int, size: int, cy: float, cx: float, radius: float, angle: float) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a circle (1), square (2) or equilateral triangle (3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if kind == 1:
        return dy * dy + dx * dx <= radius * radius
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's rotated frame
    if kind == 2:
        half = radius * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # Triangle: intersection of three half-planes whose outward normals are 120 degrees apart.
    inside = np.ones((size, size), dtype=bool)
    for k in range(3):
        theta = 2 * np.pi * k / 3 + np.pi / 2
        inside &= u * np.cos(theta) + v * np.sin(theta) <= radius * 0.5
    return inside


def make_shapes_sample(
    seed: int, index: int, img_size: int = 64, max_shapes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Generate image ``index`` of the dataset with seed ``seed``.

    Returns an ``(img_size, img_size, 3)`` uint8 image and an ``(img_size, img_size)`` uint8 mask with values
    in ``0..3``.
    """
    rng = np.random.default_rng([seed, index])
    # Dark backgrounds and light shapes: telling shape from background is easy, telling the three shapes apart
    # needs their outline. A smooth gradient plus pixel noise keeps the background non-trivial.
    background = rng.uniform(0, 110, size=3)
    ramp = np.linspace(-1, 1, img_size, dtype=np.float32)
    gradient = rng.uniform(-25, 25) * ramp[None, :, None] + rng.uniform(-25, 25) * ramp[:, None, None]
    image = background[None, None, :] + gradient
    mask = np.zeros((img_size, img_size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(1, 4))
        radius = rng.uniform(img_size / 10, img_size / 4)
        cy, cx = rng.uniform(radius * 0.5, img_size - radius * 0.5, size=2)
        colour = rng.uniform(150, 255, size=3)
        inside = _shape_mask(kind, img_size, cy, cx, radius, rng.uniform(0, 2 * np.pi))
        image[inside] = colour
        mask[inside] = kind
    image = image + rng.normal(0, 20, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


class ShapesDataset(Dataset):
    """``num_images`` generated samples as ``{"image": (3, H, W) float, "mask": (H, W) long}``.

    The images are generated once, at construction (64x64: about 12 KiB each).

    Args:
        num_images: dataset length.
        seed: generator seed; different seeds give disjoint-looking datasets.
        img_size: image side.
        max_shapes: at most this many shapes per image (at least one).
        transform: albumentations pipeline applied to ``image`` and ``mask`` together.
        predict: return ``{"image", "id"}`` instead of the mask.
    """

    def __init__(
        self,
        num_images: int,
        seed: int,
        transform: A.BaseCompose,
        img_size: int = 64,
        max_shapes: int = 3,
        predict: bool = False,
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        samples = [make_shapes_sample(seed, i, img_size, max_shapes) for i in range(num_images)]
        self.images = np.stack([s[0] for s in samples])
        self.masks = np.stack([s[1] for s in samples])
        self.transform = transform
        self.predict = predict

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = self.transform(image=self.images[index], mask=self.masks[index])
        if self.predict:
            return {"image": out["image"], "id": str(index)}
        return {"image": out["image"], "mask": torch.as_tensor(out["mask"]).long()}


class ShapesDataModule(BaseDataModule):
    """Generated shapes segmentation (background + circle, square, triangle), deterministic from ``seed``.

    Training images use seed ``seed``, validation ``seed + 1`` and test ``seed + 2``; predict uses the
    validation images.

    Args:
        num_train: number of training images.
        num_val: number of validation (and test) images.
        img_size: image side.
        max_shapes: at most this many shapes per image.
        seed: dataset seed.
        scale_range: random rescale range of the training preset (then crop back to ``img_size``).
        ignore_index: mask value ignored by the loss (used for padding by the training preset).
        train_transform: albumentations pipeline replacing the training preset.
        val_transform: pipeline replacing the evaluation preset (normalise only).
        batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers: see :class:`BaseDataModule`.
    """

    task = "segmentation"

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 128,
        img_size: int = 64,
        max_shapes: int = 3,
        seed: int = 0,
        scale_range: Sequence[float] = (0.75, 1.5),
        ignore_index: int = 255,
        train_transform: TransformSpec | None = None,
        val_transform: TransformSpec | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers)
        self.num_train = num_train
        self.num_val = num_val
        self.img_size = img_size
        self.max_shapes = max_shapes
        self.seed = seed
        self.ignore_index = ignore_index
        self.train_transform = build_transform(
            train_transform,
            segmentation_train_transform(
                img_size, scale_range=scale_range, ignore_index=ignore_index, mean=SHAPES_MEAN, std=SHAPES_STD
            ),
        )
        self.val_transform = build_transform(val_transform, EvalPreprocess(self.data_config))

    @property
    def num_classes(self) -> int:
        return len(SHAPES_CLASSES)

    @property
    def class_names(self) -> list[str]:
        return list(SHAPES_CLASSES)

    @property
    def data_config(self) -> dict[str, Any]:
        return segmentation_data_config(
            self.img_size, SHAPES_MEAN, SHAPES_STD, ignore_index=self.ignore_index
        )

    def setup(self, stage: str | None = None) -> None:
        """Generate the splits a stage needs (generation takes well under a second per 100 images)."""
        kwargs = {"img_size": self.img_size, "max_shapes": self.max_shapes}
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = ShapesDataset(self.num_train, self.seed, self.train_transform, **kwargs)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = ShapesDataset(self.num_val, self.seed + 1, self.val_transform, **kwargs)
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = ShapesDataset(self.num_val, self.seed + 2, self.val_transform, **kwargs)
        if stage in (None, "predict") and self.predict_dataset is None:
            self.predict_dataset = ShapesDataset(
                self.num_val, self.seed + 1, self.val_transform, predict=True, **kwargs
            )
