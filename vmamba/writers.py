"""The one prediction writer: result tables (CSV/JSON), segmentation masks and overlays, clash-free names.

Used by ``vmamba-predict`` and by the Lightning :class:`vmamba.tasks.PredictionWriter` (``train.py
predict``), so both write the same schema (docs/inference.md):

* classification, one row per image keyed by ``filename`` (the input's relative path, or the dataset
  index for embedded datasets): top-1 ``filename,label,prob``; top-k ``filename,label_0..label_{k-1},
  prob_0..prob_{k-1}``; with ``include_index`` the ``index``/``index_i`` columns come first. Probabilities
  are rounded to 6 decimals. JSON holds ``{filename: {"label": ..., "prob": ...}}`` (lists for top-k).
* segmentation: ``masks/<relative path>.png`` (single-channel class indices, uint8, uint16 beyond 256
  classes) and ``overlays/<relative path>.jpg``; names from :class:`OutputNamer` never clash.

All files are written atomically (:func:`vmamba.imageio.atomic_write`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from vmamba.imageio import atomic_write

__all__ = [
    "MASKS_DIR",
    "OVERLAYS_DIR",
    "RESULT_FORMATS",
    "OutputNamer",
    "inside",
    "read_results",
    "result_columns",
    "result_record",
    "save_mask",
    "save_overlay",
    "segmentation_palette",
    "write_errors",
    "write_results",
]

RESULT_FORMATS = ("csv", "json")
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
_DECIMALS = 6


class OutputNamer:
    """Clash-free output names: ``a/x.jpg`` -> ``a/x.png``; when that name is taken (``a/x.png`` came
    first), the full name is kept (``a/x.jpg.png``), then ``-1``, ``-2``... before the suffix.

    Names depend only on the order of the calls, so the same inputs in the same order get the same names
    (``vmamba-predict --resume`` relies on it).
    """

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.taken: set[PurePosixPath] = set()

    def __call__(self, rel: PurePosixPath | str) -> PurePosixPath:
        rel = PurePosixPath(rel)
        stem = rel.name.rsplit(".", 1)[0] if "." in rel.name[1:] else rel.name
        candidates = [rel.with_name(stem + self.suffix), rel.with_name(rel.name + self.suffix)]
        for candidate in candidates:
            if candidate not in self.taken:
                break
        else:
            n, base = 0, candidates[1]
            while candidate in self.taken:
                n += 1
                candidate = base.with_name(f"{base.name[: -len(self.suffix)]}-{n}{self.suffix}")
        self.taken.add(candidate)
        return candidate


def inside(root: Path, rel: PurePosixPath) -> Path:
    """``root / rel``, refusing any path that would land outside ``root`` (``..``, absolute, symlinks)."""
    target = root / Path(*rel.parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"output path {str(rel)!r} would leave the results folder {str(root)!r}")
    return target


def result_columns(topk: int, include_index: bool = False) -> list[str]:
    """Table header: ``filename``, then ``[index,] label, prob`` for top-1 or ``name_i`` columns for top-k."""
    names = (["index"] if include_index else []) + ["label", "prob"]
    if topk == 1:
        return ["filename", *names]
    return ["filename"] + [f"{name}_{i}" for name in names for i in range(topk)]


def result_record(
    indices: Sequence[int], probs: Sequence[float], labels: Sequence[Any], include_index: bool, flat: bool
) -> dict[str, Any]:
    """One result row: flat ``label_i`` columns (CSV) or lists (JSON); scalars when top-1."""
    values: dict[str, list[Any]] = {"index": list(indices)} if include_index else {}
    values["label"] = list(labels)
    values["prob"] = [round(float(p), _DECIMALS) for p in probs]
    if len(values["label"]) == 1:
        return {name: value[0] for name, value in values.items()}
    if flat:
        return {f"{name}_{i}": v for name, value in values.items() for i, v in enumerate(value)}
    return values


def _json_columns(record: Any) -> list[str]:
    """The CSV-style columns a JSON record corresponds to (``label`` or ``label_0..``), to compare layouts."""
    if not isinstance(record, dict):
        return []
    names = [name for name in ("index", "label", "prob") if name in record]
    values = [record[name] for name in names]
    if values and all(isinstance(v, list) for v in values) and len(values[0]) != 1:
        return [f"{name}_{i}" for name, value in zip(names, values) for i in range(len(value))]
    return names


def read_results(path: Path, fmt: str) -> tuple[dict[str, dict[str, Any]], list[str] | None]:
    """Rows of an earlier results file keyed by filename, and its header (``None`` if no file or no rows)."""
    if not path.is_file():
        return {}, None
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    if fmt == "json":
        data = json.loads(text) if text.strip() else {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object keyed by filename")
        header = ["filename"] + _json_columns(next(iter(data.values()))) if data else None
        return data, header
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = {row["filename"]: {k: v for k, v in row.items() if k != "filename"} for row in reader}
    return rows, list(reader.fieldnames or []) or None


def write_results(path: Path, fmt: str, rows: dict[str, dict[str, Any]], header: list[str]) -> None:
    """Write all rows sorted by filename, atomically: CSV with ``header``, or JSON keyed by filename (one
    image per line)."""
    if fmt not in RESULT_FORMATS:
        raise ValueError(f"unknown results format {fmt!r}; use one of {RESULT_FORMATS}")
    ordered = sorted(rows)
    with atomic_write(path, "w", errors="surrogateescape", newline="") as handle:
        if fmt == "json":
            lines = [
                f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(rows[key], ensure_ascii=False)}"
                for key in ordered
            ]
            handle.write("{\n" + ",\n".join(lines) + ("\n}\n" if lines else "}\n"))
        else:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            for key in ordered:
                writer.writerow([key] + [rows[key].get(column, "") for column in header[1:]])


def write_errors(path: Path, errors: dict[str, str]) -> None:
    """Write ``filename,error`` rows (sorted) atomically; an empty file with the header when all went well."""
    with atomic_write(path, "w", errors="surrogateescape", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["filename", "error"])
        for key in sorted(errors):
            writer.writerow([key, errors[key]])


def segmentation_palette(num_classes: int) -> np.ndarray:
    """A fixed ``(num_classes, 3)`` uint8 colour table (Pascal VOC's bit-spreading scheme; class 0 is black)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, colour = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[index] = colour
    return palette


def save_mask(path: Path, mask: np.ndarray, num_classes: int) -> None:
    """Write class indices as a single-channel PNG (uint8 up to 256 classes, else uint16), atomically."""
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    with atomic_write(path, "wb") as handle:
        Image.fromarray(np.asarray(mask).astype(dtype)).save(handle, format="PNG")


def save_overlay(path: Path, image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float) -> None:
    """Blend the class colours over the ``(H, W, 3)`` uint8 image and write it as JPEG, atomically."""
    colours = palette[mask.astype(np.int64) % len(palette)]
    blended = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round()
    with atomic_write(path, "wb") as handle:
        Image.fromarray(blended.astype(np.uint8)).save(handle, format="JPEG", quality=90)
