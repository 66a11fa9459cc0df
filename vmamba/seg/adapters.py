"""Multi-scale pyramid for plain (single-stride) backbones such as Vim or ViT.

A plain backbone returns maps from several blocks at one stride (16 for patch-16 Vim, 8 for the stride-8 "+"
models). UperNet and FPN want a pyramid at strides 4, 8, 16, 32, so each map is resampled by its own branch, as in
Vim's (and BEiT's) segmentation backbone: transposed 2x2 convolutions to go finer (with BN + GELU between two of
them), identity at the backbone's stride, max-pooling to go coarser. For patch 16 that is deconv-BN-GELU-deconv
(stride 4), deconv (8), identity (16), maxpool 2 (32); for stride 8 it is deconv (4), identity (8), maxpool 2 (16),
maxpool 4 (32). Pooling uses ``ceil_mode=True`` so odd maps keep their border (a 63-token stride-8 map at 512
pixels pools to 32 and 16, the sizes a stride-16/32 map of that image has) and tiny maps never pool to zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PlainPyramidAdapter"]


def _log2_ratio(num: int, den: int) -> int:
    """Exact log2(num / den) for a power-of-two ratio, else ValueError."""
    ratio = num / den
    k = round(math.log2(ratio)) if ratio > 0 else 0
    if ratio <= 0 or 2.0**k != ratio:
        raise ValueError(
            f"PlainPyramidAdapter needs power-of-two ratios between the backbone stride and the output strides; "
            f"got backbone stride {den} and output stride {num}. Pass out_strides that are the backbone stride "
            f"times powers of two."
        )
    return k


def _branch(
    channels: int, in_stride: int, out_stride: int, norm_layer: type[nn.Module], act_layer: type[nn.Module]
) -> nn.Module:
    """One resampling branch from ``in_stride`` to ``out_stride``."""
    k = _log2_ratio(out_stride, in_stride)
    if k == 0:
        return nn.Identity()
    if k > 0:
        return nn.MaxPool2d(kernel_size=2**k, stride=2**k, ceil_mode=True)
    layers: list[nn.Module] = []
    for i in range(-k):
        if i > 0:
            layers += [norm_layer(channels), act_layer()]
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class PlainPyramidAdapter(nn.Module):
    """Turn N same-stride maps into a pyramid at ``out_strides`` (one branch per output level).

    Args:
        in_channels: channels of each input map (one entry per map; a single map is shared by every branch).
        in_stride: stride (reduction) of the input maps, e.g. 16 for a patch-16 Vim.
        out_strides: stride of each output level, finest first.
        norm_layer: norm between two transposed convs (BatchNorm2d; Vim uses SyncBatchNorm on multi-GPU).
        act_layer: activation between two transposed convs.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_stride: int,
        out_strides: Sequence[int] = (4, 8, 16, 32),
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        out_strides = [int(s) for s in out_strides]
        if len(in_channels) not in (1, len(out_strides)):
            raise ValueError(
                f"PlainPyramidAdapter got {len(in_channels)} input maps for {len(out_strides)} output strides; "
                f"give one map, or one per output stride"
            )
        if len(in_channels) == 1:
            in_channels = in_channels * len(out_strides)
        self.in_stride = int(in_stride)
        self.out_strides = out_strides
        self.out_channels = in_channels
        self.branches = nn.ModuleList(
            _branch(c, self.in_stride, s, norm_layer, act_layer) for c, s in zip(in_channels, out_strides)
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Map the backbone's same-stride maps to the pyramid, finest first."""
        if len(features) == 1:
            features = list(features) * len(self.branches)
        if len(features) != len(self.branches):
            raise ValueError(f"PlainPyramidAdapter expects {len(self.branches)} maps, got {len(features)}")
        return [branch(f) for branch, f in zip(self.branches, features)]
