"""The one image reader of vmamba: decoding, input discovery and crash-safe file writing.

Training, validation, ``train.py predict`` and ``vmamba-predict`` all read images through
:func:`load_image` / :func:`read_rgb` and list folders with :func:`find_images` (one list of extensions,
:data:`IMAGE_EXTENSIONS`), so the same file gives the same pixels everywhere. Folders that nobody cleaned
hold JPEGs rotated by their EXIF tag, grayscale scans, PNGs with alpha or a palette, 16-bit microscopy or
depth images, half-downloaded files. Everything here turns such a file into 8-bit RGB (EXIF orientation
applied, alpha dropped, palettes expanded, gray replicated, 16-bit scaled by ``255 / 65535``) or raises
:class:`ImageReadError` with the path and the reason, so that a caller can report the file and go on.

Writes go through :func:`atomic_write`: the bytes land in a temporary file in the destination folder, are
flushed to disk, and only then replace the destination, so a crash never leaves half a CSV or PNG behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "atomic_write",
    "find_images",
    "is_image_file",
    "load_image",
    "read_rgb",
    "read_path_list",
    "safe_relative_path",
    "to_rgb",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)
"""Lower-case file suffixes treated as images when a folder is scanned."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageReadError(ValueError):
    """An image file could not be read or decoded; the message names the file and the reason."""


def is_image_file(path: str | os.PathLike) -> bool:
    """Return True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _scale_to_uint8(array: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map a high-bit-depth array to uint8: divide by ``full_scale / 255`` or, if None, stretch min..max."""
    array = array.astype(np.float64)
    if full_scale is None:
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    else:
        array = array * (255.0 / full_scale)
    return np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any common mode to 8-bit RGB.

    Alpha is dropped (the colour values are kept), palettes are expanded, ``1``/``L``/``LA`` are replicated to
    three channels, CMYK/YCbCr/LAB/HSV are converted by PIL. 16-bit single-channel images (``I;16*``) are scaled
    by ``255 / 65535``. 32-bit integer images (``I``) whose values fit 0..65535 are treated as 16-bit, others
    and float images (``F``) outside 0..1 are min-max stretched; float images inside 0..1 are scaled by 255.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        array = np.asarray(image)
        if mode in _SIXTEEN_BIT_MODES:
            full_scale: float | None = 65535.0
        elif mode == "I":
            full_scale = 65535.0 if array.size and array.min() >= 0 and array.max() <= 65535 else None
        else:
            finite = array[np.isfinite(array)]
            in_unit = finite.size and finite.min() >= 0.0 and finite.max() <= 1.0
            full_scale = 1.0 if in_unit else None
        gray = _scale_to_uint8(array, full_scale)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read ``path`` fully and return it as an 8-bit RGB image in its displayed orientation.

    The EXIF orientation tag is applied (a photo taken in portrait comes back in portrait); an unreadable EXIF
    block is ignored rather than failing the image. Raises :class:`ImageReadError` for a missing, empty,
    truncated, undecodable or oversized file.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
            with contextlib.suppress(Exception):
                image = ImageOps.exif_transpose(opened)
            if image.width == 0 or image.height == 0:
                raise ImageReadError(f"{path}: image has zero size {image.size}")
            return to_rgb(image).copy()
    except ImageReadError:
        raise
    except FileNotFoundError as error:
        raise ImageReadError(f"{path}: file not found") from error
    except UnidentifiedImageError as error:
        raise ImageReadError(f"{path}: not a readable image (unknown or corrupt format)") from error
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path}: image too large ({error})") from error
    except (OSError, SyntaxError, ValueError, TypeError, MemoryError) as error:
        raise ImageReadError(f"{path}: cannot decode image ({type(error).__name__}: {error})") from error


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` as an ``(H, W, 3)`` uint8 RGB array, decoded exactly as :func:`load_image` decodes it.

    The one reader of training, validation and inference images; raises :class:`ImageReadError`.
    """
    return np.asarray(load_image(path))


def find_images(root: str | os.PathLike) -> list[PurePosixPath]:
    """List image files below ``root`` (recursive, symlinked folders not followed) as sorted relative paths.

    Hidden files and folders (names starting with ``.``) are skipped, so temporary files of an interrupted
    run inside the input tree are never picked up.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"input folder {root!r} does not exist or is not a folder")
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                rel = os.path.relpath(os.path.join(folder, name), root)
                found.append(PurePosixPath(Path(rel).as_posix()))
    return sorted(found)


def read_path_list(list_file: str | os.PathLike) -> list[tuple[str, Path]]:
    """Read a text file with one image path per line; return ``(entry as written, resolved path)`` pairs.

    Blank lines and lines starting with ``#`` are ignored, surrounding whitespace is stripped. Relative entries
    are resolved against the folder that holds the list file. Duplicates keep their first occurrence.
    """
    list_file = Path(list_file)
    try:
        text = list_file.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as error:
        raise ValueError(f"cannot read path list {str(list_file)!r}: {error}") from error
    base = list_file.parent
    entries: dict[str, Path] = {}
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry not in entries:
            entries[entry] = Path(entry) if os.path.isabs(entry) else base / entry
    return list(entries.items())


def safe_relative_path(name: str) -> PurePosixPath:
    """Turn an input name (possibly absolute or with ``..``) into a relative path that stays inside a folder.

    Drive/root anchors are dropped, ``.`` components removed and ``..`` components replaced by ``__``, so
    ``/data/a.jpg`` becomes ``data/a.jpg`` and ``../b/c.png`` becomes ``__/b/c.png``.
    """
    parts = []
    for part in Path(name).parts:
        if part in ("", ".") or part == Path(name).anchor:
            continue
        parts.append("__" if part == ".." else part)
    if not parts:
        raise ValueError(f"input name {name!r} does not contain a file name")
    return PurePosixPath(*parts)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", **open_kwargs
) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success fsync it and ``os.replace`` it to ``path``.

    If the block raises, the temporary file is removed and ``path`` is left untouched. Parent folders are
    created. ``mode`` is ``"w"`` (text, with ``encoding`` and ``open_kwargs`` such as ``newline``) or
    ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode == "wb":
            handle = os.fdopen(fd, mode)
        else:
            handle = os.fdopen(fd, mode, encoding=encoding, **open_kwargs)
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
