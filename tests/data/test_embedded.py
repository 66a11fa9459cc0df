"""Embedded datasets (digits, shapes) and the albumentations presets / per-worker reseeding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vmamba.data import (
    DigitsDataModule,
    ShapesDataModule,
    classification_eval_transform,
    classification_train_transform,
    make_shapes_sample,
    seed_worker,
    segmentation_train_transform,
    split_indices,
)


def test_digits_split_and_batches() -> None:
    dm = DigitsDataModule(img_size=16, batch_size=8)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    assert dm.data_config["grayscale"] is True and dm.data_config["input_size"] == [3, 16, 16]
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    assert 340 <= len(dm.val_dataset) <= 380
    assert set(np.unique(dm.val_dataset.labels)) == set(range(10))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["label"].dtype == torch.long
    # The three channels are copies of the grayscale image.
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 1])
    # The split is a fixed function of the seed.
    dm2 = DigitsDataModule()
    dm2.setup("fit")
    assert np.array_equal(dm.val_dataset.labels, dm2.val_dataset.labels)


def test_split_indices_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(3), [10, 5, 1])
    train, val = split_indices(labels, 0.2, seed=1)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 16
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    with pytest.raises(ValueError):
        split_indices(labels, 1.0, 0)


def test_digits_export_matches_eval_pixels(tmp_path: Path) -> None:
    dm = DigitsDataModule(img_size=32)
    paths = dm.export_images(tmp_path, split="val")
    assert len(paths) == 359
    img = np.asarray(Image.open(paths[0]))
    assert img.shape == (32, 32) and img.dtype == np.uint8
    dm.setup("fit")
    expected = dm.val_dataset[0]["image"][0].numpy()
    mean, std = dm.data_config["mean"][0], dm.data_config["std"][0]
    np.testing.assert_allclose((img / 255.0 - mean) / std, expected, atol=1e-5)


def test_shapes_deterministic_and_valid() -> None:
    a_img, a_mask = make_shapes_sample(3, 7)
    b_img, b_mask = make_shapes_sample(3, 7)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, make_shapes_sample(4, 7)[0])
    masks = np.stack([make_shapes_sample(0, i)[1] for i in range(40)])
    assert set(np.unique(masks)) == {0, 1, 2, 3}
    dm = ShapesDataModule(num_train=8, num_val=4, img_size=32, batch_size=4)
    assert dm.num_classes == 4 and dm.class_names[0] == "background"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, 255}


def test_presets_output_types() -> None:
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    out = classification_train_transform(24)(image=img)["image"]
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    out = classification_eval_transform(24, crop_pct=0.875)(image=img)["image"]
    assert out.shape == (3, 24, 24)
    mask = np.zeros((40, 50), dtype=np.uint8)
    res = segmentation_train_transform(64, scale_range=(0.5, 0.5), ignore_index=255)(image=img, mask=mask)
    assert res["image"].shape == (3, 64, 64)
    assert (torch.as_tensor(res["mask"]) == 255).any()  # padding is written as ignore_index
    with pytest.raises(ValueError, match="interpolation"):
        classification_train_transform(24, interpolation="cubic-ish")


class _RandomCrops(Dataset):
    """Returns the crop offset chosen by the augmentation, to compare workers' random streams."""

    def __init__(self) -> None:
        self.transform = classification_train_transform(8, scale=(0.05, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
        self.image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(image=self.image)["image"]


def test_seed_worker_gives_distinct_augmentations() -> None:
    """Without reseeding, both workers replay the same albumentations stream (reference D)."""

    def batches(worker_init_fn):
        torch.manual_seed(0)
        loader = DataLoader(_RandomCrops(), batch_size=1, num_workers=2, worker_init_fn=worker_init_fn)
        return [b[0] for b in loader]

    plain = batches(None)
    assert torch.equal(plain[0], plain[1])  # samples 0 and 1 come from different workers, same stream
    seeded = batches(seed_worker)
    assert not torch.equal(seeded[0], seeded[1])
    again = batches(seed_worker)
    assert all(torch.equal(a, b) for a, b in zip(seeded, again))  # and reproducible
