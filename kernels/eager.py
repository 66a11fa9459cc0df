"""When the eager fast paths may run: plain CPU inference, outside autograd, tracing, compile and export.

Some CPU paths (the C++ convolution, GEMMs that write into slices of one output with ``out=``) are neither
differentiable nor traceable. They run only where :func:`is_eager_cpu_inference` says so; everywhere else
the callers take their differentiable, exportable PyTorch form.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_eager_cpu_inference"]


def is_eager_cpu_inference(*tensors: Tensor | None, dtype: torch.dtype = torch.float32) -> bool:
    """True when every given tensor is a CPU tensor of ``dtype``, no autograd graph is being recorded for
    any of them, and no tracer (TorchScript, FX), ``torch.compile`` or exporter is running."""
    present = [t for t in tensors if t is not None]
    if not all(isinstance(t, Tensor) for t in present):  # e.g. FX proxies
        return False
    if any(t.device.type != "cpu" or t.dtype != dtype for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())
