"""RMSNorm and the residual add fused with it (mamba_ssm's ``fused_add_norm``), the norms of Vim's blocks."""

import torch
from torch import Tensor

from . import triton as _triton
from .cpu import cpu_add_rms_norm, cpu_library_available
from .eager import is_eager_cpu, triton_kernels_run

__all__ = ["add_rms_norm", "rms_norm"]


def _cpu_runs(*tensors: Tensor) -> bool:
    """Whether the C++ loop takes the norm: eager float32 CPU tensors, contiguous, of one shape."""
    return (
        is_eager_cpu(*tensors)
        and all(t.is_contiguous() for t in tensors)
        and tensors[0].dim() > 0
        and all(t.shape == tensors[0].shape for t in tensors[:-1])
        and tensors[-1].shape == tensors[0].shape[-1:]
        and cpu_library_available()
    )


@torch.jit.ignore  # TorchScript leaves it to Python, so scripted models take the same kernels as eager ones
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight``, computed in (at least) float32, returned in x's dtype.

    On eager float32 CPU tensors (contiguous x) one loop of the C++ library, with an autograd function that
    keeps only x and the weight for the backward; elsewhere the PyTorch ops.
    """
    if _cpu_runs(x, weight):
        return cpu_add_rms_norm(None, x, weight, eps, False)[0]
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
    (:mod:`.triton.rms_norm`); on eager float32 CPU tensors (contiguous), one loop of the C++ library; both
    keep only the sum and the weight for the backward. Elsewhere, the PyTorch ops.
    """
    if triton_kernels_run(x, residual, weight):
        return _triton.triton_add_rms_norm(x, residual, weight, eps)
    if _cpu_runs(x, residual, weight):
        normed, total = cpu_add_rms_norm(x, residual, weight, eps, True)
        return normed, total
    total = residual + x.to(residual.dtype)
    return rms_norm(total, weight, eps), total
