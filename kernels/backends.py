"""Registry of selective-scan backends and the rule that picks one.

``"reference"`` (the sequential loop, autograd through it) is always there and is not registered: it
bypasses the custom op. Every other backend is a pair of functions with one calling convention (B and C always grouped, 4-D):

- ``forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> (out, last_state)``, ``out`` in
  u's dtype and ``last_state`` (batch, dim, N) in the math dtype (float64 for float64 input, else float32);
- ``backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
  -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``, each in its input's dtype, None for absent inputs.

``"auto"`` takes the first available backend in :data:`AUTO_ORDER` for the tensors' device; the
environment variable ``VMAMBA_SCAN_BACKEND`` overrides ``"auto"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "AUTO_ORDER",
    "BACKEND_ENV_VAR",
    "BACKEND_NAMES",
    "ScanBackend",
    "available_backends",
    "get_backend",
    "register_backend",
    "requested_backend",
    "resolve_backend",
]

BACKEND_ENV_VAR = "VMAMBA_SCAN_BACKEND"
BACKEND_NAMES = ("auto", "reference", "cpu", "torch", "triton")
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}


@dataclass(frozen=True)
class ScanBackend:
    """One implementation of the scan: its name, its two passes, and whether it runs on a device now."""

    name: str
    forward: Callable
    backward: Callable
    is_available: Callable[[torch.device], bool]
    unavailable_reason: Callable[[torch.device], str] = lambda device: "not available"
    # Optional fused multi-direction scan with the signature of
    # ``vmamba.kernels.multi_direction_selective_scan`` (without ``backend``); None: one grouped scan call.
    multi_direction: Callable | None = None
    # Whether that hook takes ``delta_proj_weight`` (low-rank step inputs); if not, delta is projected first.
    multi_direction_low_rank: bool = False


_REGISTRY: dict[str, ScanBackend] = {}


def register_backend(backend: ScanBackend) -> None:
    """Add or replace a backend under its name (one of :data:`BACKEND_NAMES` other than 'auto')."""
    if backend.name not in BACKEND_NAMES or backend.name in ("auto", "reference"):
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {backend.name!r}")
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> ScanBackend:
    """The registered backend called ``name`` (not 'auto': see :func:`resolve_backend`)."""
    _load_optional_backends()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown selective-scan backend {name!r}; expected one of {BACKEND_NAMES} "
            f"(registered here: {sorted(_REGISTRY)})"
        )
    return _REGISTRY[name]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run tensors on ``device`` in this process."""
    _load_optional_backends()
    device = torch.device(device)
    return ["reference"] + [name for name, b in _REGISTRY.items() if b.is_available(device)]


def requested_backend(name: str) -> str:
    """``name`` checked against :data:`BACKEND_NAMES`, with the environment override applied to 'auto'.

    Cheap and side-effect free (no availability check), so it is safe inside ``torch.compile``.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown selective-scan backend {name!r}; expected one of {BACKEND_NAMES}")
    if name == "auto":
        name = os.environ.get(BACKEND_ENV_VAR, "").strip() or "auto"
        if name not in BACKEND_NAMES:
            raise ValueError(
                f"environment variable {BACKEND_ENV_VAR}={name!r} is not a backend; "
                f"expected one of {BACKEND_NAMES}"
            )
    return name


def resolve_backend(name: str, device: torch.device) -> ScanBackend | None:
    """The backend to use for ``name`` on ``device``, after the environment override for 'auto'.

    Returns None for 'reference', which runs outside the registry.
    """
    name = requested_backend(name)
    if name == "reference":
        return None
    if name == "auto":
        _load_optional_backends()
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            backend = _REGISTRY.get(candidate)
            if backend is not None and backend.is_available(device):
                return backend
        return _REGISTRY["torch"]
    backend = get_backend(name)
    if not backend.is_available(device):
        raise ValueError(
            f"selective-scan backend {name!r} cannot run on {device.type} tensors here: "
            f"{backend.unavailable_reason(device)}. Use backend='auto' or one of "
            f"{available_backends(device)}."
        )
    return backend


_OPTIONAL_LOADED = False


def _load_optional_backends() -> None:
    """Import the backends that live in their own modules (they register themselves on import)."""
    global _OPTIONAL_LOADED
    if _OPTIONAL_LOADED:
        return
    _OPTIONAL_LOADED = True
    from . import cpu, triton  # noqa: F401
