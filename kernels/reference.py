"""Sequential ground truth for the selective scan.

This is the plain loop that everything else is tested against: ``exp(delta * A)`` and ``delta * B * u``
are materialised for every step, then a Python loop over the sequence carries the state. It follows the
semantics of mamba_ssm's ``selective_scan_ref`` and runs in float64 when given float64 inputs, in float32
otherwise. Its gradients come from autograd through the loop, which makes them an independent check of the
hand-written backward passes of the fast backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["math_dtype", "selective_scan_reference"]


def math_dtype(x: Tensor) -> torch.dtype:
    """The dtype the scan computes in for inputs like ``x``: float64 for float64, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand_groups(BC: Tensor, dim: int) -> Tensor:
    """Repeat grouped (batch, G, N, L) B or C to one row per channel: (batch, dim, N, L)."""
    batch, groups, dstate, length = BC.shape
    per_group = dim // groups
    return BC[:, :, None].expand(batch, groups, per_group, dstate, length).reshape(batch, dim, dstate, length)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan as a sequential loop (mamba_ssm ``selective_scan_ref`` semantics, real A only).

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or (batch, G, N, L);
    D, delta_bias (dim,). Returns ``out`` in u's dtype and, on request, the last state (batch, dim, N) in
    the math dtype. No input checking: call :func:`vmamba.kernels.selective_scan` for that.
    """
    f = math_dtype(u)
    dim = u.shape[1]
    dt = delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf = u.to(f)
    Bf = B.to(f) if B.dim() == 4 else B.to(f)[:, None]
    Cf = C.to(f) if C.dim() == 4 else C.to(f)[:, None]
    Bf, Cf = expand_groups(Bf, dim), expand_groups(Cf, dim)

    decay = torch.exp(dt[..., None] * A.to(f)[None, :, None, :])  # (batch, dim, L, N)
    drive = (dt * uf)[..., None] * Bf.transpose(-1, -2)  # (batch, dim, L, N)
    state = uf.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        state = decay[:, :, t] * state + drive[:, :, t]
        ys.append((state * Cf[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + uf * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(u.dtype)
    return (out, state) if return_last_state else out
