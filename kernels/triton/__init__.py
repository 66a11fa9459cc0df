"""Triton backend of the selective scan: fused GPU kernels (forward, backward, multi-direction).

Registers the ``"triton"`` backend on import without importing triton: Triton is probed lazily, the first
time a CUDA tensor (or, under ``TRITON_INTERPRET=1``, a CPU tensor) asks for it, so ``import vmamba`` and
the CPU path never need a working Triton. Any failure of the probe (triton not installed, older than 3.1,
no active driver, an error while importing our kernels) makes the backend unavailable; the reason is kept
for the error message of an explicit ``backend="triton"``. The kernels run on CUDA tensors, and on CPU
tensors under Triton's interpreter when ``TRITON_INTERPRET=1`` is in the environment before Python starts
(slow; that is how the tests check them without a GPU).

:func:`triton_multi_direction_scan` runs K scan directions (Vim's forward/backward, VMamba's cross-scan)
in one launch without materialising the reordered sequences; :func:`triton_bidirectional_conv1d` is Vim's
fused two-direction causal conv1d + SiLU, :func:`triton_add_rms_norm` the residual add fused with RMSNorm. They, ``triton_scan_forward``, ``triton_scan_backward`` and
``INTERPRETED`` are attributes of this module that trigger the probe when first read (None, or False for
``INTERPRETED``, where Triton is unavailable).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from ..backends import ScanBackend, register_backend

__all__ = [
    "INTERPRETED",
    "is_available",
    "probe",
    "triton_add_rms_norm",
    "triton_bidirectional_conv1d",
    "triton_multi_direction_scan",
    "unavailable_reason",
]

MIN_TRITON = (3, 1)
_LAZY_NAMES = (
    "INTERPRETED",
    "triton_scan_forward",
    "triton_scan_backward",
    "triton_multi_direction_scan",
    "triton_bidirectional_conv1d",
    "triton_add_rms_norm",
)
_PROBE: SimpleNamespace | None = None


def _version_tuple(version: str) -> tuple[int, ...]:
    """'3.1.0+git1234' -> (3, 1, 0): the leading numeric fields of a version string."""
    fields = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        fields.append(int(digits))
    return tuple(fields)


def probe() -> SimpleNamespace:
    """Import triton and our kernels once; the result holds the kernels, or ``error`` saying why not.

    Every exception counts as "not available": a missing package, an old release, ``RuntimeError: 0 active
    drivers`` on a machine without a GPU driver, or a triton too old or too new for these kernels.
    """
    global _PROBE
    if _PROBE is not None:
        return _PROBE
    result = SimpleNamespace(error=None, **dict.fromkeys(_LAZY_NAMES))
    result.INTERPRETED = False
    try:
        import triton  # the top-level package: this module is vmamba.kernels.triton

        version = getattr(triton, "__version__", "0")
        if _version_tuple(version) < MIN_TRITON:
            needed = ".".join(map(str, MIN_TRITON))
            raise ImportError(f"triton {version} is installed, these kernels need triton >= {needed}")
        from ._common import INTERPRETED
        from .conv1d import triton_bidirectional_conv1d
        from .multi_direction import triton_multi_direction_scan, triton_scan_backward, triton_scan_forward
        from .rms_norm import triton_add_rms_norm
    except Exception as error:  # any failure means: no Triton here
        result.error = error
    else:
        result.INTERPRETED = INTERPRETED
        result.triton_scan_forward = triton_scan_forward
        result.triton_scan_backward = triton_scan_backward
        result.triton_multi_direction_scan = triton_multi_direction_scan
        result.triton_bidirectional_conv1d = triton_bidirectional_conv1d
        result.triton_add_rms_norm = triton_add_rms_norm
    _PROBE = result
    return result


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(probe(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available(device: torch.device) -> bool:
    """True for CUDA devices when Triton works; for CPU only under the interpreter (TRITON_INTERPRET=1).

    Probes Triton only for those two cases, so CPU tensors without the interpreter never import it.
    """
    if device.type == "cuda":
        return probe().error is None
    if device.type == "cpu" and _interpret_requested():
        result = probe()
        return result.error is None and result.INTERPRETED
    return False


def unavailable_reason(device: torch.device) -> str:
    """Why :func:`is_available` is False for ``device``, and what to do about it."""
    if device.type == "cuda" or (device.type == "cpu" and _interpret_requested()):
        error = probe().error
        if error is not None:
            return (
                f"triton is not importable or does not work here ({type(error).__name__}: {error}); the "
                f"kernels need triton >= {'.'.join(map(str, MIN_TRITON))} (pip install triton, Linux) and, "
                "outside TRITON_INTERPRET=1, a CUDA driver"
            )
    if device.type == "cpu":
        if _interpret_requested():
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


def _kernel(name: str):
    """A function that calls the kernel ``name`` (probing Triton first); the backend only calls it once
    :func:`is_available` said yes."""

    def call(*args, **kwargs):
        function = getattr(probe(), name)
        if function is None:
            raise RuntimeError(
                f"the 'triton' selective-scan backend is unavailable: {unavailable_reason(torch.device('cuda'))}"
            )
        return function(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


register_backend(
    ScanBackend(
        "triton",
        _kernel("triton_scan_forward"),
        _kernel("triton_scan_backward"),
        is_available,
        unavailable_reason,
        multi_direction=_kernel("triton_multi_direction_scan"),
        multi_direction_low_rank=True,
    )
)
