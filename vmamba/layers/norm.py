"""Normalisation layers shared by the Mamba backbones: RMSNorm and the fused residual add + RMSNorm."""

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm", "add_rms_norm", "rms_norm"]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight``, computed in (at least) float32, returned in x's dtype."""
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(math_dtype)
    # Written out rather than F.rms_norm: torch 2.5's export specialises the batch size inside F.rms_norm.
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.to(math_dtype)).to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add fused with the norm that follows it (mamba_ssm's ``fused_add_norm``).

    Returns ``(rms_norm(residual + x), residual + x)``: the sum is formed in the residual's dtype (float32
    for Vim's residual stream) and normalised in float32; the norm comes back in the residual's dtype.
    """
    total = residual + x.to(residual.dtype)
    return rms_norm(total, weight, eps), total


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
