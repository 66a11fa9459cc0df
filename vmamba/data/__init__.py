"""vmamba.data: Lightning data modules, datasets, albumentations presets and the embedded default data.

``DigitsDataModule`` (scikit-learn's bundled handwritten digits) and ``ShapesDataModule`` (generated shapes
with masks) need no download; ``ImageFolderDataModule`` and ``SegmentationFolderDataModule`` read your own
folders.
"""

from vmamba.data.base import BaseDataModule, split_indices
from vmamba.data.digits import DIGITS_MEAN, DIGITS_STD, DigitsDataModule, DigitsDataset, load_digits_arrays
from vmamba.data.folders import (
    IMG_EXTENSIONS,
    ImageFolderDataModule,
    ImageListDataset,
    SegmentationFolderDataModule,
    SegmentationPairsDataset,
    find_images,
    load_mask,
    load_rgb,
    scan_class_folders,
    scan_segmentation_folder,
)
from vmamba.data.shapes import SHAPES_CLASSES, ShapesDataModule, ShapesDataset, make_shapes_sample
from vmamba.data.transforms import (
    build_transform,
    classification_eval_transform,
    classification_train_transform,
    rand_augment,
    seed_worker,
    segmentation_eval_transform,
    segmentation_train_transform,
)

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMG_EXTENSIONS",
    "SHAPES_CLASSES",
    "BaseDataModule",
    "DigitsDataModule",
    "DigitsDataset",
    "ImageFolderDataModule",
    "ImageListDataset",
    "SegmentationFolderDataModule",
    "SegmentationPairsDataset",
    "ShapesDataModule",
    "ShapesDataset",
    "build_transform",
    "classification_eval_transform",
    "classification_train_transform",
    "find_images",
    "load_digits_arrays",
    "load_mask",
    "load_rgb",
    "make_shapes_sample",
    "rand_augment",
    "scan_class_folders",
    "scan_segmentation_folder",
    "seed_worker",
    "segmentation_eval_transform",
    "segmentation_train_transform",
    "split_indices",
]
