"""Triton backend of the selective scan: fused GPU kernels (forward, backward, multi-direction).

Registers the ``"triton"`` backend on import. Triton is optional: where it is not installed (macOS,
Windows) the backend is registered as unavailable and says why. The kernels run on CUDA tensors, and on
CPU tensors under Triton's interpreter when ``TRITON_INTERPRET=1`` is in the environment before Python
starts (slow; that is how the tests check them without a GPU).

:func:`triton_multi_direction_scan` runs K scan directions (Vim's forward/backward, VMamba's cross-scan)
in one launch without materialising the reordered sequences.
"""

from __future__ import annotations

import os

import torch

from ..backends import ScanBackend, register_backend

try:
    import triton  # noqa: F401  (the top-level package: this module is vmamba.kernels.triton)
except ImportError as error:
    _IMPORT_ERROR: Exception | None = error
else:
    _IMPORT_ERROR = None

if _IMPORT_ERROR is None:
    try:
        from ._common import INTERPRETED
        from .multi_direction import triton_multi_direction_scan, triton_scan_backward, triton_scan_forward
    except (ImportError, AttributeError) as error:  # a triton too old or too new for these kernels
        _IMPORT_ERROR = error
if _IMPORT_ERROR is not None:
    INTERPRETED = False
    triton_multi_direction_scan = triton_scan_forward = triton_scan_backward = None

__all__ = ["INTERPRETED", "is_available", "triton_multi_direction_scan", "unavailable_reason"]


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available(device: torch.device) -> bool:
    """True for CUDA devices when triton imports; for CPU only under the interpreter (TRITON_INTERPRET=1)."""
    if _IMPORT_ERROR is not None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpret_requested() and INTERPRETED


def unavailable_reason(device: torch.device) -> str:
    """Why :func:`is_available` is False for ``device``, and what to do about it."""
    if _IMPORT_ERROR is not None:
        return (
            f"triton is not importable or does not fit these kernels ({_IMPORT_ERROR!r}); triton >= 3.0 "
            "installs with pip on Linux (pip install triton)"
        )
    if device.type == "cpu":
        if _interpret_requested() and not INTERPRETED:
            return (
                "TRITON_INTERPRET=1 was set after triton had been imported, and triton reads it on import; "
                "set it in the environment before starting Python"
            )
        return (
            "set TRITON_INTERPRET=1 to run the Triton kernels on CPU (slow, for testing), or use a CUDA "
            "device"
        )
    return (
        f"the Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1), not on {device.type}"
    )


def _unavailable(*args, **kwargs):
    raise RuntimeError(
        f"the 'triton' selective-scan backend is unavailable: {unavailable_reason(torch.device('cuda'))}"
    )


register_backend(
    ScanBackend(
        "triton",
        triton_scan_forward or _unavailable,
        triton_scan_backward or _unavailable,
        is_available,
        unavailable_reason,
        multi_direction=triton_multi_direction_scan,
    )
)
