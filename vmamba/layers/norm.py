"""Normalisation layers shared by the Mamba backbones: RMSNorm and the fused residual add + RMSNorm."""

import torch
from torch import Tensor, nn

from vmamba.kernels import add_rms_norm, rms_norm

__all__ = ["RMSNorm", "add_rms_norm", "rms_norm"]


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
        return rms_norm(x, self.weight, self.eps)

    def forward_add(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """``(self(residual + x), residual + x)`` in one step, see :func:`add_rms_norm`."""
        return add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
