"""Segmentation decoders over a list of NCHW feature maps (finest first).

Every decoder takes ``features: list[Tensor]`` ordered from the finest (smallest stride) to the coarsest map and
returns class logits at the resolution of ``features[0]``; `vmamba.seg.SegmentationModel` resizes them to the input.

- `UperNetHead`: pyramid pooling on the deepest map + FPN lateral/top-down fusion (Xiao et al., "Unified
  Perceptual Parsing", ECCV 2018), laid out as the mmsegmentation ``UPerHead`` used by the Vim, VMamba and Swin
  ADE20K setups (3x3 fusion convs, BN + ReLU, dropout 0.1 before a 1x1 classifier).
- `FPNHead`: a light Semantic-FPN head (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019).
- `ConvHead`: upsample-and-concatenate baseline; ``num_convs=0`` is the linear (BN + 1x1) probe head.
- `FCNHead`: auxiliary head on one level, for the 0.4-weighted auxiliary loss of the UperNet recipes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvNormAct", "PyramidPoolingModule", "UperNetHead", "FPNHead", "ConvHead", "FCNHead", "resize"]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize ``x`` (N, C, H, W) to ``size`` (align_corners=False); a no-op when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> norm -> activation, the building block of all decoders here."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm_layer(out_channels),
            act_layer(),
        )


def _init_decoder_weights(module: nn.Module, classifier: nn.Conv2d) -> None:
    """Kaiming-normal (fan_out) for hidden convs, N(0, 0.01) for the classifier, as mmseg's ConvModule/conv_seg."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m is not classifier:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)


class _DecodeHead(nn.Module):
    """Dropout2d + 1x1 classifier shared by the decoders (mmseg's ``cls_seg``)."""

    def _build_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Map decoder features (N, channels, h, w) to logits (N, num_classes, h, w)."""
        return self.classifier(self.dropout(x))


def _check_in_channels(in_channels: Sequence[int]) -> list[int]:
    in_channels = [int(c) for c in in_channels]
    if not in_channels or min(in_channels) < 1:
        raise ValueError(f"in_channels must be a non-empty list of positive ints, got {in_channels}")
    return in_channels


def _check_num_features(features: Sequence[torch.Tensor], expected: int, name: str) -> None:
    if len(features) != expected:
        raise ValueError(f"{name} was built for {expected} feature maps but got {len(features)}")


class PyramidPoolingModule(nn.Module):
    """PSPNet pyramid pooling: average-pool to each scale, 1x1 conv, upsample, concat with the input, 3x3 fuse."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(scale), ConvNormAct(in_channels, channels, 1, norm_layer, act_layer)
            )
            for scale in pool_scales
        )
        self.bottleneck = ConvNormAct(
            in_channels + len(pool_scales) * channels, channels, 3, norm_layer, act_layer
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [resize(stage(x), size) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(_DecodeHead):
    """UperNet decoder: PPM on the deepest map, FPN lateral + top-down fusion, concat of all levels, 3x3 fuse.

    Args:
        in_channels: channels of each input map, finest first.
        num_classes: number of output classes.
        channels: width of every decoder conv (512 in the Swin/VMamba ADE20K setups, 192 in Vim-Ti's).
        pool_scales: output sizes of the pyramid pooling branches.
        dropout: Dropout2d rate before the classifier.
        norm_layer: normalisation after each conv (convert to SyncBatchNorm for multi-GPU training).
        act_layer: activation after each norm.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        in_channels = _check_in_channels(in_channels)
        self.in_channels = in_channels
        self.ppm = PyramidPoolingModule(in_channels[-1], channels, pool_scales, norm_layer, act_layer)
        self.lateral_convs = nn.ModuleList(
            ConvNormAct(c, channels, 1, norm_layer, act_layer) for c in in_channels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            ConvNormAct(channels, channels, 3, norm_layer, act_layer) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, norm_layer, act_layer)
        self._build_classifier(channels, num_classes, dropout)
        _init_decoder_weights(self, self.classifier)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits (N, num_classes, H0, W0) at the resolution of ``features[0]``."""
        _check_num_features(features, len(self.in_channels), type(self).__name__)
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.ppm(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1))
        return self.classify(fused)


class FPNHead(_DecodeHead):
    """Light Semantic-FPN decoder: FPN (1x1 lateral, top-down sum, 3x3 smooth), then per-level upsampling branches
    (3x3 conv + 2x bilinear until the finest stride) summed into one map.

    Args:
        in_channels: channels of each input map, finest first.
        in_strides: stride of each input map (e.g. 4, 8, 16, 32); sets how many upsampling steps each branch has.
        num_classes: number of output classes.
        fpn_channels: width of the FPN maps.
        channels: width of the upsampling branches and of the classifier input.
        dropout: Dropout2d rate before the classifier.
        norm_layer: normalisation in the upsampling branches (the FPN convs have bias and no norm, as in the paper).
        act_layer: activation in the upsampling branches.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        fpn_channels: int = 256,
        channels: int = 128,
        dropout: float = 0.1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        in_channels = _check_in_channels(in_channels)
        in_strides = [int(s) for s in in_strides]
        if len(in_strides) != len(in_channels) or any(b < a for a, b in zip(in_strides, in_strides[1:])):
            raise ValueError(
                f"in_strides must give one non-decreasing stride per input map, got {in_strides} "
                f"for {len(in_channels)} maps"
            )
        self.in_channels = in_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1) for _ in in_channels
        )
        self.scale_heads = nn.ModuleList()
        for stride in in_strides:
            num_up = max(0, round(math.log2(stride / in_strides[0])))
            layers: list[nn.Module] = []
            for j in range(max(1, num_up)):
                layers.append(
                    ConvNormAct(fpn_channels if j == 0 else channels, channels, 3, norm_layer, act_layer)
                )
                if j < num_up:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self._build_classifier(channels, num_classes, dropout)
        _init_decoder_weights(self, self.classifier)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits (N, num_classes, H0, W0) at the resolution of ``features[0]``."""
        _check_num_features(features, len(self.in_channels), type(self).__name__)
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        size = laterals[0].shape[-2:]
        out = 0
        for lat, smooth, head in zip(laterals, self.fpn_convs, self.scale_heads):
            out = out + resize(head(smooth(lat)), size)
        return self.classify(out)


class ConvHead(_DecodeHead):
    """Baseline head: upsample every map to the finest one, concatenate, then ``num_convs`` ConvNormAct layers and
    a 1x1 classifier. ``num_convs=0`` gives the linear probe head (BatchNorm on the concatenation + 1x1 conv).

    Args:
        in_channels: channels of each input map, finest first.
        num_classes: number of output classes.
        channels: width of the hidden convs (unused when ``num_convs=0``).
        num_convs: number of hidden ConvNormAct layers.
        kernel_size: kernel size of the hidden convs.
        dropout: Dropout2d rate before the classifier.
        norm_layer: normalisation layer.
        act_layer: activation after each hidden conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        kernel_size: int = 3,
        dropout: float = 0.1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        in_channels = _check_in_channels(in_channels)
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        self.in_channels = in_channels
        total = sum(in_channels)
        if num_convs == 0:
            self.convs = norm_layer(total)
            out_channels = total
        else:
            self.convs = nn.Sequential(
                *(
                    ConvNormAct(total if i == 0 else channels, channels, kernel_size, norm_layer, act_layer)
                    for i in range(num_convs)
                )
            )
            out_channels = channels
        self._build_classifier(out_channels, num_classes, dropout)
        _init_decoder_weights(self, self.classifier)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits (N, num_classes, H0, W0) at the resolution of ``features[0]``."""
        _check_num_features(features, len(self.in_channels), type(self).__name__)
        size = features[0].shape[-2:]
        x = torch.cat([resize(f, size) for f in features], dim=1)
        return self.classify(self.convs(x))


class FCNHead(_DecodeHead):
    """Auxiliary FCN head on one feature level (mmseg ``FCNHead``): ``num_convs`` 3x3 ConvNormAct, optional
    concatenation with the input, dropout, 1x1 classifier.

    Args:
        in_channels: channels of the selected map.
        num_classes: number of output classes.
        in_index: which entry of the feature list to read (the UperNet recipes use the stride-16 map, index 2).
        channels: width of the hidden convs.
        num_convs: number of hidden convs (>= 1).
        concat_input: concatenate the input with the conv output before a final 3x3 ConvNormAct.
        dropout: Dropout2d rate before the classifier.
        norm_layer: normalisation layer.
        act_layer: activation layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        in_index: int = 2,
        channels: int = 256,
        num_convs: int = 1,
        concat_input: bool = False,
        dropout: float = 0.1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs num_convs >= 1, got {num_convs}")
        self.in_index = in_index
        self.convs = nn.Sequential(
            *(
                ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm_layer, act_layer)
                for i in range(num_convs)
            )
        )
        self.concat = (
            ConvNormAct(in_channels + channels, channels, 3, norm_layer, act_layer) if concat_input else None
        )
        self._build_classifier(channels, num_classes, dropout)
        _init_decoder_weights(self, self.classifier)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits (N, num_classes, h, w) at the resolution of ``features[in_index]``."""
        x = features[self.in_index]
        out = self.convs(x)
        if self.concat is not None:
            out = self.concat(torch.cat([x, out], dim=1))
        return self.classify(out)
