"""Segmentation model = timm feature backbone (+ plain-backbone pyramid) + decoder (+ optional auxiliary head).

`create_segmentation_model` builds one from any timm model name that supports feature extraction, including
ours (``vim_*``, ``vmamba_*``, ``vssd_*``; importing ``vmamba.models`` registers them). Hierarchical backbones (strides
4/8/16/32, e.g. VMamba, ConvNeXt, ResNet) feed the decoder directly; plain backbones (one stride for every block,
e.g. Vim, ViT) go through `PlainPyramidAdapter` first. Which kind a backbone is comes from its ``feature_info``
reductions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import vmamba.models  # noqa: F401  (registers vim_* / vmamba_* / vssd_* with timm)

from .adapters import PlainPyramidAdapter
from .decoders import ConvHead, FCNHead, FPNHead, UperNetHead, resize

__all__ = ["SegmentationModel", "create_segmentation_model", "create_feature_backbone", "DECODERS"]


class SegmentationModel(nn.Module):
    """Backbone -> (pyramid adapter) -> decoder, with logits returned at the input resolution.

    ``forward(x)`` always returns logits ``(N, num_classes, H, W)``. For training with the auxiliary loss of the
    UperNet recipes use ``forward_with_aux(x) -> (logits, aux_logits)`` (``aux_logits`` is None without an
    auxiliary head) and weight the auxiliary loss by ``model.aux_weight``:

        logits, aux = model.forward_with_aux(images)
        loss = ce(logits, target) + (model.aux_weight * ce(aux, target) if aux is not None else 0)

    Inputs of any size work: they are zero-padded (bottom/right) to a multiple of ``pad_multiple`` before the
    backbone and the logits are cropped back.

    Args:
        backbone: module mapping (N, C, H, W) to a list of NCHW maps, finest first (e.g. a timm features model).
        decoder: module mapping the (adapted) list of maps to logits at the finest map's resolution.
        neck: optional module between backbone and decoder (a `PlainPyramidAdapter` for plain backbones).
        aux_head: optional auxiliary head (e.g. `FCNHead`) reading the same list of maps as the decoder.
        aux_weight: weight of the auxiliary loss, kept here for the training task to read.
        pad_multiple: pad H and W up to a multiple of this (the backbone's largest stride); 1 disables padding.
        feature_channels: channels of the maps the decoder sees (for inspection).
        feature_strides: strides of the maps the decoder sees (for inspection).
        pretrained_cfg: the backbone's timm ``pretrained_cfg`` (mean/std for the data pipeline).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: nn.Module,
        neck: nn.Module | None = None,
        aux_head: nn.Module | None = None,
        aux_weight: float = 0.4,
        pad_multiple: int = 1,
        feature_channels: Sequence[int] = (),
        feature_strides: Sequence[int] = (),
        pretrained_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        self.backbone = backbone
        self.neck = neck if neck is not None else nn.Identity()
        self.decoder = decoder
        self.aux_head = aux_head
        self.aux_weight = float(aux_weight)
        self.pad_multiple = int(pad_multiple)
        self.num_classes = int(getattr(decoder, "num_classes", 0)) or None
        self.feature_channels = list(feature_channels)
        self.feature_strides = list(feature_strides)
        self.pretrained_cfg = dict(pretrained_cfg or {})

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone + neck: the list of maps (finest first) that the decoder and auxiliary head read.

        ``x`` must already be a multiple of ``pad_multiple`` where the backbone needs it (``forward`` pads).
        """
        return self.neck(list(self.backbone(x)))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.pad_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    @staticmethod
    def _to_input_size(logits: torch.Tensor, padded: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        return resize(logits, padded)[..., : size[0], : size[1]]

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and auxiliary logits, both (N, num_classes, H, W); the second is None without an aux head."""
        size = x.shape[-2:]
        xp = self._pad(x)
        features = self.forward_features(xp)
        logits = self._to_input_size(self.decoder(features), xp.shape[-2:], size)
        aux = None
        if self.aux_head is not None:
            aux = self._to_input_size(self.aux_head(features), xp.shape[-2:], size)
        return logits, aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes, H, W) at the input resolution (the auxiliary head is not run)."""
        size = x.shape[-2:]
        xp = self._pad(x)
        return self._to_input_size(self.decoder(self.forward_features(xp)), xp.shape[-2:], size)


def _create_features(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(..., features_only=True)``, adding ``dynamic_img_size=True`` where the model accepts
    it (ViT-like models then take any input size)."""
    if "dynamic_img_size" not in kwargs:
        try:
            return timm.create_model(
                name, pretrained=pretrained, features_only=True, dynamic_img_size=True, **kwargs
            )
        except TypeError as e:
            if "dynamic_img_size" not in str(e):
                raise
    return timm.create_model(name, pretrained=pretrained, features_only=True, **kwargs)


def _evenly_spaced(n: int, k: int = 4) -> list[int]:
    """``k`` block indices ending at the last block, evenly spaced (24 blocks -> 5, 11, 17, 23); with fewer than
    ``k`` blocks, the last block alone (the pyramid adapter then shares it between its branches)."""
    if n < k:
        return [n - 1]
    return [(i + 1) * n // k - 1 for i in range(k)]


class _SelectFeatures(nn.Module):
    """Keep only the maps at ``indices`` of a features model's output (e.g. drop ResNet's stride-2 map)."""

    def __init__(self, model: nn.Module, indices: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.indices = list(indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.model(x)
        return [features[i] for i in self.indices]


def create_feature_backbone(name: str, pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, bool]:
    """Build a timm ``features_only`` backbone returning NCHW maps, finest first.

    ``out_indices`` in ``kwargs`` selects levels as in timm. Without it, plain backbones (every level at the same
    reduction, e.g. Vim, ViT) return four evenly spaced blocks (24 blocks: 5, 11, 17, 23) and hierarchical ones
    their last four levels (strides 4, 8, 16, 32 for ResNet, ConvNeXt, VMamba).

    Returns:
        ``(module, is_plain)``; ``module.feature_info.channels()`` / ``.reduction()`` describe its outputs and
        ``module.pretrained_cfg`` its data config.
    """
    for key in ("features_only", "feature_cls"):
        if key in kwargs:
            raise ValueError(f"backbone_kwargs may not set {key!r}: create_segmentation_model manages it")
    user_indices = "out_indices" in kwargs
    try:
        features = _create_features(name, pretrained, kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(
                f"unknown backbone {name!r}: use a timm model name (see timm.list_models()) or one of ours "
                f"(import vmamba registers vim_*, vmamba_* and vssd_*)"
            ) from e
        raise
    reductions = features.feature_info.reduction()
    is_plain = len(set(reductions)) == 1
    if user_indices:
        return features, is_plain
    if is_plain:
        # timm's default for ViT-like models is the last few blocks; ask for evenly spaced ones instead.
        all_levels = getattr(getattr(features, "model", None), "feature_info", None)
        if isinstance(all_levels, list):
            wanted = _evenly_spaced(len(all_levels))
            if list(getattr(features, "out_indices", ())) != wanted:
                features = _create_features(name, pretrained, dict(kwargs, out_indices=wanted))
    elif len(reductions) > 4:
        keep = list(range(len(reductions) - 4, len(reductions)))
        selected = _SelectFeatures(features, keep)
        selected.feature_info = features.feature_info.from_other(features.feature_info.out_indices[-4:])
        selected.pretrained_cfg = getattr(features, "pretrained_cfg", None)
        features = selected
    return features, is_plain


def _build_decoder(
    name: str, in_channels: list[int], in_strides: list[int], num_classes: int, kwargs: dict[str, Any]
) -> nn.Module:
    builders: dict[str, Callable[..., nn.Module]] = {
        "upernet": UperNetHead,
        "fpn": functools.partial(FPNHead, in_strides=in_strides),
        "conv": ConvHead,
        "linear": functools.partial(ConvHead, num_convs=0),
    }
    if name not in builders:
        raise ValueError(f"unknown decoder {name!r}; choose one of {sorted(builders)}")
    return builders[name](in_channels=in_channels, num_classes=num_classes, **kwargs)


#: Decoder names accepted by `create_segmentation_model`.
DECODERS: tuple[str, ...] = ("upernet", "fpn", "conv", "linear")


def create_segmentation_model(
    backbone: str,
    num_classes: int,
    decoder: str = "upernet",
    pretrained: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    *,
    aux_head: bool = False,
    aux_kwargs: dict[str, Any] | None = None,
    aux_weight: float = 0.4,
    pyramid_strides: Sequence[int] = (4, 8, 16, 32),
    **decoder_kwargs: Any,
) -> SegmentationModel:
    """Build a segmentation model mapping (N, C, H, W) images to (N, num_classes, H, W) logits.

    Args:
        backbone: timm model name with feature support (``vim_tiny_patch16_224``, ``vmamba_tiny_s1l8``,
            ``convnext_tiny``, ``vit_small_patch16_224``, ...).
        num_classes: number of classes (150 for ADE20K).
        decoder: ``"upernet"`` (default; 512 channels), ``"fpn"`` (light Semantic FPN), ``"conv"`` (concat +
            3x3 conv) or ``"linear"`` (concat + BN + 1x1).
        pretrained: load the backbone's pretrained weights through timm.
        backbone_kwargs: extra ``timm.create_model`` kwargs (``out_indices``, ``drop_path_rate``, ``img_size``...).
            ``dynamic_img_size=True`` is passed by default where the model accepts it.
        aux_head: add an auxiliary `FCNHead` (read it with ``forward_with_aux``).
        aux_kwargs: `FCNHead` kwargs (``in_index`` defaults to the second-deepest level, ``channels`` to 256).
        aux_weight: auxiliary loss weight stored on the model (0.4 in the UperNet recipes).
        pyramid_strides: output strides of the plain-backbone pyramid (ignored for hierarchical backbones).
        **decoder_kwargs: decoder kwargs, e.g. ``channels=192`` (Vim-Ti's published UperNet width),
            ``pool_scales``, ``dropout``, ``norm_layer``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    features, is_plain = create_feature_backbone(
        backbone, pretrained=pretrained, **dict(backbone_kwargs or {})
    )
    channels, strides = features.feature_info.channels(), features.feature_info.reduction()
    pad_multiple = max(strides)
    neck = None
    if is_plain:
        neck = PlainPyramidAdapter(channels, in_stride=strides[0], out_strides=pyramid_strides)
        channels, strides = list(neck.out_channels), list(neck.out_strides)
    head = _build_decoder(decoder, channels, strides, num_classes, decoder_kwargs)
    aux = None
    if aux_head:
        aux_kwargs = dict(aux_kwargs or {})
        in_index = aux_kwargs.pop("in_index", max(0, len(channels) - 2))
        if not -len(channels) <= in_index < len(channels):
            raise ValueError(f"aux in_index {in_index} is out of range for {len(channels)} feature maps")
        aux = FCNHead(channels[in_index], num_classes, in_index=in_index, **aux_kwargs)
    return SegmentationModel(
        features,
        head,
        neck=neck,
        aux_head=aux,
        aux_weight=aux_weight,
        pad_multiple=pad_multiple,
        feature_channels=channels,
        feature_strides=strides,
        pretrained_cfg=getattr(features, "pretrained_cfg", None),
    )
