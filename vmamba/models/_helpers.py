"""The one checkpoint reader: safe file loading, envelopes, one EMA preference, strict fitting.

Every weights file vmamba reads goes through :func:`read_checkpoint_file` exactly once (the model families'
``pretrained_cfg_overlay=dict(file=...)``, :mod:`vmamba.loading` for ``vmamba-predict``/``vmamba-export``
and the Lightning tasks' ``weights=``), and :func:`select_state_dict` picks the weights inside any envelope
(official ``model``/``model_ema``, timm ``state_dict``/``state_dict_ema``, Lightning ``state_dict`` with
``model.`` keys, or a bare dict of tensors): the model weights unless EMA ones are asked for.

Official Vim and VMamba checkpoints are ``torch.save`` dicts that carry, beside the weights, pickled
objects of the training script (an ``argparse.Namespace``, a yacs ``CfgNode``). ``torch.load`` with
``weights_only=True`` refuses them; unpickling them for real would run foreign code. Here each such object
is replaced by an inert stand-in (a plain dict subclass that only stores what it is given), so the
tensors load with ``weights_only=True`` and nothing else is executed.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "check_state_dict_fits",
    "fit_hierarchical_state_dict",
    "load_checkpoint_file",
    "load_state_dict_strict",
    "read_checkpoint_file",
    "resolve_pretrained_file",
    "select_state_dict",
]

_logger = logging.getLogger(__name__)

_EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
_MODEL_KEYS = ("model", "state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_MAX_STAND_INS = 32


def _stand_in(qualified_name: str) -> type:
    """An allow-listable class named like the pickled one whose construction yields an empty OrderedDict.

    The weights-only unpickler lets OrderedDicts receive items and attribute state, so whatever the
    original object stored lands in that inert container; none of the original class's code runs.
    """
    module, _, name = qualified_name.rpartition(".")

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:
        return OrderedDict()

    return type(name, (), {"__module__": module or "builtins", "__new__": __new__})


def _torch_load(path: str) -> Any:
    """``torch.load(weights_only=True)``, with inert stand-ins for pickled non-tensor objects."""
    stand_ins: dict[str, type] = {}
    for _ in range(_MAX_STAND_INS):
        try:
            # Plain classes (named like the pickled ones): torch 2.5 takes no (class, name) pairs here.
            with torch.serialization.safe_globals(list(stand_ins.values())):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            match = _UNSUPPORTED_GLOBAL.search(str(err))
            if match is None or match.group(1) in stand_ins:
                raise RuntimeError(f"cannot load {path} safely with weights_only=True: {err}") from err
            name = match.group(1)
            stand_ins[name] = _stand_in(name)
    raise RuntimeError(f"cannot load {path}: more than {_MAX_STAND_INS} pickled non-tensor objects")


def select_state_dict(
    checkpoint: Any, use_ema: bool = False, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The weights inside a checkpoint envelope, with wrapper prefixes stripped.

    Picks ``model`` or ``state_dict`` (``model_ema``/``state_dict_ema``/``ema`` when ``use_ema``); a
    dict of tensors is taken as it is. Strips ``module.`` and ``_orig_mod.`` prefixes, and the ``model.``
    prefix of a Lightning checkpoint of our tasks (when every key carries it).
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{source}: expected a dict of weights or an envelope, got {type(checkpoint).__name__}"
        )
    state_dict = checkpoint
    wanted = _EMA_KEYS if use_ema else _MODEL_KEYS
    for key in wanted:
        if isinstance(checkpoint.get(key), dict):
            state_dict = checkpoint[key]
            break
    else:
        if use_ema:
            raise ValueError(
                f"{source}: EMA weights were requested but the file has none (top-level keys: "
                f"{sorted(checkpoint)[:20]}); drop use_ema to load the model weights"
            )
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{source}: no tensors found (top-level keys: {sorted(checkpoint)[:20]})")
    for prefix in _PREFIXES:
        tensors = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    if all(k.startswith("model.") for k in tensors) and "hyper_parameters" in checkpoint:
        tensors = {k[len("model.") :]: v for k, v in tensors.items()}
    return tensors


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """The whole content of a local ``.safetensors`` or torch file, read once on the CPU.

    Torch files load with ``weights_only=True``; pickled training-script objects become inert stand-ins.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return _torch_load(path)


def load_checkpoint_file(path: str | os.PathLike, use_ema: bool = False) -> dict[str, Tensor]:
    """Weights from a local ``.safetensors`` or torch file (official envelope, Lightning or plain).

    ``model`` weights by default (what the official evaluation scores); ``use_ema=True`` for the EMA ones.
    """
    return select_state_dict(read_checkpoint_file(path), use_ema, os.fspath(path))


def _offline_hint(variant: str, filename: str) -> str:
    return (
        f"Download it where a network is available and pass the local file: timm.create_model({variant!r}, "
        f"pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/{filename}'))"
    )


def _fetch_hub_weights(variant: str, repo: str, filename: str) -> dict[str, Tensor]:
    """The hub file of a pretrained cfg (from the local cache when there), read with our loader."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, filename)
    except Exception as err:
        raise RuntimeError(
            f"{variant}: pretrained=True needs {filename} from the Hugging Face Hub ({repo}), which is neither "
            f"cached nor downloadable here ({type(err).__name__}). " + _offline_hint(variant, filename)
        ) from err
    return load_checkpoint_file(path)


def resolve_pretrained_file(pretrained: bool, kwargs: dict[str, Any], variant: str | None = None) -> None:
    """Resolve where ``pretrained=True`` weights come from, in place, before timm builds the model.

    ``pretrained_cfg_overlay=dict(file=..., use_ema=...)`` is read with our loader (timm's own prefers EMA
    weights and refuses pickled configs) and becomes ``state_dict``, which timm hands to the model's
    ``checkpoint_filter_fn``. With ``variant`` and no file, the variant's hub file (``hf_hub_id`` +
    ``hf_hub_filename``) is read the same way; when it cannot be fetched (no network, no cache), or the
    variant registers no weights at all, a RuntimeError says how to pass a local file.
    """
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    use_ema = bool(overlay.pop("use_ema", False))
    if pretrained and overlay.get("file"):
        overlay["state_dict"] = load_checkpoint_file(overlay.pop("file"), use_ema=use_ema)
    elif pretrained and variant is not None and overlay.get("state_dict") is None:
        from timm.models import resolve_pretrained_cfg

        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay
        ).to_dict()
        name = cfg.get("architecture") or variant
        if cfg.get("hf_hub_id") and cfg.get("hf_hub_filename"):
            overlay["state_dict"] = _fetch_hub_weights(name, cfg["hf_hub_id"], cfg["hf_hub_filename"])
        elif not (cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("state_dict")):
            notes = " ".join(cfg.get("notes") or ())
            raise RuntimeError(
                f"{name}: no weights are registered for download ({notes or 'no notes'}; origin: "
                f"{cfg.get('origin_url')}). " + _offline_hint(name, "weights.pth")
            )
    if overlay or "pretrained_cfg_overlay" in kwargs:
        kwargs["pretrained_cfg_overlay"] = overlay


def check_state_dict_fits(
    model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint"
) -> None:
    """Raise a RuntimeError naming every missing, unexpected and wrongly shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:25])
        more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}" if items else ""

    raise RuntimeError(
        f"{source} does not fit {type(model).__name__}:"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("shape mismatches", mismatched)
        + "\nCheck that the architecture (variant, img_size, num_classes) matches the checkpoint."
    )


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint"
) -> None:
    """Load all of ``state_dict`` into ``model`` or raise naming the keys that do not fit."""
    check_state_dict_fits(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def fit_hierarchical_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], family: str, first_conv: str
) -> dict[str, Tensor]:
    """The last step of a hierarchical backbone's checkpoint filter (VMamba, VSSD): fill and check.

    A model built with dense-prediction stage norms (``feature_norms``) takes the parts a dense-prediction
    or classification checkpoint lacks by design (``feature_norms.``, ``norm.``, ``head.``) from the model
    as initialised. Then everything is checked except what timm adapts after the filter: the head (dropped
    when num_classes differs) and the input channels of ``first_conv`` (in_chans). A dense-prediction
    checkpoint offered to a classifier gets a hint to use ``features_only=True``.
    """
    expected = model.state_dict()
    if model.feature_norms is not None:
        filled = [
            k for k in expected if k.startswith(("feature_norms.", "norm.", "head.")) and k not in state_dict
        ]
        if filled:
            _logger.info(
                f"{family} checkpoint has no {sorted({k.rsplit('.', 1)[0] for k in filled})}: kept as initialised"
            )
        state_dict.update({k: expected[k] for k in filled})

    probe = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    if len(probe) < len(state_dict):
        probe.update({k: v for k, v in expected.items() if k.startswith("head.")})
    stem, want = probe.get(first_conv), expected[first_conv]
    if stem is not None and stem.shape[:1] + stem.shape[2:] == want.shape[:1] + want.shape[2:]:
        probe[first_conv] = want
    try:
        check_state_dict_fits(model, probe, f"{family} checkpoint")
    except RuntimeError as err:
        if model.feature_norms is None and any(k.startswith("feature_norms.") for k in probe):
            raise RuntimeError(
                f"{err}\nThis is a dense-prediction backbone checkpoint (stage norms 'outnorm{{i}}', no "
                "classifier): load it with features_only=True."
            ) from None
        raise
    return state_dict
