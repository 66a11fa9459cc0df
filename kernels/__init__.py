"""vmamba.kernels: the selective-scan operator and multi-direction scans (torch and triton only).

>>> from vmamba.kernels import selective_scan
>>> out = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

See ``docs/kernels.md`` for the semantics and for which backend runs when.
"""

from .backends import BACKEND_ENV_VAR, BACKEND_NAMES, ScanBackend, available_backends, register_backend
from .directions import multi_direction_selective_scan
from .reference import selective_scan_reference
from .selective_scan import check_scan_inputs, selective_scan
from .token_orders import DIRECTIONS, VIM_DIRECTIONS, VMAMBA_DIRECTIONS, from_directions, to_directions

__all__ = [
    "BACKEND_ENV_VAR",
    "BACKEND_NAMES",
    "DIRECTIONS",
    "VIM_DIRECTIONS",
    "VMAMBA_DIRECTIONS",
    "ScanBackend",
    "available_backends",
    "check_scan_inputs",
    "from_directions",
    "multi_direction_selective_scan",
    "register_backend",
    "selective_scan",
    "selective_scan_reference",
    "to_directions",
]
