"""vmamba.kernels: the selective-scan operator and multi-direction scans (torch and triton only).

>>> from vmamba.kernels import selective_scan
>>> out = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

See ``docs/kernels.md`` for the semantics and for which backend runs when.
"""

from .backends import BACKEND_ENV_VAR, BACKEND_NAMES, ScanBackend, available_backends, register_backend
from .conv1d import bidirectional_causal_conv1d, bidirectional_causal_conv1d_reference
from .decompositions import decompose_scans, scan_decompositions
from .directions import multi_direction_selective_scan
from .eager import is_eager_cpu, is_eager_cpu_inference
from .non_causal_ssd import non_causal_ssd, non_causal_ssd_reference
from .norm import add_rms_norm, rms_norm
from .reference import selective_scan_reference
from .selective_scan import check_scan_inputs, selective_scan
from .ssd import bidirectional_ssd_scan, multi_direction_ssd_scan, ssd_scan
from .ssd_reference import ssd_scan_reference
from .token_orders import DIRECTIONS, VIM_DIRECTIONS, VMAMBA_DIRECTIONS, from_directions, to_directions

__all__ = [
    "BACKEND_ENV_VAR",
    "BACKEND_NAMES",
    "DIRECTIONS",
    "VIM_DIRECTIONS",
    "VMAMBA_DIRECTIONS",
    "ScanBackend",
    "add_rms_norm",
    "available_backends",
    "bidirectional_causal_conv1d",
    "bidirectional_causal_conv1d_reference",
    "bidirectional_ssd_scan",
    "check_scan_inputs",
    "decompose_scans",
    "from_directions",
    "is_eager_cpu",
    "is_eager_cpu_inference",
    "multi_direction_selective_scan",
    "multi_direction_ssd_scan",
    "non_causal_ssd",
    "non_causal_ssd_reference",
    "register_backend",
    "rms_norm",
    "scan_decompositions",
    "selective_scan",
    "selective_scan_reference",
    "ssd_scan",
    "ssd_scan_reference",
    "to_directions",
]
