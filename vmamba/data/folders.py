"""Data modules over folders of image files.

``ImageFolderDataModule`` reads class subfolders (``train_dir/<class>/**/<image>``), the layout of ImageNet
and of ``torchvision.datasets.ImageFolder``. ``SegmentationFolderDataModule`` reads ``<split_dir>/images/**``
and ``<split_dir>/masks/**`` paired by relative path without extension (``images/a/x.jpg`` <->
``masks/a/x.png``); masks are single-channel PNG class indices (``L`` or ``P`` mode), or RGB colours mapped
through ``palette``.

Problems are reported in :meth:`setup`, before training starts: a missing or empty folder, a mask without an
image (or an image without a mask), a mask value ``>= num_classes`` other than ``ignore_index``, an unreadable
image (with its path). ``skip_invalid=True`` drops unreadable files with a warning instead of failing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from vmamba.contract import classification_data_config, segmentation_data_config
from vmamba.data.base import BaseDataModule, split_indices
from vmamba.data.transforms import (
    TransformSpec,
    build_transform,
    classification_train_transform,
    segmentation_train_transform,
)
from vmamba.imageio import IMAGE_EXTENSIONS, ImageReadError, find_images, read_rgb
from vmamba.preprocess import EvalPreprocess

__all__ = [
    "ImageFolderDataModule",
    "ImageListDataset",
    "SegmentationFolderDataModule",
    "SegmentationPairsDataset",
    "load_mask",
    "scan_class_folders",
    "scan_segmentation_folder",
]

_MAX_LISTED = 10


def _listing(paths: Sequence[Any]) -> str:
    """Up to ten items, one per line, and a count of the rest."""
    shown = "\n  ".join(str(p) for p in paths[:_MAX_LISTED])
    more = f"\n  ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def _require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or a ValueError saying which configured folder is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{what} {str(p)!r} does not exist or is not a folder.")
    return p


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden names skipped), as :func:`vmamba.imageio.find_images`
    lists them, joined to ``folder``."""
    return [folder / rel for rel in find_images(folder)]


def load_mask(
    path: str | Path,
    palette: Sequence[Sequence[int]] | None = None,
    reduce_zero_label: bool = False,
    ignore_index: int = 255,
) -> np.ndarray:
    """Decode a mask file to an ``(H, W)`` int64 array of class indices.

    Single-channel masks (``L``, ``P``, ``I``, ``I;16``) are read as indices. RGB masks need ``palette`` (the
    RGB colour of each class; other colours become ``ignore_index``) unless all three channels are equal.
    ``reduce_zero_label`` maps 0 to ``ignore_index`` and shifts the others down by one (ADE20K's convention).
    """
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB") if img.mode in ("RGBA", "LA", "CMYK") else img)
    except Exception as err:
        raise RuntimeError(f"Cannot read mask {str(path)!r}: {err}") from err
    if arr.ndim == 3:
        if palette is not None:
            colours = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
            codes = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
            keys = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
            out = np.full(codes.shape, ignore_index, dtype=np.int64)
            for cls, key in enumerate(keys):
                out[codes == key] = cls
            return out
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise ValueError(
                f"Mask {str(path)!r} is a colour image; save masks as single-channel PNG class indices, "
                "or give "
                "`palette:` (one RGB triple per class) to map colours to classes."
            )
        arr = arr[..., 0]
    mask = arr.astype(np.int64)
    if reduce_zero_label:
        ignored = mask == ignore_index
        mask = mask - 1
        mask[(mask == -1) | ignored] = ignore_index
    return mask


def _sample_id(path: Path, root: Path | None) -> str:
    """The name of a predicted file in the results: its POSIX path relative to ``root`` (else the full path)."""
    return path.relative_to(root).as_posix() if root is not None else str(path)


def _check_readable(paths: list[Path], skip_invalid: bool) -> list[Path]:
    """Decode every image; return the readable ones, or raise listing the unreadable ones."""
    bad = []
    for p in paths:
        try:
            read_rgb(p)
        except ImageReadError as err:
            bad.append((p, err))
    if not bad:
        return paths
    listing = _listing([f"{p}: {type(e).__name__}: {e}" for p, e in bad])
    if skip_invalid:
        warnings.warn(f"Skipping {len(bad)} unreadable image(s):{listing}", stacklevel=3)
        dropped = {p for p, _ in bad}
        return [p for p in paths if p not in dropped]
    raise ValueError(
        f"{len(bad)} image(s) cannot be read:{listing}\n"
        "Fix or delete them, or set `skip_invalid: true` to skip them."
    )


def scan_class_folders(
    root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted subfolder names) and ``(path, class_index)`` samples of an image-folder tree.

    With ``classes`` given (e.g. the training classes when scanning a validation folder) every subfolder must
    be one of them. Raises ValueError for a missing folder, no class subfolders, or an empty class.
    """
    root = _require_dir(root, "Image folder")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        loose = _image_files(root)
        hint = (
            f" (it holds {len(loose)} loose image(s): put them in one subfolder per class)" if loose else ""
        )
        raise ValueError(f"Image folder {str(root)!r} has no class subfolders{hint}.")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{str(root)!r} has class folders not in the training classes: {unknown}.")
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    empty = []
    for name in found:
        files = _image_files(root / name)
        if not files:
            empty.append(name)
        samples += [(f, index[name]) for f in files]
    if empty:
        raise ValueError(
            f"Class folder(s) without images in {str(root)!r}: {empty} "
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})."
        )
    return list(classes), samples


def scan_segmentation_folder(
    folder: str | Path, image_dirname: str = "images", mask_dirname: str = "masks", require_masks: bool = True
) -> list[tuple[Path, Path | None]]:
    """``(image, mask)`` pairs of ``folder/images`` and ``folder/masks``, matched by relative path without
    extension.

    Raises ValueError for a missing/empty folder, a mask without an image, or (with ``require_masks``) an
    image without a mask. With ``require_masks=False`` (prediction) masks are optional and the pairs hold
    ``None``.
    """
    folder = _require_dir(folder, "Segmentation folder")
    image_dir = _require_dir(folder / image_dirname, "Image folder")
    images = {p.relative_to(image_dir).with_suffix(""): p for p in _image_files(image_dir)}
    if not images:
        raise ValueError(f"No images in {str(image_dir)!r} (extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    mask_dir = folder / mask_dirname
    if not mask_dir.is_dir():
        if require_masks:
            raise ValueError(f"Mask folder {str(mask_dir)!r} does not exist.")
        return [(p, None) for p in images.values()]
    masks = {p.relative_to(mask_dir).with_suffix(""): p for p in _image_files(mask_dir)}
    orphans = sorted(str(masks[k]) for k in masks.keys() - images.keys())
    if orphans:
        raise ValueError(
            f"{len(orphans)} mask(s) without a matching image in {str(image_dir)!r}:{_listing(orphans)}"
        )
    missing = sorted(str(images[k]) for k in images.keys() - masks.keys())
    if missing and require_masks:
        raise ValueError(f"{len(missing)} image(s) without a mask in {str(mask_dir)!r}:{_listing(missing)}")
    return [(images[k], masks.get(k)) for k in sorted(images)]


class ImageListDataset(Dataset):
    """Classification samples from ``(path, label)`` pairs (``label`` -1 and ``predict=True`` for unlabelled).

    Args:
        samples: ``(path, label)`` pairs.
        transform: albumentations pipeline applied to the ``(H, W, 3)`` uint8 image.
        predict: return ``{"image", "id"}`` instead of ``{"image", "label"}``; the id is the path relative
            to ``root`` (POSIX), or the full path without ``root``.
        skip_invalid: if an image cannot be read at load time, warn and return the next readable sample
            instead of raising.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: A.BaseCompose,
        predict: bool = False,
        skip_invalid: bool = False,
        root: Path | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.predict = predict
        self.skip_invalid = skip_invalid
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = read_rgb(path)
            except ImageReadError as err:
                if not self.skip_invalid:
                    raise
                warnings.warn(f"{err}; using the next sample instead.", stacklevel=2)
                continue
            tensor = self.transform(image=image)["image"]
            if self.predict:
                return {"image": tensor, "id": _sample_id(path, self.root)}
            return {"image": tensor, "label": torch.tensor(label, dtype=torch.long)}
        raise RuntimeError("No readable image in the dataset.")


class SegmentationPairsDataset(Dataset):
    """Segmentation samples from ``(image_path, mask_path)`` pairs.

    Args:
        pairs: ``(image, mask)`` paths (``mask`` may be ``None`` with ``predict=True``).
        transform: albumentations pipeline applied to image and mask together.
        palette, reduce_zero_label, ignore_index: how masks are decoded, see :func:`load_mask`.
        predict: return ``{"image", "id"}`` instead of ``{"image", "mask"}`` (id as in
            :class:`ImageListDataset`, relative to ``root``).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        transform: A.BaseCompose,
        palette: Sequence[Sequence[int]] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        predict: bool = False,
        root: Path | None = None,
    ) -> None:
        self.root = root
        self.pairs = list(pairs)
        self.transform = transform
        self.palette = palette
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.predict = predict

    def __len__(self) -> int:
        return len(self.pairs)

    def _mask(self, path: Path) -> np.ndarray:
        return load_mask(path, self.palette, self.reduce_zero_label, self.ignore_index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.pairs[index]
        image = read_rgb(image_path)
        if self.predict:
            return {"image": self.transform(image=image)["image"], "id": _sample_id(image_path, self.root)}
        mask = self._mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise RuntimeError(
                f"Mask {str(mask_path)!r} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]} (width x height); they must match."
            )
        # uint8 keeps the resize/pad ops of albumentations happy; every valid index and 255 fit.
        out = self.transform(
            image=image, mask=mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.int32)
        )
        return {"image": out["image"], "mask": torch.as_tensor(out["mask"]).long()}


class ImageFolderDataModule(BaseDataModule):
    """Image classification from class subfolders: ``train_dir/<class>/*.jpg``.

    Validation comes from ``val_dir`` (same class folder names) or, without it, from a stratified
    ``val_fraction`` of ``train_dir``. ``test_dir`` is labelled like ``val_dir``; ``predict_dir`` is any
    folder of images (scanned recursively, no labels).

    Args:
        train_dir: folder of class subfolders (their sorted names are the classes).
        val_dir: validation folder; ``None`` splits ``train_dir``.
        val_fraction: fraction of every class held out when ``val_dir`` is ``None``.
        split_seed: seed of that split.
        test_dir: optional labelled test folder.
        predict_dir: optional folder of images to predict.
        img_size: network input size.
        crop_pct: evaluation centre-crop fraction (timm's; resize the short side to ``img_size / crop_pct``).
        interpolation: ``"bicubic"`` (timm's ViT/DeiT/Swin default), ``"bilinear"``, ...
        mean, std: input normalisation (0-1 scale); ImageNet statistics by default, as the pretrained models
            use.
        crop_scale: area range of the training ``RandomResizedCrop``.
        hflip: probability of a horizontal flip in training.
        color_jitter: optional colour-jitter strength in training.
        rand_augment_magnitude: RandAugment-style policy strength (2 ops; 9 in the ImageNet recipes), ``None``
            to skip.
        re_prob: random-erasing probability (0.25 in the ImageNet recipes).
        train_transform, val_transform: albumentations pipelines replacing the presets.
        verify_images: decode every image in :meth:`setup` to report unreadable files before training (costly
            for ImageNet-sized folders; unreadable files then fail, or are skipped, when loaded).
        skip_invalid: drop unreadable images with a warning instead of raising.
        batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers: see :class:`BaseDataModule`.
    """

    task = "classification"

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        img_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: float | None = None,
        rand_augment_magnitude: float | None = None,
        re_prob: float = 0.0,
        train_transform: TransformSpec | None = None,
        val_transform: TransformSpec | None = None,
        verify_images: bool = True,
        skip_invalid: bool = False,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers)
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.test_dir = test_dir
        self.predict_dir = predict_dir
        self.img_size = img_size
        self.crop_pct = crop_pct
        self.interpolation = interpolation
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.verify_images = verify_images
        self.skip_invalid = skip_invalid
        self.train_transform = build_transform(
            train_transform,
            classification_train_transform(
                img_size,
                crop_scale,
                hflip=hflip,
                color_jitter=color_jitter,
                rand_augment_magnitude=rand_augment_magnitude,
                re_prob=re_prob,
                interpolation=interpolation,
                mean=mean,
                std=std,
            ),
        )
        self.val_transform = build_transform(val_transform, EvalPreprocess(self.data_config))
        self._classes: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """Sorted class subfolder names of ``train_dir`` (scanned on first use)."""
        if self._classes is None:
            root = _require_dir(self.train_dir, "train_dir")
            self._classes = sorted(
                d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
            )
            if not self._classes:
                raise ValueError(
                    f"train_dir {str(root)!r} has no class subfolders (one folder per class expected)."
                )
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def data_config(self) -> dict[str, Any]:
        return classification_data_config(
            self.img_size, self.mean, self.std, self.interpolation, self.crop_pct, crop_mode="center"
        )

    def _labelled(self, folder: str) -> list[tuple[Path, int]]:
        """Scanned (and optionally verified) samples of a labelled folder using the training classes."""
        _, samples = scan_class_folders(folder, self.class_names)
        return self._verified(samples)

    def _verified(self, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        if not self.verify_images:
            return samples
        keep = set(_check_readable([p for p, _ in samples], self.skip_invalid))
        return [(p, y) for p, y in samples if p in keep]

    def setup(self, stage: str | None = None) -> None:
        """Scan (and verify) the folders the stage needs; raises ValueError on bad data."""
        ds = {"skip_invalid": self.skip_invalid}
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            train = self._labelled(self.train_dir)
            if self.val_dir is not None:
                val = self._labelled(self.val_dir)
            else:
                labels = np.array([y for _, y in train])
                train_idx, val_idx = split_indices(labels, self.val_fraction, self.split_seed)
                train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
                if not val:
                    raise ValueError(
                        "No validation images: set val_dir, or a val_fraction > 0 with >= 2 images per class."
                    )
            self.train_dataset = ImageListDataset(train, self.train_transform, **ds)
            self.val_dataset = ImageListDataset(val, self.val_transform, **ds)
        if stage in (None, "test") and self.test_dir is not None and self.test_dataset is None:
            self.test_dataset = ImageListDataset(self._labelled(self.test_dir), self.val_transform, **ds)
        if stage in (None, "predict") and self.predict_dir is not None and self.predict_dataset is None:
            root = _require_dir(self.predict_dir, "predict_dir")
            files = _image_files(root)
            if not files:
                raise ValueError(f"predict_dir {str(root)!r} contains no images.")
            samples = self._verified([(p, -1) for p in files])
            self.predict_dataset = ImageListDataset(
                samples, self.val_transform, predict=True, root=root, **ds
            )


class SegmentationFolderDataModule(BaseDataModule):
    """Semantic segmentation from ``<dir>/images`` and ``<dir>/masks`` folders (matching file stems).

    Validation comes from ``val_dir`` or a ``val_fraction`` of ``train_dir``. Masks hold class indices
    ``0..num_classes-1`` and ``ignore_index``; see :func:`load_mask` for colour masks and ADE20K's
    ``reduce_zero_label``.

    Args:
        train_dir: folder with ``images/`` and ``masks/``.
        num_classes: number of classes (mask values must be below it, or equal ``ignore_index``).
        val_dir: validation folder of the same layout; ``None`` splits ``train_dir``.
        val_fraction: fraction held out when ``val_dir`` is ``None``.
        split_seed: seed of that split.
        test_dir: optional folder of the same layout.
        predict_dir: optional folder of images (``predict_dir/images`` if it exists, else ``predict_dir``).
        class_names: names in index order (default ``None``).
        palette: RGB colour per class, to decode colour masks (and to colour predictions).
        ignore_index: mask value excluded from loss and metrics.
        reduce_zero_label: treat 0 as ignore and shift the other labels down (ADE20K).
        image_dirname, mask_dirname: the two subfolder names.
        crop_size: training crop side.
        base_size: resize the short side to this before the scale jitter (and in evaluation); ``None`` keeps
            the original size.
        scale_range: random rescale range in training.
        hflip: probability of a horizontal flip in training.
        color_jitter: optional colour-jitter strength in training.
        mean, std: input normalisation (0-1 scale).
        train_transform, val_transform: albumentations pipelines replacing the presets.
        verify: read every mask (and decode every image) in :meth:`setup` to report bad data before training.
        skip_invalid: drop unreadable image/mask pairs with a warning instead of raising.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size; 1 by default because evaluation images may differ in size.
        num_workers, pin_memory, persistent_workers: see :class:`BaseDataModule`.
    """

    task = "segmentation"

    def __init__(
        self,
        train_dir: str,
        num_classes: int,
        val_dir: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        class_names: list[str] | None = None,
        palette: list[list[int]] | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        image_dirname: str = "images",
        mask_dirname: str = "masks",
        crop_size: int = 512,
        base_size: int | None = None,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        train_transform: TransformSpec | None = None,
        val_transform: TransformSpec | None = None,
        verify: bool = True,
        skip_invalid: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes is {num_classes}.")
        if palette is not None and len(palette) != num_classes:
            raise ValueError(f"palette has {len(palette)} colours but num_classes is {num_classes}.")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} is a valid class index (num_classes={num_classes})."
            )
        self.train_dir = train_dir
        self._num_classes = num_classes
        self.val_dir = val_dir
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.test_dir = test_dir
        self.predict_dir = predict_dir
        self._class_names = class_names
        self.palette = palette
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.image_dirname = image_dirname
        self.mask_dirname = mask_dirname
        self.crop_size = crop_size
        self.base_size = base_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.verify = verify
        self.skip_invalid = skip_invalid
        self.train_transform = build_transform(
            train_transform,
            segmentation_train_transform(
                crop_size, base_size, scale_range, hflip, color_jitter, ignore_index, mean, std
            ),
        )
        self.val_transform = build_transform(val_transform, EvalPreprocess(self.data_config))

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self._class_names

    @property
    def data_config(self) -> dict[str, Any]:
        return segmentation_data_config(
            self.crop_size, self.mean, self.std, self.base_size, self.ignore_index, self.palette
        )

    def _pairs(self, folder: str) -> list[tuple[Path, Path | None]]:
        """Scanned and (optionally) verified pairs of a labelled folder."""
        pairs = scan_segmentation_folder(folder, self.image_dirname, self.mask_dirname)
        return self._check_pairs(pairs) if self.verify else pairs

    def _check_pairs(self, pairs: list[tuple[Path, Path | None]]) -> list[tuple[Path, Path | None]]:
        """Read every mask and image header: bad label values and size mismatches raise, unreadable files
        raise or (``skip_invalid``) are dropped with a warning."""
        unreadable: list[str] = []
        bad_values: list[str] = []
        bad_sizes: list[str] = []
        keep = []
        for image_path, mask_path in pairs:
            try:
                height, width = read_rgb(image_path).shape[:2]
                size = (width, height)
                mask = load_mask(mask_path, self.palette, self.reduce_zero_label, self.ignore_index)
            except (ImageReadError, RuntimeError, OSError, SyntaxError) as err:
                unreadable.append(f"{image_path}: {err}")
                continue
            if mask.shape != (size[1], size[0]):
                bad_sizes.append(
                    f"{mask_path}: mask {mask.shape[1]}x{mask.shape[0]}, image {size[0]}x{size[1]}"
                )
            values = np.unique(mask)
            wrong = values[((values < 0) | (values >= self._num_classes)) & (values != self.ignore_index)]
            if len(wrong):
                bad_values.append(f"{mask_path}: values {wrong.tolist()[:8]}")
            keep.append((image_path, mask_path))
        if bad_values:
            raise ValueError(
                f"{len(bad_values)} mask(s) hold class values >= num_classes={self._num_classes} (and not "
                f"ignore_index={self.ignore_index}):{_listing(bad_values)}\nCheck num_classes, ignore_index, "
                "reduce_zero_label (ADE20K needs true) and palette."
            )
        if bad_sizes:
            raise ValueError(
                f"{len(bad_sizes)} mask(s) differ in size from their image:{_listing(bad_sizes)}"
            )
        if unreadable:
            if not self.skip_invalid:
                raise ValueError(
                    f"{len(unreadable)} image/mask pair(s) cannot be read:{_listing(unreadable)}\n"
                    "Fix or delete them, or set `skip_invalid: true` to skip them."
                )
            warnings.warn(
                f"Skipping {len(unreadable)} unreadable pair(s):{_listing(unreadable)}", stacklevel=3
            )
        return keep

    def _dataset(
        self,
        pairs: list[tuple[Path, Path | None]],
        transform: Any,
        predict: bool = False,
        root: Path | None = None,
    ) -> SegmentationPairsDataset:
        return SegmentationPairsDataset(
            pairs,
            transform,
            self.palette,
            self.reduce_zero_label,
            self.ignore_index,
            predict=predict,
            root=root,
        )

    def setup(self, stage: str | None = None) -> None:
        """Scan (and verify) the folders the stage needs; raises ValueError on bad data."""
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            train = self._pairs(self.train_dir)
            if self.val_dir is not None:
                val = self._pairs(self.val_dir)
            else:
                rng = np.random.default_rng(self.split_seed)
                order = rng.permutation(len(train))
                n_val = int(round(len(train) * self.val_fraction))
                if n_val < 1 or n_val >= len(train):
                    raise ValueError(
                        f"val_fraction={self.val_fraction} of {len(train)} pairs leaves an empty split; "
                        "set val_dir."
                    )
                val = [train[i] for i in sorted(order[:n_val])]
                train = [train[i] for i in sorted(order[n_val:])]
            self.train_dataset = self._dataset(train, self.train_transform)
            self.val_dataset = self._dataset(val, self.val_transform)
        if stage in (None, "test") and self.test_dir is not None and self.test_dataset is None:
            self.test_dataset = self._dataset(self._pairs(self.test_dir), self.val_transform)
        if stage in (None, "predict") and self.predict_dir is not None and self.predict_dataset is None:
            root = _require_dir(self.predict_dir, "predict_dir")
            folder = root / self.image_dirname if (root / self.image_dirname).is_dir() else root
            files = _image_files(folder)
            if not files:
                raise ValueError(f"predict_dir {str(folder)!r} contains no images.")
            if self.verify:
                files = _check_readable(files, self.skip_invalid)
            self.predict_dataset = self._dataset(
                [(p, None) for p in files], self.val_transform, predict=True, root=folder
            )
