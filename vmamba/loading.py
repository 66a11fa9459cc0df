"""Build an inference model from any checkpoint vmamba knows, for ``vmamba-predict`` and ``vmamba-export``.

Sources (see :func:`load_model`):

* a Lightning checkpoint of :mod:`vmamba.tasks`: the network is rebuilt from its hyper-parameters (the
  contract in :mod:`vmamba.contract`) without importing Lightning;
* a timm model name plus a weights file (official envelopes, timm or our own ``.pth``/``.safetensors``):
  the file is read once by :func:`vmamba.models._helpers.read_checkpoint_file` and handed to timm as a
  ``state_dict``, so the model family's checkpoint filter converts official layouts;
* a folder written by ``timm.models.save_for_hf`` (``local-dir:PATH``) or ``hf-hub:`` names;
* a timm name alone with ``pretrained=True`` (timm's registered weights).

Every file goes through the same reader and the same EMA preference (the model weights unless
``use_ema=True``). The result carries the ``data_config`` that :class:`vmamba.preprocess.EvalPreprocess`
turns into the evaluation preprocessing.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vmamba.contract import (
    TASK_ALIASES,
    TASKS,
    canonical_task,
    check_data_config,
    classification_data_config,
    task_of_hparams,
)
from vmamba.models._helpers import check_state_dict_fits, read_checkpoint_file, select_state_dict

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "ParseKwargs",
    "add_model_arguments",
    "load_model",
    "load_model_from_args",
]

_STATE_DICT_PREFIX = "model."


class ModelLoadError(RuntimeError):
    """The model could not be built or its weights could not be loaded; the message says why."""


@dataclass
class LoadedModel:
    """A network in eval mode on the CPU, with what is needed to feed it and to name its outputs.

    ``data_config`` follows :mod:`vmamba.contract`. ``slide_window``/``slide_stride`` are the sliding
    window of segmentation (``None``: whole image), as the task evaluated. ``imagenet_labels`` says that
    class indices are ImageNet's (a timm model without names of its own).
    """

    model: nn.Module
    task: str
    num_classes: int
    class_names: list[str] | None
    data_config: dict[str, Any]
    name: str
    slide_window: int | None = None
    slide_stride: int | None = None
    imagenet_labels: bool = field(default=False, repr=False)


def _register_models() -> None:
    """Import vmamba's model families so timm knows their names (``vim_*``, ``vmamba_*``)."""
    import vmamba.models  # noqa: F401


def _is_lightning_checkpoint(obj: Any) -> bool:
    """True for a dict shaped like a Lightning checkpoint (``state_dict`` plus ``hyper_parameters``)."""
    return isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "hyper_parameters" in obj


def _model_data_config(model: nn.Module) -> dict[str, Any]:
    """The classification ``data_config`` of a timm model: its pretrained cfg at the size it was built for."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    size = cfg["input_size"][-2:]
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return classification_data_config(
        size,
        cfg["mean"],
        cfg["std"],
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=cfg.get("crop_pct", 0.875),
        crop_mode=cfg.get("crop_mode", "center")
        if cfg.get("crop_mode") in ("center", "squash")
        else "center",
    )


def _load_lightning(
    ckpt: dict[str, Any], path: str, task: str | None, num_classes: int | None
) -> LoadedModel:
    """Rebuild the network of a ``vmamba.tasks`` checkpoint from its hyper-parameters and load its weights."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    try:
        detected = task_of_hparams(hparams, path)
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    if task is not None and task != detected:
        raise ModelLoadError(f"{path}: --task {task} given, but the checkpoint is a {detected} checkpoint")
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
        if detected == "classification":
            import timm

            name = hparams["model"]
            model_kwargs = dict(hparams.get("model_kwargs") or {})
            if hparams.get("drop_path_rate") is not None:
                model_kwargs["drop_path_rate"] = hparams["drop_path_rate"]
            model = timm.create_model(name, pretrained=False, num_classes=n_classes, **model_kwargs)
        else:
            from vmamba.seg import create_segmentation_model

            name = f"{hparams['backbone']}-{hparams['decoder']}"
            model = create_segmentation_model(
                hparams["backbone"],
                n_classes,
                decoder=hparams["decoder"],
                pretrained=False,
                backbone_kwargs=dict(hparams.get("backbone_kwargs") or {}),
                aux_head=any(key.startswith("aux_head.") for key in state_dict),
                **dict(hparams.get("decoder_kwargs") or {}),
            )
    except Exception as error:
        raise ModelLoadError(f"{path}: cannot rebuild the network from hyper_parameters: {error}") from error
    _load_strict(model, state_dict, path)
    saved = hparams.get("data_config")
    try:
        if saved:
            data_config = check_data_config({"task": detected, **saved}, f"{path}: data_config")
        elif detected == "classification":
            data_config = _model_data_config(model)
        else:
            raise ValueError(f"{path}: a segmentation checkpoint without data_config")
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    return LoadedModel(
        model=model,
        task=detected,
        num_classes=int(n_classes),
        class_names=hparams.get("class_names"),
        data_config=data_config,
        name=name,
        slide_window=hparams.get("slide_window") if detected == "segmentation" else None,
        slide_stride=hparams.get("slide_stride") if detected == "segmentation" else None,
    )


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)``; a mismatch becomes :class:`ModelLoadError` naming the keys."""
    try:
        check_state_dict_fits(model, state_dict, source)
    except RuntimeError as error:
        raise ModelLoadError(str(error)) from error
    model.load_state_dict(state_dict, strict=True)


def _classifier_width(model_name: str, state_dict: dict[str, torch.Tensor]) -> int | None:
    """Rows of the classifier weight of ``state_dict`` (the model's ``classifier`` key), or None."""
    import timm.models

    classifier = getattr(timm.models.get_pretrained_cfg(model_name), "classifier", None) or "head"
    weight = state_dict.get(f"{classifier}.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim >= 1 else None


def _load_timm(
    model_name: str,
    raw: Any,
    checkpoint: str | None,
    num_classes: int | None,
    model_kwargs: dict[str, Any],
    pretrained: bool,
    use_ema: bool,
) -> LoadedModel:
    """A timm classifier from ``local-dir:``/``hf-hub:``, from a name plus weights, or timm's own weights."""
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
        elif raw is not None:
            state_dict = select_state_dict(raw, use_ema, checkpoint)
            if num_classes is None:
                inferred = _classifier_width(model_name, state_dict)
                if inferred is not None:
                    create_kwargs["num_classes"] = inferred
            overlay: dict[str, Any] = {"state_dict": state_dict}
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
        task="classification",
        num_classes=n_classes,
        class_names=list(label_names) if label_names is not None else None,
        data_config=_model_data_config(model),
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
    use_ema: bool = False,
) -> LoadedModel:
    """Build the inference network from one of the supported sources; raise :class:`ModelLoadError` if not.

    * ``checkpoint`` is a Lightning ``.ckpt`` of ``vmamba.tasks``: task, network, class names and
      preprocessing come from its hyper-parameters (``model_name`` is ignored).
    * ``model_name`` is ``local-dir:PATH`` or a folder with ``config.json`` (``timm.models.save_for_hf``).
    * ``model_name`` is a timm name and ``checkpoint`` a weights file (official or our own); ``num_classes``
      defaults to the file's classifier width; ``use_ema`` picks the file's EMA weights.
    * ``model_name`` alone with ``pretrained=True``: timm's registered weights.

    ``task`` is ``classification``/``segmentation`` (or ``cls``/``seg``); ``class_names`` overrides the
    names the model carries. The model is returned in eval mode on the CPU.
    """
    _register_models()
    try:
        task = canonical_task(task) if task is not None else None
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    raw: Any = None
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise ModelLoadError(f"checkpoint {checkpoint!r} does not exist or is not a file")
        try:
            raw = read_checkpoint_file(checkpoint)
        except Exception as error:
            raise ModelLoadError(
                f"{checkpoint}: cannot read checkpoint ({type(error).__name__}: {error})"
            ) from error
    if _is_lightning_checkpoint(raw):
        loaded = _load_lightning(raw, checkpoint, task, num_classes)
    elif task == "segmentation":
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
        try:
            loaded = _load_timm(
                model_name, raw, checkpoint, num_classes, dict(model_kwargs or {}), pretrained, use_ema
            )
        except ValueError as error:  # select_state_dict: no weights / no EMA in the file
            raise ModelLoadError(str(error)) from error
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
# The model flags shared by vmamba-predict and vmamba-export
# --------------------------------------------------------------------------------------------------------------


class ParseKwargs(argparse.Action):
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name a model: ``--model``, ``--checkpoint``, ``--pretrained``, ``--use-ema``,
    ``--task``, ``--num-classes``, ``--class-map``, ``--model-kwargs``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", help="timm model name, 'local-dir:PATH' or a save_for_hf folder")
    group.add_argument(
        "--checkpoint",
        help="Lightning .ckpt of vmamba.tasks, or a weights file (.pth/.safetensors) for --model",
    )
    group.add_argument("--pretrained", action="store_true", help="use timm's registered weights for --model")
    group.add_argument(
        "--use-ema", action="store_true", help="load the EMA weights of a --model weights file"
    )
    group.add_argument(
        "--task",
        choices=TASKS + tuple(TASK_ALIASES),
        help="classification or segmentation (default: from the checkpoint, else classification)",
    )
    group.add_argument("--num-classes", type=int, help="number of classes (default: from the weights)")
    group.add_argument("--class-map", help="text file with one class name per line, in class-index order")
    group.add_argument(
        "--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra create_model k=v"
    )


def _read_class_map(path: str) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise ValueError(f"cannot read --class-map {path!r}: {error}") from error
    return [line.strip() for line in lines if line.strip()]


def load_model_from_args(args: argparse.Namespace, prog: str) -> LoadedModel | None:
    """:func:`load_model` from the flags of :func:`add_model_arguments`; on failure print
    ``{prog}: error: cannot load the model: ...`` to stderr and return ``None`` (the caller exits with 2)."""
    try:
        return load_model(
            args.model,
            args.checkpoint,
            num_classes=args.num_classes,
            task=args.task,
            model_kwargs=args.model_kwargs,
            pretrained=args.pretrained,
            class_names=_read_class_map(args.class_map) if args.class_map else None,
            use_ema=args.use_ema,
        )
    except (ModelLoadError, ValueError) as error:
        print(f"{prog}: error: cannot load the model: {error}", file=sys.stderr)
        return None
