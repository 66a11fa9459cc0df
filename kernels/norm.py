"""RMSNorm and the residual add fused with it (mamba_ssm's ``fused_add_norm``), the norms of Vim's blocks."""

import torch
from torch import Tensor

from . import triton as _triton
from .eager import triton_kernels_run

__all__ = ["add_rms_norm", "rms_norm"]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight``, computed in (at least) float32, returned in x's dtype."""
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(math_dtype)
    # Written out rather than F.rms_norm: torch 2.5's export specialises the batch size inside F.rms_norm.
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.to(math_dtype)).to(x.dtype)


@torch.jit.ignore  # TorchScript leaves it to Python, so scripted models take the same kernels as eager ones
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add fused with the norm that follows it.

    Returns ``(rms_norm(residual + x), residual + x)``: the sum is formed in the residual's dtype (float32
    for Vim's residual stream) and normalised in float32; the norm comes back in the residual's dtype. On
    CUDA tensors (when Triton works, outside compile and export) one Triton kernel does both in one pass
    (:mod:`.triton.rms_norm`); elsewhere, the PyTorch ops.
    """
    if triton_kernels_run(x, residual, weight):
        return _triton.triton_add_rms_norm(x, residual, weight, eps)
    total = residual + x.to(residual.dtype)
    return rms_norm(total, weight, eps), total
