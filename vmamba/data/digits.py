"""The embedded default dataset: scikit-learn's bundled handwritten digits as an image classification dataset.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grayscale scans (values 0-16, ink is bright) of the
digits 0-9 inside the scikit-learn wheel, so training works on a fresh machine without any download. The
images are stored as uint8 (value * 255 / 16), replicated to three channels and upscaled by the transforms
(the quickstart uses 32x32).

``python -m vmamba.data.digits OUT_DIR`` writes the validation images as PNG files, ready for the predictor.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vmamba.contract import classification_data_config
from vmamba.data.base import BaseDataModule, split_indices
from vmamba.data.transforms import TransformSpec, build_transform, classification_train_transform
from vmamba.preprocess import EvalPreprocess

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DigitsDataModule", "DigitsDataset", "load_digits_arrays"]

#: Per-channel mean and std of the digits images on the 0-1 scale (measured over all 1,797 images).
DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3760, 0.3760, 0.3760)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``(1797, 8, 8)`` uint8 images (ink bright) and ``(1797,)`` int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


class DigitsDataset(Dataset):
    """A subset of the digits as ``{"image": (3, H, W) float, "label": long}`` samples.

    Args:
        images: ``(N, 8, 8)`` uint8 images.
        labels: ``(N,)`` int labels.
        transform: albumentations pipeline applied to the ``(8, 8, 3)`` uint8 image.
        predict: return ``{"image", "id"}`` (the index as a string) instead of a label.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: A.BaseCompose, predict: bool = False
    ) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform
        self.predict = predict

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = np.repeat(self.images[index][:, :, None], 3, axis=2)
        tensor = self.transform(image=image)["image"]
        if self.predict:
            return {"image": tensor, "id": str(index)}
        return {"image": tensor, "label": torch.tensor(self.labels[index], dtype=torch.long)}


class DigitsDataModule(BaseDataModule):
    """scikit-learn's handwritten digits (1,797 images, classes "0"-"9"), no download needed.

    The split is stratified and fixed by ``split_seed``; the test and predict sets are the validation split.

    Args:
        img_size: side the 8x8 images are upscaled to.
        val_fraction: fraction of every class held out for validation (0.2 -> 1,437 train / 360 val).
        split_seed: seed of the split.
        crop_scale: area range of the training ``RandomResizedCrop`` (digits are never flipped).
        train_transform: albumentations pipeline replacing the training preset.
        val_transform: pipeline replacing the evaluation preset (a resize to ``img_size``).
        batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers: see :class:`BaseDataModule`.
    """

    task = "classification"

    def __init__(
        self,
        img_size: int = 32,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        crop_scale: Sequence[float] = (0.85, 1.0),
        train_transform: TransformSpec | None = None,
        val_transform: TransformSpec | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers)
        self.img_size = img_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.train_transform = build_transform(
            train_transform,
            classification_train_transform(
                img_size,
                scale=crop_scale,
                ratio=(0.8, 1.25),
                hflip=0.0,
                interpolation="bilinear",
                mean=DIGITS_MEAN,
                std=DIGITS_STD,
            ),
        )
        self.val_transform = build_transform(val_transform, EvalPreprocess(self.data_config))

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(10)]

    @property
    def data_config(self) -> dict[str, Any]:
        return classification_data_config(
            self.img_size, DIGITS_MEAN, DIGITS_STD, interpolation="bilinear", crop_pct=1.0, grayscale=True
        )

    def setup(self, stage: str | None = None) -> None:
        """Load the bundled arrays and build the fixed split."""
        images, labels = load_digits_arrays()
        train_idx, val_idx = split_indices(labels, self.val_fraction, self.split_seed)
        self.train_dataset = DigitsDataset(images[train_idx], labels[train_idx], self.train_transform)
        if len(val_idx):
            self.val_dataset = DigitsDataset(images[val_idx], labels[val_idx], self.val_transform)
            self.test_dataset = self.val_dataset
            self.predict_dataset = DigitsDataset(
                images[val_idx], labels[val_idx], self.val_transform, predict=True
            )

    def export_images(self, out_dir: str | Path, split: str = "val", size: int | None = None) -> list[Path]:
        """Write a split as grayscale PNG files named ``{index:04d}_label{label}.png``; returns their paths.

        ``size`` (default ``img_size``) upscales with the same bilinear resize as the evaluation transform, so
        a predictor that resizes to ``img_size`` sees the same pixels as validation did.
        """
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}.")
        images, labels = load_digits_arrays()
        train_idx, val_idx = split_indices(labels, self.val_fraction, self.split_seed)
        indices = {"train": train_idx, "val": val_idx, "all": np.arange(len(labels))}[split]
        side = size or self.img_size
        resize = A.Resize(side, side, interpolation=1)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in indices:
            path = out / f"{i:04d}_label{labels[i]}.png"
            Image.fromarray(resize(image=images[i])["image"]).save(path)
            paths.append(path)
        return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m vmamba.data.digits OUT_DIR``: export digits images as PNG files."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--split", default="val", choices=["train", "val", "all"])
    parser.add_argument("--size", type=int, default=32, help="side of the written images (default 32)")
    args = parser.parse_args(argv)
    paths = DigitsDataModule(img_size=args.size).export_images(args.out_dir, args.split)
    print(f"wrote {len(paths)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
