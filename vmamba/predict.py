"""Run a trained classification or segmentation model over a folder of images (``vmamba-predict``).

The command line follows timm's ``inference.py`` (same flag names where they apply) and adds what a folder
of real-world files needs: segmentation masks at the original image size with sliding windows, resumable
runs, per-file error reporting and crash-safe outputs::

    vmamba-predict IMAGES --checkpoint run/best.ckpt --results-dir out          # task from the checkpoint
    vmamba-predict IMAGES -m resnet18 --checkpoint weights.safetensors --topk 5
    vmamba-predict IMAGES -m local-dir:exported_model --results-format json
    vmamba-predict list.txt --checkpoint seg.ckpt --overlay --crop-size 512 --stride 341 --resume
    vmamba-predict export --checkpoint run/best.ckpt --output model.onnx     # see vmamba.export

The model comes from a Lightning checkpoint of ``vmamba.tasks`` (rebuilt from its hyper-parameters without
importing Lightning), from a timm model name plus a weights file, or from a folder written by
``timm.models.save_for_hf``. Checkpoints load with ``torch.load(weights_only=True)`` or safetensors only.
See ``docs/inference.md`` for the output formats.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import io
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vmamba.imageio import (
    ImageReadError,
    atomic_write,
    find_images,
    load_image,
    read_path_list,
    safe_relative_path,
)

__all__ = [
    "InputItem",
    "LoadedModel",
    "ModelLoadError",
    "build_parser",
    "collect_inputs",
    "load_model",
    "main",
    "segmentation_palette",
]

_logger = logging.getLogger("vmamba.predict")

TASKS = ("cls", "seg")
RESULT_FORMATS = ("csv", "json")
LABEL_TYPES = ("name", "description", "index")
_DEFAULT_ERRORS_FILE = "errors.csv"
_MASKS_DIR = "masks"
_OVERLAYS_DIR = "overlays"
_STATE_DICT_PREFIX = "model."


class ModelLoadError(RuntimeError):
    """The model could not be built or its weights could not be loaded; the message says why."""


# --------------------------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A network ready for inference together with what is needed to feed it and name its outputs.

    ``data_config`` holds timm's keys (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
    ``crop_mode``). For segmentation, ``crop_size``/``stride`` are the sliding window (``None``: whole image)
    and ``base_size`` the short side images are resized to first (``None``: original size). ``grayscale``
    means the model was trained on grayscale images (inputs are converted to luma, then replicated).
    ``palette`` gives overlay colours per class when the checkpoint stores one.
    """

    model: nn.Module
    task: str
    num_classes: int
    class_names: list[str] | None
    data_config: dict[str, Any]
    name: str
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    base_size: int | None = None
    grayscale: bool = False
    palette: list[list[int]] | None = None
    imagenet_labels: bool = field(default=False, repr=False)


def _register_models() -> None:
    """Import vmamba's model families so timm knows their names (``vim_*``, ``vmamba_*``)."""
    import vmamba.models  # noqa: F401


def _torch_load_safe(path: str) -> Any:
    """``torch.load`` with ``weights_only=True`` (``argparse.Namespace`` allowed, as timm does) or safetensors."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_lightning_checkpoint(obj: Any) -> bool:
    """True for a dict shaped like a Lightning checkpoint (``state_dict`` plus ``hyper_parameters``)."""
    return isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "hyper_parameters" in obj


def _detect_task(hparams: dict[str, Any], path: str) -> str:
    """Tell a segmentation checkpoint (``backbone``+``decoder``) from a classification one (``model``)."""
    if "backbone" in hparams and "decoder" in hparams:
        return "seg"
    if "model" in hparams:
        return "cls"
    raise ModelLoadError(
        f"{path}: cannot tell the task from the checkpoint's hyper_parameters (keys: {sorted(hparams)}); "
        "expected 'model' (ClassificationTask) or 'backbone' and 'decoder' (SegmentationTask)"
    )


def _load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` with ``strict=True``; on a mismatch raise :class:`ModelLoadError` naming the keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or wrong_shape:

        def _fmt(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_fmt(unexpected)}")
        if wrong_shape:
            shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape]
            problems.append(f"shape mismatch (checkpoint vs model): {_fmt(shapes)}")
        raise ModelLoadError(
            f"{source}: weights do not fit the model rebuilt from its hyper-parameters; "
            + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def _input_size_from_kwargs(kwargs: dict[str, Any]) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` input size implied by an ``img_size`` model kwarg, if one was given."""
    size = kwargs.get("img_size")
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (int(kwargs.get("in_chans", 3)), int(height), int(width))


def _base_data_config(
    model: nn.Module, model_kwargs: dict[str, Any], saved: dict[str, Any] | None
) -> dict[str, Any]:
    """The model's pretrained cfg, corrected by its ``img_size`` kwarg and overlaid by a saved data config.

    A model built with a fixed ``img_size`` (no ``dynamic_img_size``) only accepts that size, so a saved
    ``input_size`` that contradicts it (timm's default config resolved for a resized model) is overruled.
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.pop("state_dict", None)
    implied = _input_size_from_kwargs(model_kwargs)
    if implied is not None:
        cfg["input_size"] = implied
        cfg.pop("test_input_size", None)
    for key, value in (saved or {}).items():
        if value is not None:
            cfg[key] = tuple(value) if isinstance(value, list) else value
    fixed = implied is not None and not model_kwargs.get("dynamic_img_size", False)
    if fixed and tuple(cfg["input_size"][-2:]) != implied[-2:]:
        _logger.warning(
            "saved input_size %s contradicts the model's img_size %s; using the latter",
            tuple(cfg["input_size"]),
            implied,
        )
        cfg["input_size"] = (cfg["input_size"][0], *implied[-2:])
    return cfg


def _as_size(value: Any) -> tuple[int, int] | None:
    """Normalise an int, a ``(H, W)`` or a ``(C, H, W)`` size to ``(H, W)``; None stays None."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    return value[-2:] if len(value) >= 2 else (value[0], value[0])


def _load_lightning(
    ckpt: dict[str, Any], path: str, task: str | None, num_classes: int | None
) -> LoadedModel:
    """Rebuild the network of a ``vmamba.tasks`` checkpoint from its hyper-parameters and load its weights.

    Only the hyper-parameters are read (``model``/``model_kwargs``/``drop_path_rate`` for classification;
    ``backbone``/``decoder``/``backbone_kwargs``/``decoder_kwargs``/``slide_window``/``slide_stride`` for
    segmentation; ``num_classes``, ``class_names``, ``data_config`` for both); Lightning is not imported.
    """
    hparams = dict(ckpt.get("hyper_parameters") or {})
    detected = _detect_task(hparams, path)
    if task is not None and task != detected:
        raise ModelLoadError(f"{path}: --task {task} given, but the checkpoint is a '{detected}' checkpoint")
    saved_classes = hparams.get("num_classes")
    if num_classes is not None and saved_classes is not None and num_classes != saved_classes:
        raise ModelLoadError(
            f"{path}: --num-classes {num_classes} differs from the checkpoint's num_classes {saved_classes}"
        )
    n_classes = saved_classes if saved_classes is not None else num_classes
    if n_classes is None:
        raise ModelLoadError(f"{path}: hyper_parameters have no num_classes; pass --num-classes")
    state_dict = {
        key[len(_STATE_DICT_PREFIX) :]: value
        for key, value in ckpt["state_dict"].items()
        if key.startswith(_STATE_DICT_PREFIX)
    }
    if not state_dict:
        raise ModelLoadError(f"{path}: the checkpoint's state_dict has no '{_STATE_DICT_PREFIX}*' keys")
    try:
        if detected == "cls":
            import timm

            name = hparams["model"]
            model_kwargs = dict(hparams.get("model_kwargs") or {})
            if hparams.get("drop_path_rate") is not None:
                model_kwargs["drop_path_rate"] = hparams["drop_path_rate"]
            model = timm.create_model(name, pretrained=False, num_classes=n_classes, **model_kwargs)
        else:
            from vmamba.seg import create_segmentation_model

            name = f"{hparams['backbone']}-{hparams['decoder']}"
            model_kwargs = dict(hparams.get("backbone_kwargs") or {})
            model = create_segmentation_model(
                hparams["backbone"],
                n_classes,
                decoder=hparams["decoder"],
                pretrained=False,
                backbone_kwargs=model_kwargs,
                aux_head=any(key.startswith("aux_head.") for key in state_dict),
                **dict(hparams.get("decoder_kwargs") or {}),
            )
    except Exception as error:
        raise ModelLoadError(f"{path}: cannot rebuild the network from hyper_parameters: {error}") from error
    _load_state_dict_strict(model, state_dict, path)
    saved = dict(hparams.get("data_config") or {})
    loaded = LoadedModel(
        model=model,
        task=detected,
        num_classes=int(n_classes),
        class_names=hparams.get("class_names"),
        data_config=_base_data_config(model, model_kwargs, saved),
        name=name,
        grayscale=bool(saved.get("grayscale", False)),
    )
    if detected == "seg":
        window = hparams.get("slide_window")
        loaded.crop_size = _as_size(window) or (
            _as_size(saved["input_size"]) if saved.get("input_size") else None
        )
        loaded.stride = _as_size(hparams.get("slide_stride")) if window else None
        loaded.base_size = saved.get("base_size")
        loaded.palette = saved.get("palette")
    return loaded


def _infer_num_classes(model_name: str, checkpoint: Any) -> int | None:
    """The classifier width (rows of ``<classifier>.weight``) of a loaded weights file, or None if unknown."""
    import timm.models

    if not isinstance(checkpoint, dict):
        return None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    classifier = getattr(timm.models.get_pretrained_cfg(model_name), "classifier", None) or "head"
    for prefix in ("", "module.", "_orig_mod."):
        weight = checkpoint.get(f"{prefix}{classifier}.weight")
        if isinstance(weight, torch.Tensor) and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def _load_timm(
    model_name: str,
    checkpoint: str | None,
    ckpt: Any,
    num_classes: int | None,
    model_kwargs: dict[str, Any],
    pretrained: bool,
) -> LoadedModel:
    """A timm classifier from ``local-dir:``/``hf-hub:``, from a name plus weights file, or timm's own weights."""
    import timm

    if os.path.isdir(model_name) and os.path.isfile(os.path.join(model_name, "config.json")):
        model_name = f"local-dir:{model_name}"
    create_kwargs = dict(model_kwargs)
    if num_classes is not None:
        create_kwargs["num_classes"] = num_classes
    try:
        if model_name.startswith(("local-dir:", "hf-hub:")):
            if checkpoint is not None:
                raise ModelLoadError(f"--checkpoint cannot be combined with --model {model_name}")
            model = timm.create_model(model_name, pretrained=True, **create_kwargs)
        elif checkpoint is not None:
            if num_classes is None:
                inferred = _infer_num_classes(model_name, ckpt)
                if inferred is not None:
                    create_kwargs["num_classes"] = inferred
            overlay: dict[str, Any] = {"file": checkpoint}
            if "num_classes" in create_kwargs:
                overlay["num_classes"] = create_kwargs["num_classes"]
            model = timm.create_model(
                model_name, pretrained=True, pretrained_cfg_overlay=overlay, **create_kwargs
            )
        elif pretrained:
            model = timm.create_model(model_name, pretrained=True, **create_kwargs)
        else:
            raise ModelLoadError(
                f"no weights for {model_name}: pass --checkpoint WEIGHTS or --pretrained (timm's registered weights)"
            )
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"cannot create model {model_name!r}: {type(error).__name__}: {error}"
        ) from error
    n_classes = int(getattr(model, "num_classes", 0) or 0)
    if n_classes <= 0:
        raise ModelLoadError(f"{model_name} has no classifier (num_classes={n_classes}); pass --num-classes")
    label_names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return LoadedModel(
        model=model,
        task="cls",
        num_classes=n_classes,
        class_names=list(label_names) if label_names is not None else None,
        data_config=_base_data_config(model, model_kwargs, None),
        name=model_name.split(":", 1)[-1].rstrip("/").split("/")[-1] or model_name,
        imagenet_labels=label_names is None and n_classes in (1000, 11821, 21841, 21843),
    )


def load_model(
    model_name: str | None = None,
    checkpoint: str | None = None,
    *,
    num_classes: int | None = None,
    task: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    class_names: Sequence[str] | None = None,
) -> LoadedModel:
    """Build the inference network from one of the supported sources; raise :class:`ModelLoadError` if not.

    * ``checkpoint`` is a Lightning ``.ckpt`` of ``vmamba.tasks``: the task, network, class names and
      preprocessing come from its hyper-parameters (``model_name`` is ignored).
    * ``model_name`` is ``local-dir:PATH`` or a folder with ``config.json`` (``timm.models.save_for_hf``).
    * ``model_name`` is a timm name and ``checkpoint`` a weights file (``.pth``/``.bin``/``.safetensors``,
      official or our own): loaded through timm's pretrained path, so model families convert official
      layouts in their checkpoint filter. ``num_classes`` defaults to the file's classifier width.
    * ``model_name`` alone with ``pretrained=True``: timm's registered weights (hub cache; may download).

    ``class_names`` overrides the names the model carries. The model is returned in eval mode on the CPU.
    """
    _register_models()
    if task is not None and task not in TASKS:
        raise ModelLoadError(f"unknown task {task!r}; choose one of {TASKS}")
    ckpt: Any = None
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise ModelLoadError(f"checkpoint {checkpoint!r} does not exist or is not a file")
        try:
            ckpt = _torch_load_safe(checkpoint)
        except pickle.UnpicklingError as error:
            if checkpoint.endswith(".ckpt") or model_name is None:
                raise ModelLoadError(
                    f"{checkpoint}: refused by torch.load(weights_only=True): the file holds objects other than "
                    f"tensors and plain containers ({error}). Re-save only the weights, e.g. with "
                    "timm.models.save_for_hf or torch.save(model.state_dict(), path)."
                ) from error
            ckpt = None  # a foreign official checkpoint: the model family's own loader may handle it
        except Exception as error:
            raise ModelLoadError(
                f"{checkpoint}: cannot read checkpoint ({type(error).__name__}: {error})"
            ) from error

    if _is_lightning_checkpoint(ckpt):
        loaded = _load_lightning(ckpt, checkpoint, task, num_classes)
    elif task == "seg":
        raise ModelLoadError(
            "segmentation inference needs a Lightning checkpoint of vmamba.tasks.SegmentationTask "
            "(--checkpoint run.ckpt)"
        )
    elif model_name is None:
        raise ModelLoadError(
            f"{checkpoint}: not a Lightning checkpoint (no 'state_dict' + 'hyper_parameters'); pass the timm "
            "model name with --model"
            if checkpoint
            else "no model given: pass --checkpoint RUN.ckpt, or --model NAME with --checkpoint WEIGHTS"
        )
    else:
        loaded = _load_timm(model_name, checkpoint, ckpt, num_classes, dict(model_kwargs or {}), pretrained)
    if class_names is not None:
        loaded.class_names = list(class_names)
        loaded.imagenet_labels = False
    if loaded.class_names is not None and len(loaded.class_names) != loaded.num_classes:
        raise ModelLoadError(
            f"{len(loaded.class_names)} class names for a model with {loaded.num_classes} classes"
        )
    loaded.model.eval()
    return loaded


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


def _output_names(items: Sequence[InputItem], suffix: str) -> dict[str, PurePosixPath]:
    """Map each key to a relative output path with ``suffix``; clashes (``a.jpg``/``a.png``) keep the old suffix.

    A name that still clashes gets ``-1``, ``-2``... before the suffix; the result is the same for the same
    inputs.
    """
    wanted = {
        item.key: item.out_rel.with_name(item.out_rel.name.rsplit(".", 1)[0] + suffix) for item in items
    }
    counts: dict[PurePosixPath, int] = {}
    for path in wanted.values():
        counts[path] = counts.get(path, 0) + 1
    taken: set[PurePosixPath] = set()
    names = {}
    for item in items:
        path = wanted[item.key]
        if counts[path] > 1:
            path = item.out_rel.with_name(item.out_rel.name + suffix)
        candidate, n = path, 0
        while candidate in taken:
            n += 1
            candidate = path.with_name(f"{path.name[: -len(suffix)]}-{n}{suffix}")
        taken.add(candidate)
        names[item.key] = candidate
    return names


def _inside(root: Path, rel: PurePosixPath) -> Path:
    """``root / rel``, refusing any path that would land outside ``root`` (``..``, absolute, symlinks)."""
    target = root / Path(*rel.parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"output path {str(rel)!r} would leave the results folder {str(root)!r}")
    return target


class _ImageDataset(Dataset):
    """Reads and transforms the images of ``items``; a failure becomes an error string, never an exception."""

    def __init__(
        self, items: Sequence[InputItem], transform: Any, keep_image: bool = False, grayscale: bool = False
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.keep_image = keep_image
        self.grayscale = grayscale

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, np.ndarray | None, str | None]:
        try:
            image = load_image(self.items[index].path)
            tensor = self.transform(image.convert("L").convert("RGB") if self.grayscale else image)
        except ImageReadError as error:
            return index, None, None, str(error)
        except Exception as error:
            return (
                index,
                None,
                None,
                f"{self.items[index].path}: cannot prepare image ({type(error).__name__}: {error})",
            )
        return index, tensor, (np.asarray(image) if self.keep_image else None), None


def _collate(batch: list[tuple]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the good samples of a classification batch; keep ``(index, error)`` for the bad ones."""
    good = [(index, tensor) for index, tensor, _, error in batch if error is None]
    bad = [(index, error) for index, _, _, error in batch if error is not None]
    stacked = torch.stack([tensor for _, tensor in good]) if good else None
    return [index for index, _ in good], stacked, bad


def _first(batch: list[tuple]) -> tuple:
    """Collate for batch size 1 (segmentation images differ in size): the one sample as it is."""
    return batch[0]


# --------------------------------------------------------------------------------------------------------------
# Classification results
# --------------------------------------------------------------------------------------------------------------


def _columns(topk: int, include_index: bool) -> list[str]:
    """CSV header: ``filename``, then ``[index,] label, prob`` for top-1 or ``index_i``/``label_i``/``prob_i``."""
    names = (["index"] if include_index else []) + ["label", "prob"]
    if topk == 1:
        return ["filename", *names]
    return ["filename"] + [f"{name}_{i}" for name in names for i in range(topk)]


def _json_columns(record: Any) -> list[str]:
    """The CSV-style columns a JSON record corresponds to (``label`` or ``label_0..``), to compare layouts."""
    if not isinstance(record, dict):
        return []
    names = [name for name in ("index", "label", "prob") if name in record]
    values = [record[name] for name in names]
    if values and all(isinstance(v, list) for v in values) and len(values[0]) != 1:
        return [f"{name}_{i}" for name, value in zip(names, values) for i in range(len(value))]
    return names


def _read_results(path: Path, fmt: str) -> tuple[dict[str, dict[str, Any]], list[str] | None]:
    """Rows of an earlier results file, keyed by filename, and its CSV header (None for JSON)."""
    if not path.is_file():
        return {}, None
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    if fmt == "json":
        data = json.loads(text) if text.strip() else {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object keyed by filename")
        return data, None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = {row["filename"]: {k: v for k, v in row.items() if k != "filename"} for row in reader}
    return rows, list(reader.fieldnames or [])


def _write_results(path: Path, fmt: str, rows: dict[str, dict[str, Any]], header: list[str]) -> None:
    """Write all rows sorted by filename, atomically (CSV with ``header``, or JSON keyed by filename with
    one image per line)."""
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


def _write_errors(path: Path, errors: dict[str, str]) -> None:
    """Write ``filename,error`` rows (sorted) atomically; an empty file with the header when all went well."""
    with atomic_write(path, "w", errors="surrogateescape", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["filename", "error"])
        for key in sorted(errors):
            writer.writerow([key, errors[key]])


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


def _record(
    indices: list[int], probs: list[float], namer: _LabelNamer, include_index: bool, flat: bool
) -> dict[str, Any]:
    """One result row: flat ``label_i`` columns for CSV, lists for JSON, scalars when top-1."""
    values = {"index": indices} if include_index else {}
    values["label"] = [namer(i) for i in indices]
    values["prob"] = [round(p, 6) for p in probs]
    if len(indices) == 1:
        return {name: value[0] for name, value in values.items()}
    if flat:
        return {f"{name}_{i}": v for name, value in values.items() for i, v in enumerate(value)}
    return values


# --------------------------------------------------------------------------------------------------------------
# Segmentation outputs
# --------------------------------------------------------------------------------------------------------------


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


def _upsampled_argmax(
    logits: torch.Tensor, size: tuple[int, int], chunk_elems: int = 1 << 26
) -> torch.Tensor:
    """``argmax`` over classes of ``logits`` (1, C, h, w) bilinearly resized to ``size``, in class chunks.

    Resizing all C maps of a large photo at once can need gigabytes; chunks of classes keep a running maximum
    instead and give the same answer.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits[0].argmax(0)
    per_class = size[0] * size[1]
    step = max(1, chunk_elems // per_class)
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


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write a single-channel uint8 or uint16 array as PNG, atomically."""
    image = Image.fromarray(array)
    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG")


def _save_overlay(path: Path, image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float) -> None:
    """Blend the class colours over the image and write it as JPEG, atomically."""
    colours = palette[mask.astype(np.int64) % len(palette)]
    blended = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round()
    with atomic_write(path, "wb") as handle:
        Image.fromarray(blended.astype(np.uint8)).save(handle, format="JPEG", quality=90)


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


def _loader(dataset: Dataset, batch_size: int, workers: int, collate: Any, pin: bool) -> DataLoader:
    """An in-order DataLoader over ``dataset``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=False,
    )


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
) -> Path:
    """Predict top-k labels for ``items`` and write the results file; returns its path."""
    from timm.data import create_transform

    fmt = args.results_format
    topk = min(args.topk, loaded.num_classes)
    header = _columns(topk, args.include_index)
    results_path = _classification_results_path(args, loaded)
    rows: dict[str, dict[str, Any]] = {}
    if args.resume:
        rows, old_header = _read_results(results_path, fmt)
        if fmt == "json" and rows:
            sample = next(iter(rows.values()))
            old_header = ["filename"] + _json_columns(sample)
        if old_header is not None and rows and old_header != header:
            raise ValueError(
                f"{results_path} has columns {old_header}, this run would write {header}; use the same --topk "
                "and --include-index as before, or another --results-file"
            )
    todo = [item for item in items if item.key not in rows]
    stats.resumed = len(items) - len(todo)
    cfg = loaded.data_config
    transform = create_transform(
        input_size=cfg["input_size"],
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg.get("crop_mode", "center"),
    )
    namer = _LabelNamer(loaded, args.label_type)
    loader = _loader(
        _ImageDataset(todo, transform, grayscale=loaded.grayscale),
        args.batch_size,
        args.workers,
        _collate,
        device.type == "cuda",
    )
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
                    probs = logits.float().softmax(dim=-1)
                    top_probs, top_indices = probs.topk(topk, dim=-1)
                except Exception as error:
                    for index in indices:
                        _report_error(
                            bar, stats, todo[index].key, f"inference failed ({type(error).__name__}: {error})"
                        )
                else:
                    for index, p, i in zip(indices, top_probs.cpu().tolist(), top_indices.cpu().tolist()):
                        rows[todo[index].key] = _record(i, p, namer, args.include_index, flat=fmt == "csv")
                        stats.done += 1
            bar.update(len(indices) + len(bad))
            if time.perf_counter() - last_save > args.save_interval:
                _write_results(results_path, fmt, rows, header)
                last_save = time.perf_counter()
    finally:
        bar.close()
        if rows or not results_path.exists():
            _write_results(results_path, fmt, rows, header)
    return results_path


class _SegmentationTransform:
    """PIL image -> normalised (3, h, w) tensor, after an optional short-side resize to ``base_size``.

    A class rather than a closure so that DataLoader workers can pickle it on spawn-based platforms.
    """

    def __init__(self, cfg: dict[str, Any], base_size: int | None) -> None:
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(-1, 1, 1)
        self.base_size = base_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.base_size is not None and min(image.size) != self.base_size:
            scale = self.base_size / min(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
        array = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        return (array - self.mean) / self.std


def _run_segmentation(
    args: argparse.Namespace,
    loaded: LoadedModel,
    items: list[InputItem],
    device: torch.device,
    stats: _RunStats,
) -> Path:
    """Predict a class-index mask (and optionally an overlay) per item under the results folder; returns it."""
    from vmamba.seg.inference import predict_sliding, predict_whole

    root = Path(args.results_dir)
    mask_names = _output_names(items, ".png")
    overlay_names = _output_names(items, ".jpg")
    targets = {}
    for item in items:
        masks = _inside(root / _MASKS_DIR, mask_names[item.key])
        overlay = _inside(root / _OVERLAYS_DIR, overlay_names[item.key]) if args.overlay else None
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
    if args.crop_size:
        crop, stride = _as_size(args.crop_size), None
    else:
        crop, stride = loaded.crop_size, loaded.stride
    stride = _as_size(args.stride) or stride or (tuple(max(1, c * 2 // 3) for c in crop) if crop else None)
    base_size = loaded.base_size if args.base_size is None else (args.base_size or None)
    dtype = np.uint8 if loaded.num_classes <= 256 else np.uint16
    palette = (
        np.asarray(loaded.palette, dtype=np.uint8).reshape(-1, 3)
        if loaded.palette
        else segmentation_palette(loaded.num_classes)
    )
    dataset = _ImageDataset(
        todo,
        _SegmentationTransform(loaded.data_config, base_size),
        keep_image=True,
        grayscale=loaded.grayscale,
    )
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
                with _autocast(device, args.amp, args.amp_dtype):
                    if crop is not None:
                        logits = predict_sliding(
                            loaded.model, batch, crop, stride, num_classes=loaded.num_classes
                        )
                    else:
                        logits = predict_whole(loaded.model, batch)
                mask = _upsampled_argmax(logits.float(), image.shape[:2]).cpu().numpy().astype(dtype)
                mask_path, overlay_path = targets[item.key]
                _save_png(mask_path, mask)
                if overlay_path is not None:
                    _save_overlay(overlay_path, image, mask, palette, args.overlay_alpha)
            except Exception as error:
                _report_error(bar, stats, item.key, f"inference failed ({type(error).__name__}: {error})")
            else:
                stats.done += 1
            bar.update(1)
    finally:
        bar.close()
    return root / _MASKS_DIR


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


class _ParseKwargs(argparse.Action):
    """``--model-kwargs k=v ...`` into a dict; values are Python literals where they parse, else strings."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option_string} expects key=value, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``vmamba-predict`` argument parser (timm ``inference.py`` names where they apply)."""
    parser = argparse.ArgumentParser(
        prog="vmamba-predict",
        description="Classify or segment a folder of images with a trained model. "
        "'vmamba-predict export ...' writes ONNX instead (see 'vmamba-predict export --help').",
    )
    parser.add_argument(
        "data", nargs="?", help="image folder (scanned recursively) or a text file of image paths"
    )
    parser.add_argument("--data-dir", help="same as the positional DATA")
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", help="timm model name, 'local-dir:PATH' or a save_for_hf folder")
    group.add_argument(
        "--checkpoint",
        help="Lightning .ckpt of vmamba.tasks, or a weights file (.pth/.safetensors) for --model",
    )
    group.add_argument("--pretrained", action="store_true", help="use timm's registered weights for --model")
    group.add_argument("--task", choices=TASKS, help="cls or seg (default: from the checkpoint, else cls)")
    group.add_argument("--num-classes", type=int, help="number of classes (default: from the weights)")
    group.add_argument("--class-map", help="text file with one class name per line, in class-index order")
    group.add_argument(
        "--model-kwargs", nargs="*", default={}, action=_ParseKwargs, help="extra create_model k=v"
    )
    group = parser.add_argument_group("preprocessing")
    group.add_argument("--img-size", type=int, help="classification input size (default: the model's)")
    group.add_argument(
        "--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="classification input"
    )
    group.add_argument("--crop-pct", type=float, help="classification centre-crop fraction")
    group.add_argument("--crop-mode", help="timm crop mode (center, squash, border)")
    group.add_argument("--interpolation", help="resize interpolation (bilinear, bicubic, ...)")
    group.add_argument("--mean", type=float, nargs="+", help="normalisation mean (0-1 scale)")
    group.add_argument("--std", type=float, nargs="+", help="normalisation std (0-1 scale)")
    group.add_argument("--base-size", type=int, help="segmentation: resize the short side first (0: never)")
    group.add_argument("--crop-size", type=int, nargs="+", help="segmentation sliding-window size (H [W])")
    group.add_argument("--stride", type=int, nargs="+", help="segmentation window step (default 2/3 crop)")
    group = parser.add_argument_group("runtime")
    group.add_argument("-b", "--batch-size", type=int, default=32, help="classification batch size")
    group.add_argument("-j", "--workers", type=int, default=2, help="data-loading worker processes")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    group.add_argument("--amp", action="store_true", help="mixed-precision inference")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    group = parser.add_argument_group("output")
    group.add_argument("--results-dir", default=".", help="folder for all outputs (default: current folder)")
    group.add_argument("--results-file", help="classification results file name (default {model}-{img_size})")
    group.add_argument("--results-format", default="csv", choices=RESULT_FORMATS)
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
        "--save-interval", type=float, default=60.0, help="seconds between rewrites of the results file"
    )
    return parser


def _data_config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing flags given on the command line, in timm's data-config keys."""
    overrides = {
        "input_size": tuple(args.input_size) if args.input_size else None,
        "img_size": args.img_size,
        "crop_pct": args.crop_pct,
        "crop_mode": args.crop_mode,
        "interpolation": args.interpolation,
        "mean": args.mean,
        "std": args.std,
    }
    return {key: value for key, value in overrides.items() if value is not None}


def _resolve_device(name: str | None) -> torch.device:
    """``--device``, or CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _read_class_map(path: str) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"cannot read --class-map {path!r}: {error}") from error
    return [line.strip() for line in lines if line.strip()]


def _load_model_from_args(args: argparse.Namespace, prog: str) -> LoadedModel | None:
    """Load the model named by the shared model flags (``model``, ``--checkpoint``, ``--num-classes``,
    ``--task``, ``--model-kwargs``, ``--pretrained``, ``--class-map``) of ``vmamba-predict`` and its
    ``export`` command; on failure print ``{prog}: error: cannot load the model: ...`` to stderr and return
    ``None`` (the caller exits with 2)."""
    try:
        return load_model(
            args.model,
            args.checkpoint,
            num_classes=args.num_classes,
            task=args.task,
            model_kwargs=args.model_kwargs,
            pretrained=args.pretrained,
            class_names=_read_class_map(args.class_map) if args.class_map else None,
        )
    except (ModelLoadError, ValueError) as error:
        print(f"{prog}: error: cannot load the model: {error}", file=sys.stderr)
        return None


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible flag values up front with a message that says which flag."""
    if args.topk < 1:
        parser.error("--topk must be >= 1")
    if args.batch_size < 1:
        parser.error("-b/--batch-size must be >= 1")
    if args.workers < 0:
        parser.error("-j/--workers must be >= 0")
    for flag in ("crop_size", "stride"):
        value = getattr(args, flag)
        if value is not None and (len(value) not in (1, 2) or min(value) < 1):
            parser.error(f"--{flag.replace('_', '-')} takes one or two positive ints")
    if not 0.0 <= args.overlay_alpha <= 1.0:
        parser.error("--overlay-alpha must be in [0, 1]")


def run(args: argparse.Namespace) -> int:
    """Carry out one ``vmamba-predict`` run from parsed arguments; returns the process exit code."""
    data = args.data or args.data_dir
    try:
        items = collect_inputs(data) if data else None
    except ValueError as error:
        print(f"vmamba-predict: error: {error}", file=sys.stderr)
        return 2
    if items is None:
        print(
            "vmamba-predict: error: no input given (an image folder or a text file of paths)", file=sys.stderr
        )
        return 2
    if not items:
        print(f"vmamba-predict: error: no images found in {data}", file=sys.stderr)
        return 1
    loaded = _load_model_from_args(args, "vmamba-predict")
    if loaded is None:
        return 2
    from timm.data import resolve_data_config

    loaded.data_config = resolve_data_config(_data_config_overrides(args), pretrained_cfg=loaded.data_config)
    device = _resolve_device(args.device)
    loaded.model.to(device)
    stats = _RunStats(total=len(items))
    errors_path = (
        Path(args.errors_file) if args.errors_file else Path(args.results_dir) / _DEFAULT_ERRORS_FILE
    )
    try:
        if loaded.task == "cls":
            output = _run_classification(args, loaded, items, device, stats)
        else:
            output = _run_segmentation(args, loaded, items, device, stats)
    except ValueError as error:
        print(f"vmamba-predict: error: {error}", file=sys.stderr)
        return 2
    finally:
        _write_errors(errors_path, stats.errors)
    print(stats.summary())
    print(f"Results: {output}" + (f"; skipped files listed in {errors_path}" if stats.errors else ""))
    if stats.done == 0 and stats.resumed == 0:
        print("vmamba-predict: error: no image could be processed", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vmamba-predict`` / ``python -m vmamba.predict``; ``export`` as first word runs ONNX export."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        from vmamba.export import main as export_main

        return export_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
