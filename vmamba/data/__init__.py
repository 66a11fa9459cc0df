"""vmamba.data: Lightning data modules, datasets, albumentations presets and the embedded default data.

``DigitsDataModule`` (scikit-learn's bundled handwritten digits) and ``ShapesDataModule`` (generated shapes
with masks) need no download; ``ImageFolderDataModule`` and ``SegmentationFolderDataModule`` read your own
folders. Images are read by :mod:`vmamba.imageio` and evaluated with :mod:`vmamba.preprocess`, as at
inference.

The names below are imported on first use, so that ``python -m vmamba.data.digits`` runs its module once
(no runpy warning) and importing ``vmamba.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "vmamba.data.base": ("BaseDataModule", "split_indices"),
    "vmamba.data.digits": (
        "DIGITS_MEAN",
        "DIGITS_STD",
        "DigitsDataModule",
        "DigitsDataset",
        "load_digits_arrays",
    ),
    "vmamba.data.folders": (
        "ImageFolderDataModule",
        "ImageListDataset",
        "SegmentationFolderDataModule",
        "SegmentationPairsDataset",
        "load_mask",
        "scan_class_folders",
        "scan_segmentation_folder",
    ),
    "vmamba.data.shapes": ("SHAPES_CLASSES", "ShapesDataModule", "ShapesDataset", "make_shapes_sample"),
    "vmamba.data.transforms": (
        "build_transform",
        "classification_eval_transform",
        "classification_train_transform",
        "rand_augment",
        "seed_worker",
        "segmentation_eval_transform",
        "segmentation_train_transform",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'vmamba.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def import_data_modules() -> None:
    """Import every data module, so that the Lightning CLI finds them by short class name."""
    for module in _EXPORTS:
        importlib.import_module(module)
