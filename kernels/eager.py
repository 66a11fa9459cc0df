"""When the eager fast paths may run: outside tracing, compile and export (and, for some, autograd).

The C++ ops and the Triton kernels (with their own autograd functions) cannot be traced or exported:
they run only where :func:`is_eager_cpu` or :func:`triton_kernels_run` says so. GEMMs that write into
slices of one output with ``out=`` are not differentiable either: they run only where
:func:`is_eager_cpu_inference` says so. Everywhere else the callers take their differentiable, exportable
PyTorch form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton as _triton

__all__ = [
    "is_eager_cpu",
    "is_eager_cpu_activations",
    "is_eager_cpu_inference",
    "is_tracing",
    "triton_kernels_run",
]


def is_tracing() -> bool:
    """Whether a tracer (TorchScript, ONNX export), ``torch.compile`` or ``torch.export`` is running."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def is_eager_cpu(*tensors: Tensor | None, dtype: torch.dtype = torch.float32) -> bool:
    """True when every given tensor is a real CPU tensor of ``dtype`` and no tracer (TorchScript, FX),
    ``torch.compile`` or exporter is running: where a C++ op with its own autograd function may run."""
    present = [t for t in tensors if t is not None]
    if not all(isinstance(t, Tensor) for t in present):  # e.g. FX proxies
        return False
    if any(t.device.type != "cpu" or t.dtype != dtype for t in present):
        return False
    return not is_tracing()


# The activation dtypes of the C++ paths: half precision (autocast's) is converted to float32 on the way in.
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_eager_cpu_activations(params, activations) -> bool:
    """:func:`is_eager_cpu` for float32 parameters and activations in float32 or, as CPU autocast makes
    them, bfloat16 or float16: where a C++ op that computes in float32 may run. None entries are skipped."""
    present = [t for t in activations if t is not None]
    if not all(
        isinstance(t, Tensor) and t.device.type == "cpu" and t.dtype in _ACTIVATION_DTYPES for t in present
    ):
        return False
    return is_eager_cpu(*params)  # the parameters, and the one check for tracing


def is_eager_cpu_inference(*tensors: Tensor | None, dtype: torch.dtype = torch.float32) -> bool:
    """:func:`is_eager_cpu`, and no autograd graph is being recorded for any of the tensors: where paths
    that are not differentiable at all (``out=`` GEMMs into slices) may run."""
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in present):
        return False
    return is_eager_cpu(*present, dtype=dtype)


def triton_kernels_run(*tensors: Tensor | None) -> bool:
    """True when every given tensor is a CUDA tensor of at most float32 precision (the kernels compute in
    float32), Triton works on its device, and no tracer, compiler or exporter is running."""
    present = [t for t in tensors if t is not None]
    if not present or not all(
        isinstance(t, Tensor) and t.is_cuda and t.dtype != torch.float64 for t in present
    ):
        return False
    return not is_tracing() and _triton.is_available(present[0].device)
