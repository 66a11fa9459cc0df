"""The written contract between training and inference: task names, ``data_config`` and the hyper-parameters
a checkpoint of :mod:`vmamba.tasks` carries. Plain Python, no Lightning, no torch.

``data_config`` (stored in ``hyper_parameters["data_config"]``, written by the data module) describes the
evaluation preprocessing (:class:`vmamba.preprocess.EvalPreprocess`) and nothing else:

==================  ===============  ==========================================================================
key                 task             meaning
==================  ===============  ==========================================================================
``task``            both             ``"classification"`` or ``"segmentation"``
``input_size``      both             ``[C, H, W]``: classification input; segmentation training crop
``mean``, ``std``   both             per-channel normalisation on the 0-1 scale
``grayscale``       both             reduce to luma and replicate to 3 channels before normalising
``interpolation``   classification   ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"area"``
``crop_pct``        classification   short side resized to ``H / crop_pct``, then centre crop (timm's)
``crop_mode``       classification   ``"center"`` (resize + crop) or ``"squash"`` (resize to H x W)
``base_size``       segmentation     short side resized to this first (``null``: original size)
``ignore_index``    segmentation     mask value that is not a class
``palette``         segmentation     optional RGB colour per class (overlays)
==================  ===============  ==========================================================================

The other hyper-parameters (what rebuilds the network; everything else a task saves is training-only):

* classification: ``model`` (timm name), ``num_classes``, ``class_names``, ``model_kwargs``,
  ``drop_path_rate``;
* segmentation: ``backbone``, ``decoder``, ``num_classes``, ``class_names``, ``backbone_kwargs``,
  ``decoder_kwargs``, ``aux_head``, ``slide_window``, ``slide_stride`` (the sliding window of evaluation,
  ``null``: whole image).

Weights are the checkpoint's ``state_dict`` entries under ``model.``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CLASSIFICATION_HPARAMS",
    "as_hw",
    "SEGMENTATION_HPARAMS",
    "TASKS",
    "TASK_ALIASES",
    "canonical_task",
    "check_data_config",
    "classification_data_config",
    "segmentation_data_config",
    "task_of_hparams",
]

TASKS = ("classification", "segmentation")
#: Short names accepted wherever a task is named (``--task cls``).
TASK_ALIASES = {"cls": "classification", "seg": "segmentation"}

CLASSIFICATION_HPARAMS = (
    "model",
    "num_classes",
    "class_names",
    "model_kwargs",
    "drop_path_rate",
    "data_config",
)
SEGMENTATION_HPARAMS = (
    "backbone",
    "decoder",
    "num_classes",
    "class_names",
    "backbone_kwargs",
    "decoder_kwargs",
    "aux_head",
    "slide_window",
    "slide_stride",
    "data_config",
)

_COMMON_KEYS = ("task", "input_size", "mean", "std", "grayscale")
_TASK_KEYS = {
    "classification": ("interpolation", "crop_pct", "crop_mode"),
    "segmentation": ("base_size", "ignore_index", "palette"),
}


def canonical_task(name: str) -> str:
    """``"classification"`` or ``"segmentation"`` for a task name or its alias (``cls``/``seg``)."""
    task = TASK_ALIASES.get(name, name)
    if task not in TASKS:
        raise ValueError(f"unknown task {name!r}; use one of {TASKS} (or {tuple(TASK_ALIASES)})")
    return task


def as_hw(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``(H, W)`` from an int side, an ``(H, W)`` pair or a ``(C, H, W)`` size; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    return value[-2:] if len(value) >= 2 else (value[0], value[0])


def _size(img_size: int | Sequence[int], channels: int = 3) -> list[int]:
    """``[C, H, W]`` from an int side or an ``(H, W)`` pair."""
    return [int(channels), *as_hw(img_size)]


def classification_data_config(
    img_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    crop_mode: str = "center",
    grayscale: bool = False,
) -> dict[str, Any]:
    """The ``data_config`` of a classification model, as YAML primitives."""
    return {
        "task": "classification",
        "input_size": _size(img_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "grayscale": bool(grayscale),
        "interpolation": interpolation,
        "crop_pct": float(crop_pct),
        "crop_mode": crop_mode,
    }


def segmentation_data_config(
    crop_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    base_size: int | None = None,
    ignore_index: int = 255,
    palette: Sequence[Sequence[int]] | None = None,
    grayscale: bool = False,
) -> dict[str, Any]:
    """The ``data_config`` of a segmentation model, as YAML primitives."""
    return {
        "task": "segmentation",
        "input_size": _size(crop_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "grayscale": bool(grayscale),
        "base_size": base_size,
        "ignore_index": int(ignore_index),
        "palette": [list(map(int, c)) for c in palette] if palette is not None else None,
    }


def check_data_config(config: Mapping[str, Any], source: str = "data_config") -> dict[str, Any]:
    """``config`` with a canonical task name and only the contract's keys; ValueError naming what is missing.

    Unknown keys (timm's hub metadata such as ``hf_hub_id`` or ``num_classes``) are dropped.
    """
    cfg = dict(config)
    if "task" not in cfg:
        raise ValueError(f"{source}: no 'task' key; expected one of {TASKS}")
    task = canonical_task(cfg["task"])
    cfg["task"] = task
    cfg.setdefault("grayscale", False)
    missing = [key for key in ("input_size", "mean", "std") if cfg.get(key) is None]
    if task == "classification":
        cfg.setdefault("crop_mode", "center")
        missing += [key for key in ("interpolation", "crop_pct") if cfg.get(key) is None]
    else:
        cfg.setdefault("base_size", None)
        cfg.setdefault("ignore_index", 255)
        cfg.setdefault("palette", None)
    if missing:
        raise ValueError(f"{source}: missing {missing} for a {task} model (see vmamba.contract)")
    keys = _COMMON_KEYS + _TASK_KEYS[task]
    return {key: cfg[key] for key in keys}


def task_of_hparams(hparams: Mapping[str, Any], source: str = "checkpoint") -> str:
    """The task of a checkpoint from its hyper-parameters (``backbone`` + ``decoder``: segmentation)."""
    if "backbone" in hparams and "decoder" in hparams:
        return "segmentation"
    if "model" in hparams:
        return "classification"
    raise ValueError(
        f"{source}: cannot tell the task from the checkpoint's hyper_parameters (keys: {sorted(hparams)}); "
        "expected 'model' (ClassificationTask) or 'backbone' and 'decoder' (SegmentationTask)"
    )
