"""Folder data modules: layouts, splits, and the clear errors for bad data (before training starts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vmamba.data import (
    ImageFolderDataModule,
    SegmentationFolderDataModule,
    load_mask,
    scan_segmentation_folder,
)
from vmamba.imageio import ImageReadError


def _image(path: Path, size: tuple[int, int] = (20, 16), value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def _mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    for c, n in (("cat", 5), ("dog", 4)):
        for i in range(n):
            _image(root / c / f"{i}.png", value=40 * i)
    return root


def test_image_folder_classes_split_and_batches(class_tree: Path) -> None:
    dm = ImageFolderDataModule(str(class_tree), val_fraction=0.25, img_size=16, batch_size=2)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert dm.data_config["input_size"] == [3, 16, 16]
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 9
    assert {y for _, y in dm.val_dataset.samples} == {0, 1}  # stratified: every class in validation
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].dtype == torch.long


def test_image_folder_val_dir_with_unknown_class(class_tree: Path, tmp_path: Path) -> None:
    _image(tmp_path / "val" / "cat" / "a.png")
    _image(tmp_path / "val" / "bird" / "b.png")
    dm = ImageFolderDataModule(str(class_tree), val_dir=str(tmp_path / "val"), img_size=16)
    with pytest.raises(ValueError, match="bird"):
        dm.setup("fit")


def test_image_folder_empty_and_flat(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        _ = ImageFolderDataModule(str(tmp_path / "empty")).num_classes
    with pytest.raises(ValueError, match="does not exist"):
        _ = ImageFolderDataModule(str(tmp_path / "missing")).num_classes
    _image(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataModule(str(tmp_path / "flat")).setup("fit")
    (tmp_path / "tree" / "a").mkdir(parents=True)
    _image(tmp_path / "tree" / "b" / "x.png")
    with pytest.raises(ValueError, match=r"without images.*\['a'\]"):
        ImageFolderDataModule(str(tmp_path / "tree")).setup("fit")


def test_image_folder_unreadable_image_reported_or_skipped(class_tree: Path) -> None:
    bad = class_tree / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    dm = ImageFolderDataModule(str(class_tree), val_fraction=0.25, img_size=16)
    with pytest.raises(ValueError, match="broken.png"):
        dm.setup("fit")
    dm = ImageFolderDataModule(str(class_tree), val_fraction=0.25, img_size=16, skip_invalid=True)
    with pytest.warns(UserWarning, match="broken.png"):
        dm.setup("fit")
    paths = [p for p, _ in dm.train_dataset.samples + dm.val_dataset.samples]
    assert bad not in paths and len(paths) == 9
    # Without verification the error surfaces (with the path) when the file is loaded.
    dm = ImageFolderDataModule(str(class_tree), val_fraction=0.25, img_size=16, verify_images=False)
    dm.setup("fit")
    index = [i for i, (p, _) in enumerate(dm.train_dataset.samples) if p == bad]
    ds = dm.train_dataset if index else dm.val_dataset
    index = index or [i for i, (p, _) in enumerate(dm.val_dataset.samples) if p == bad]
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[index[0]]


def test_image_folder_predict_dir(class_tree: Path, tmp_path: Path) -> None:
    _image(tmp_path / "pred" / "sub" / "q.jpg")
    dm = ImageFolderDataModule(str(class_tree), predict_dir=str(tmp_path / "pred"), img_size=16)
    dm.setup("predict")
    item = dm.predict_dataset[0]
    assert item["image"].shape == (3, 16, 16) and item["id"] == "sub/q.jpg"


def _seg_tree(root: Path, n: int = 4, num_classes: int = 3) -> None:
    for i in range(n):
        _image(root / "images" / f"s{i}.jpg", size=(24, 20))
        values = np.arange(20 * 24).reshape(20, 24) % num_classes
        _mask(root / "masks" / f"s{i}.png", values)


def test_segmentation_folder_loads_pairs(tmp_path: Path) -> None:
    _seg_tree(tmp_path / "train")
    _seg_tree(tmp_path / "val", n=2)
    dm = SegmentationFolderDataModule(
        str(tmp_path / "train"), num_classes=3, val_dir=str(tmp_path / "val"), crop_size=16, batch_size=2
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 16, 16)
    assert batch["mask"].dtype == torch.long
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 255}
    val = dm.val_dataset[0]
    assert val["mask"].shape == (20, 24)  # evaluation keeps the full image


def test_segmentation_folder_mask_without_image(tmp_path: Path) -> None:
    _seg_tree(tmp_path / "train")
    _mask(tmp_path / "train" / "masks" / "orphan.png", np.zeros((20, 24)))
    with pytest.raises(ValueError, match=r"(?s)mask\(s\) without a matching image.*orphan.png"):
        scan_segmentation_folder(tmp_path / "train")
    _seg_tree(tmp_path / "t2")
    _image(tmp_path / "t2" / "images" / "lonely.png")
    with pytest.raises(ValueError, match=r"(?s)without a mask.*lonely.png"):
        SegmentationFolderDataModule(str(tmp_path / "t2"), num_classes=3).setup("fit")


def test_segmentation_folder_bad_class_values(tmp_path: Path) -> None:
    _seg_tree(tmp_path / "train", num_classes=5)  # values 0..4
    dm = SegmentationFolderDataModule(str(tmp_path / "train"), num_classes=3)
    with pytest.raises(ValueError, match=r"values \[3, 4\]"):
        dm.setup("fit")
    # The ignore index is allowed.
    values = np.zeros((20, 24))
    values[0, 0] = 255
    _seg_tree(tmp_path / "ok", num_classes=3)
    _mask(tmp_path / "ok" / "masks" / "s0.png", values)
    dm = SegmentationFolderDataModule(str(tmp_path / "ok"), num_classes=3, val_fraction=0.25)
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 1


def test_segmentation_folder_empty_and_size_mismatch(tmp_path: Path) -> None:
    (tmp_path / "e" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="No images"):
        SegmentationFolderDataModule(str(tmp_path / "e"), num_classes=2).setup("fit")
    _seg_tree(tmp_path / "m", num_classes=2)
    _mask(tmp_path / "m" / "masks" / "s1.png", np.zeros((5, 5)))
    with pytest.raises(ValueError, match=r"(?s)differ in size.*s1.png"):
        SegmentationFolderDataModule(str(tmp_path / "m"), num_classes=2).setup("fit")


def test_segmentation_unreadable_image_skipped(tmp_path: Path) -> None:
    _seg_tree(tmp_path / "t", n=5, num_classes=2)
    (tmp_path / "t" / "images" / "s0.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="s0.jpg"):
        SegmentationFolderDataModule(str(tmp_path / "t"), num_classes=2).setup("fit")
    dm = SegmentationFolderDataModule(
        str(tmp_path / "t"), num_classes=2, val_fraction=0.25, skip_invalid=True
    )
    with pytest.warns(UserWarning, match="s0.jpg"):
        dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 4


def test_load_mask_palette_and_reduce_zero_label(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 2] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match="palette"):
        load_mask(tmp_path / "c.png")
    mask = load_mask(tmp_path / "c.png", palette=[[0, 0, 0], [255, 0, 0]])
    assert mask[0, 0] == 1 and mask[0, 1] == 0 and mask[1, 2] == 255  # unknown colour -> ignore
    _mask(tmp_path / "z.png", np.array([[0, 1, 150, 255]]))
    assert load_mask(tmp_path / "z.png", reduce_zero_label=True).tolist() == [[255, 0, 149, 255]]


def test_segmentation_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationFolderDataModule(str(tmp_path), num_classes=3, ignore_index=1)
    with pytest.raises(ValueError, match="class_names"):
        SegmentationFolderDataModule(str(tmp_path), num_classes=3, class_names=["a"])
