"""Mamba's initialisation of the selective-scan parameters, shared by the Vim and VMamba mixers.

- ``A_log``: every row ``log(1..N)`` (so ``A = -exp(A_log) = -(1..N)``);
- ``D``: ones (callers use ``Tensor.fill_(1.0)`` directly);
- step-size projection weight: uniform in ``+-dt_scale * dt_rank**-0.5``;
- step-size bias: the inverse softplus of steps drawn log-uniformly in ``[dt_min, dt_max]``.

Each function fills its tensor in place without recording autograd history and returns it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["init_a_log_", "init_dt_bias_", "init_dt_weight_"]


def init_a_log_(a_log: Tensor) -> Tensor:
    """Fill ``a_log`` (rows, N) with ``log(1..N)`` in every row (Mamba's S4D-real A init)."""
    with torch.no_grad():
        a = torch.arange(1, a_log.shape[-1] + 1, dtype=torch.float32, device=a_log.device)
        return a_log.copy_(torch.log(a).expand_as(a_log))


def init_dt_weight_(weight: Tensor, dt_rank: int, dt_scale: float = 1.0) -> Tensor:
    """Fill the step-size projection ``weight`` uniformly in ``+-dt_scale * dt_rank**-0.5``."""
    std = dt_rank**-0.5 * dt_scale
    with torch.no_grad():
        return weight.uniform_(-std, std)


def init_dt_bias_(
    bias: Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4
) -> Tensor:
    """Fill ``bias`` so that ``softplus(bias)`` is log-uniform in [dt_min, dt_max] (Mamba's dt init).

    The step sizes are drawn log-uniformly (in float32), floored at ``dt_init_floor``, and passed through
    the inverse of softplus, ``dt + log(1 - exp(-dt))``.
    """
    with torch.no_grad():
        log_dt = torch.rand_like(bias, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
        dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_init_floor)
        return bias.copy_(dt + torch.log(-torch.expm1(-dt)))
