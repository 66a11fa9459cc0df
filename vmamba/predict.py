"""Run a trained classification or segmentation model over a folder of images (``vmamba-predict``).

The command line follows timm's ``inference.py`` (same flag names where they apply) and adds what a folder
of real-world files needs: segmentation masks at the original image size with sliding windows, resumable
runs, per-file error reporting and crash-safe outputs::

    vmamba-predict IMAGES --checkpoint run/best.ckpt --results-dir out          # task from the checkpoint
    vmamba-predict IMAGES -m resnet18 --checkpoint weights.safetensors --topk 5
    vmamba-predict IMAGES -m local-dir:exported_model --results-format json
    vmamba-predict list.txt --checkpoint seg.ckpt --overlay --slide-window 512 --slide-stride 341 --resume

This module holds input discovery, the run loops and the command line; the model comes from
:mod:`vmamba.loading`, images from :mod:`vmamba.imageio`, the preprocessing from :mod:`vmamba.preprocess`
(the one validation used) and the outputs from :mod:`vmamba.writers` (the schema of ``train.py predict``).
``vmamba-predict export ...`` runs ``vmamba-export``. See ``docs/inference.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vmamba.contract import as_hw
from vmamba.imageio import ImageReadError, find_images, read_path_list, read_rgb, safe_relative_path
from vmamba.loading import LoadedModel, add_model_arguments, load_model_from_args
from vmamba.preprocess import EvalPreprocess
from vmamba.writers import (
    MASKS_DIR,
    OVERLAYS_DIR,
    RESULT_FORMATS,
    OutputNamer,
    inside,
    read_results,
    result_columns,
    result_record,
    save_mask,
    save_overlay,
    segmentation_palette,
    write_errors,
    write_results,
)

__all__ = ["InputItem", "build_parser", "collect_inputs", "main", "run"]

LABEL_TYPES = ("name", "description", "index")
_DEFAULT_ERRORS_FILE = "errors.csv"


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """One image to predict.

    ``key`` names it in the results (relative POSIX path for a folder, the entry as written for a list);
    ``path`` is where it is read from; ``out_rel`` is a relative path, safe to join under the results folder,
    from which per-image output names are derived.
    """

    key: str
    path: Path
    out_rel: PurePosixPath


def collect_inputs(data: str | os.PathLike) -> list[InputItem]:
    """The images named by ``data``: a folder (scanned recursively) or a text file with one path per line.

    Items come back sorted by key, so every run sees the same order.
    """
    data = Path(data)
    if data.is_dir():
        items = [InputItem(str(rel), data / rel, rel) for rel in find_images(data)]
    elif data.is_file():
        items = [InputItem(entry, path, safe_relative_path(entry)) for entry, path in read_path_list(data)]
    else:
        raise ValueError(f"input {str(data)!r} is neither a folder nor a text file listing image paths")
    return sorted(items, key=lambda item: item.key)


class _ImageDataset(Dataset):
    """Reads and preprocesses the images of ``items``; a failure becomes an error string, never an exception."""

    def __init__(
        self, items: Sequence[InputItem], preprocess: EvalPreprocess, keep_image: bool = False
    ) -> None:
        self.items = list(items)
        self.preprocess = preprocess
        self.keep_image = keep_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, np.ndarray | None, str | None]:
        try:
            image = read_rgb(self.items[index].path)
            tensor = self.preprocess(image=image)["image"]
        except ImageReadError as error:
            return index, None, None, str(error)
        except Exception as error:
            message = f"{self.items[index].path}: cannot prepare image ({type(error).__name__}: {error})"
            return index, None, None, message
        return index, tensor, (image if self.keep_image else None), None


def _collate(batch: list[tuple]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the good samples of a classification batch; keep ``(index, error)`` for the bad ones."""
    good = [(index, tensor) for index, tensor, _, error in batch if error is None]
    bad = [(index, error) for index, _, _, error in batch if error is not None]
    stacked = torch.stack([tensor for _, tensor in good]) if good else None
    return [index for index, _ in good], stacked, bad


def _first(batch: list[tuple]) -> tuple:
    """Collate for batch size 1 (segmentation images differ in size): the one sample as it is."""
    return batch[0]


def _loader(dataset: Dataset, batch_size: int, workers: int, collate: Any, pin: bool) -> DataLoader:
    """An in-order DataLoader over ``dataset``."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate, pin_memory=pin
    )


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _RunStats:
    """What a run did, for the summary line and the exit code."""

    total: int = 0
    done: int = 0
    resumed: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def summary(self) -> str:
        """``Processed N images, skipped M (K failed, J already done) in S s (R images/s).``"""
        seconds = time.perf_counter() - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        skipped = len(self.errors) + self.resumed
        return (
            f"Processed {self.done} images, skipped {skipped} ({len(self.errors)} failed, "
            f"{self.resumed} already done) in {seconds:.1f} s ({rate:.2f} images/s)."
        )


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, dynamic_ncols=True)


def _report_error(bar: Any, stats: _RunStats, key: str, message: str) -> None:
    """Record a skipped image and print why, without breaking the progress bar."""
    stats.errors[key] = message
    bar.write(f"skipped {key}: {message}", file=sys.stderr)


def _autocast(device: torch.device, enabled: bool, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``--amp``: float16/bfloat16 autocast on the model's device, or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


class _LabelNamer:
    """Turns class indices into the labels written to the results, following ``--label-type``."""

    def __init__(self, loaded: LoadedModel, label_type: str) -> None:
        self.label_type = label_type
        self.names = loaded.class_names
        self.imagenet = None
        if self.names is None and loaded.imagenet_labels and label_type != "index":
            from timm.data import ImageNetInfo, infer_imagenet_subset

            subset = infer_imagenet_subset(loaded.model)
            self.imagenet = ImageNetInfo(subset) if subset else None

    def __call__(self, index: int) -> str | int:
        if self.label_type == "index":
            return index
        if self.names is not None:
            return self.names[index]
        if self.imagenet is not None:
            if self.label_type == "description":
                return self.imagenet.index_to_description(index)
            return self.imagenet.index_to_label_name(index)
        return index


def _classification_results_path(args: argparse.Namespace, loaded: LoadedModel) -> Path:
    """``--results-dir``/``--results-file`` (default ``{model}-{img_size}``) with the format's extension."""
    size = loaded.data_config["input_size"][-1]
    name = args.results_file or f"{loaded.name}-{size}"
    stem, ext = os.path.splitext(name)
    if ext.lower() in (".csv", ".json"):
        name = stem
    path = Path(f"{name}.{args.results_format}")
    return path if path.is_absolute() else Path(args.results_dir) / path


def _run_classification(
    args: argparse.Namespace,
    loaded: LoadedModel,
    items: list[InputItem],
    device: torch.device,
    stats: _RunStats,
) -> list[Path]:
    """Predict top-k labels for ``items`` and write the results file; returns ``[results file]``."""
    fmt = args.results_format
    topk = min(args.topk, loaded.num_classes)
    header = result_columns(topk, args.include_index)
    results_path = _classification_results_path(args, loaded)
    rows: dict[str, dict[str, Any]] = {}
    if args.resume:
        rows, old_header = read_results(results_path, fmt)
        if old_header is not None and old_header != header:
            raise ValueError(
                f"{results_path} has columns {old_header}, this run would write {header}; use the same --topk "
                "and --include-index as before, or another --results-file"
            )
    todo = [item for item in items if item.key not in rows]
    stats.resumed = len(items) - len(todo)
    namer = _LabelNamer(loaded, args.label_type)
    dataset = _ImageDataset(todo, EvalPreprocess(loaded.data_config))
    loader = _loader(dataset, args.batch_size, args.workers, _collate, device.type == "cuda")
    last_save = time.perf_counter()
    bar = _progress(len(todo), "classify")
    try:
        for indices, batch, bad in loader:
            for index, message in bad:
                _report_error(bar, stats, todo[index].key, message)
            if batch is not None:
                try:
                    with torch.no_grad(), _autocast(device, args.amp, args.amp_dtype):
                        logits = loaded.model(batch.to(device, non_blocking=True))
                    top_probs, top_indices = logits.float().softmax(dim=-1).topk(topk, dim=-1)
                except Exception as error:
                    for index in indices:
                        message = f"inference failed ({type(error).__name__}: {error})"
                        _report_error(bar, stats, todo[index].key, message)
                else:
                    for index, p, i in zip(indices, top_probs.cpu().tolist(), top_indices.cpu().tolist()):
                        labels = [namer(c) for c in i]
                        rows[todo[index].key] = result_record(
                            i, p, labels, args.include_index, flat=fmt == "csv"
                        )
                        stats.done += 1
            bar.update(len(indices) + len(bad))
            if time.perf_counter() - last_save > args.save_interval:
                write_results(results_path, fmt, rows, header)
                last_save = time.perf_counter()
    finally:
        bar.close()
        if rows or not results_path.exists():
            write_results(results_path, fmt, rows, header)
    return [results_path]


def _upsampled_argmax(
    logits: torch.Tensor, size: tuple[int, int], chunk_elems: int = 1 << 26
) -> torch.Tensor:
    """``argmax`` over classes of ``logits`` (1, C, h, w) bilinearly resized to ``size``, in class chunks.

    Resizing all C maps of a large photo at once can need gigabytes; chunks of classes keep a running maximum
    instead and give the same answer.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits[0].argmax(0)
    step = max(1, chunk_elems // (size[0] * size[1]))
    best_value = best_index = None
    for start in range(0, logits.shape[1], step):
        up = F.interpolate(
            logits[:, start : start + step].float(), size=size, mode="bilinear", align_corners=False
        )
        value, index = up[0].max(0)
        index = index + start
        if best_value is None:
            best_value, best_index = value, index
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index, best_index)
    return best_index


def _run_segmentation(
    args: argparse.Namespace,
    loaded: LoadedModel,
    items: list[InputItem],
    device: torch.device,
    stats: _RunStats,
) -> list[Path]:
    """Predict a class-index mask (and optionally an overlay) per item; returns the output folders."""
    from vmamba.seg.inference import predict_sliding, predict_whole

    root = Path(args.results_dir)
    mask_names, overlay_names = OutputNamer(".png"), OutputNamer(".jpg")
    targets = {}
    for item in items:
        masks = inside(root / MASKS_DIR, mask_names(item.out_rel))
        overlay = inside(root / OVERLAYS_DIR, overlay_names(item.out_rel)) if args.overlay else None
        targets[item.key] = (masks, overlay)
    todo = [
        item
        for item in items
        if not (
            args.resume
            and targets[item.key][0].is_file()
            and (not args.overlay or targets[item.key][1].is_file())
        )
    ]
    stats.resumed = len(items) - len(todo)
    window = as_hw(args.slide_window) or as_hw(loaded.slide_window)
    stride = as_hw(args.slide_stride) or as_hw(loaded.slide_stride if not args.slide_window else None)
    if window is not None and stride is None:
        stride = tuple(max(1, side * 2 // 3) for side in window)
    palette = loaded.data_config.get("palette")
    palette = (
        np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        if palette
        else segmentation_palette(loaded.num_classes)
    )
    dataset = _ImageDataset(todo, EvalPreprocess(loaded.data_config), keep_image=True)
    loader = _loader(dataset, 1, args.workers, _first, device.type == "cuda")
    bar = _progress(len(todo), "segment")
    try:
        for index, tensor, image, message in loader:
            item = todo[index]
            if message is not None:
                _report_error(bar, stats, item.key, message)
                bar.update(1)
                continue
            try:
                batch = tensor.unsqueeze(0).to(device, non_blocking=True)
                with torch.no_grad(), _autocast(device, args.amp, args.amp_dtype):
                    if window is not None:
                        logits = predict_sliding(
                            loaded.model, batch, window, stride, num_classes=loaded.num_classes
                        )
                    else:
                        logits = predict_whole(loaded.model, batch)
                mask = _upsampled_argmax(logits.float(), image.shape[:2]).cpu().numpy()
                mask_path, overlay_path = targets[item.key]
                save_mask(mask_path, mask, loaded.num_classes)
                if overlay_path is not None:
                    save_overlay(overlay_path, image, mask, palette, args.overlay_alpha)
            except Exception as error:
                _report_error(bar, stats, item.key, f"inference failed ({type(error).__name__}: {error})")
            else:
                stats.done += 1
            bar.update(1)
    finally:
        bar.close()
    return [root / MASKS_DIR] + ([root / OVERLAYS_DIR] if args.overlay else [])


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``vmamba-predict`` argument parser (timm ``inference.py`` names where they apply)."""
    parser = argparse.ArgumentParser(
        prog="vmamba-predict",
        description="Classify or segment a folder of images with a trained model. "
        "'vmamba-predict export ...' runs vmamba-export (ONNX; see 'vmamba-export --help').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "data", nargs="?", help="image folder (scanned recursively) or a text file of image paths"
    )
    parser.add_argument("--data-dir", help="same as the positional DATA")
    add_model_arguments(parser)
    group = parser.add_argument_group("preprocessing (default: the checkpoint's data_config)")
    group.add_argument("--img-size", type=int, help="classification input size")
    group.add_argument(
        "--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="classification input"
    )
    group.add_argument("--crop-pct", type=float, help="classification centre-crop fraction")
    group.add_argument("--crop-mode", choices=("center", "squash"), help="classification crop mode")
    group.add_argument("--interpolation", help="resize interpolation (bilinear, bicubic, nearest, area)")
    group.add_argument("--mean", type=float, nargs="+", help="normalisation mean (0-1 scale)")
    group.add_argument("--std", type=float, nargs="+", help="normalisation std (0-1 scale)")
    group.add_argument("--base-size", type=int, help="segmentation: resize the short side first (0: never)")
    group.add_argument(
        "--slide-window", "--crop-size", type=int, nargs="+", help="segmentation sliding window H [W]"
    )
    group.add_argument(
        "--slide-stride",
        "--stride",
        type=int,
        nargs="+",
        help="segmentation window step (default 2/3 window)",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("-b", "--batch-size", type=int, default=32, help="classification batch size")
    group.add_argument("-j", "--workers", type=int, default=2, help="data-loading worker processes")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    group.add_argument("--amp", action="store_true", help="mixed-precision inference")
    group.add_argument(
        "--amp-dtype", default="float16", choices=("float16", "bfloat16"), help="autocast dtype"
    )
    group = parser.add_argument_group("output")
    group.add_argument("--results-dir", default=".", help="folder for all outputs")
    group.add_argument("--results-file", help="classification results file name (default {model}-{img_size})")
    group.add_argument("--results-format", default="csv", choices=RESULT_FORMATS, help="results table format")
    group.add_argument("--topk", type=int, default=1, help="classes per image")
    group.add_argument(
        "--label-type", default="name", choices=LABEL_TYPES, help="what the label column holds"
    )
    group.add_argument("--include-index", action="store_true", help="also write class indices")
    group.add_argument(
        "--errors-file", help=f"CSV of skipped files (default RESULTS_DIR/{_DEFAULT_ERRORS_FILE})"
    )
    group.add_argument("--overlay", action="store_true", help="segmentation: also write colour overlays")
    group.add_argument(
        "--overlay-alpha", type=float, default=0.5, help="overlay opacity of the class colours"
    )
    group.add_argument("--resume", action="store_true", help="skip images already in the results")
    group.add_argument(
        "--save-interval", type=float, default=60.0, help="seconds between rewrites of the results"
    )
    return parser


def _apply_overrides(args: argparse.Namespace, data_config: dict[str, Any]) -> dict[str, Any]:
    """``data_config`` with the preprocessing flags given on the command line."""
    cfg = dict(data_config)
    if args.input_size:
        cfg["input_size"] = list(args.input_size)
    elif args.img_size:
        cfg["input_size"] = [cfg["input_size"][0], args.img_size, args.img_size]
    for key in ("crop_pct", "crop_mode", "interpolation", "mean", "std"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.base_size is not None:
        cfg["base_size"] = args.base_size or None
    for key in ("mean", "std"):
        if len(cfg[key]) == 1:
            cfg[key] = list(cfg[key]) * 3
    return cfg


def _resolve_device(name: str | None) -> torch.device:
    """``--device``, or CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible flag values up front with a message that says which flag."""
    if args.topk < 1:
        parser.error("--topk must be >= 1")
    if args.batch_size < 1:
        parser.error("-b/--batch-size must be >= 1")
    if args.workers < 0:
        parser.error("-j/--workers must be >= 0")
    for flag in ("slide_window", "slide_stride"):
        value = getattr(args, flag)
        if value is not None and (len(value) not in (1, 2) or min(value) < 1):
            parser.error(f"--{flag.replace('_', '-')} takes one or two positive ints")
    if not 0.0 <= args.overlay_alpha <= 1.0:
        parser.error("--overlay-alpha must be in [0, 1]")


def run(args: argparse.Namespace) -> int:
    """Carry out one ``vmamba-predict`` run from parsed arguments; returns the process exit code."""
    data = args.data or args.data_dir
    if not data:
        print(
            "vmamba-predict: error: no input given (an image folder or a text file of paths)", file=sys.stderr
        )
        return 2
    try:
        items = collect_inputs(data)
    except ValueError as error:
        print(f"vmamba-predict: error: {error}", file=sys.stderr)
        return 2
    if not items:
        print(f"vmamba-predict: error: no images found in {data}", file=sys.stderr)
        return 1
    loaded = load_model_from_args(args, "vmamba-predict")
    if loaded is None:
        return 2
    loaded.data_config = _apply_overrides(args, loaded.data_config)
    device = _resolve_device(args.device)
    loaded.model.to(device)
    stats = _RunStats(total=len(items))
    errors_path = (
        Path(args.errors_file) if args.errors_file else Path(args.results_dir) / _DEFAULT_ERRORS_FILE
    )
    outputs: list[Path] = [Path(args.results_dir)]
    try:
        if loaded.task == "classification":
            outputs = _run_classification(args, loaded, items, device, stats)
        else:
            outputs = _run_segmentation(args, loaded, items, device, stats)
    except ValueError as error:
        print(f"vmamba-predict: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        write_errors(errors_path, stats.errors)
        print(
            f"\nvmamba-predict: interrupted after {stats.done} new images; results so far are in "
            f"{args.results_dir} (run the same command with --resume to continue)",
            file=sys.stderr,
        )
        return 130
    write_errors(errors_path, stats.errors)
    print(stats.summary())
    listed = ", ".join(str(path) for path in outputs)
    print(f"Results: {listed}" + (f"; skipped files listed in {errors_path}" if stats.errors else ""))
    if stats.done == 0 and stats.resumed == 0:
        print("vmamba-predict: error: no image could be processed", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vmamba-predict`` / ``python -m vmamba.predict``; ``export`` as first word runs
    ``vmamba-export``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        from vmamba.export import main as export_main

        return export_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\nvmamba-predict: interrupted before any result was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
