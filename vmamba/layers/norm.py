"""Normalisation layers shared by the Mamba backbones."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, with a learned scale and no bias.

    ``y = x / sqrt(mean(x**2) + eps) * weight``, as mamba_ssm's ``RMSNorm`` (the norm of Vim's blocks). The
    statistics and the product are computed in float32 whatever the input dtype; the result is returned in
    the input's dtype, so a float32 residual stream stays float32.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
