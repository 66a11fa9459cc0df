"""Sequential ground truth for the SSD scan (Mamba-2's state space duality) and its direction sets.

A plain loop over the sequence, one state update per token, following mamba_ssm's
``mamba_chunk_scan_combined`` semantics (no chunking at all, so it shares no code path with the chunked
torch and Triton implementations it checks). It runs in float64 for float64 inputs, float32 otherwise;
its gradients come from autograd through the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["direction_permutation", "process_dt", "ssd_scan_reference", "ssd_multi_direction_reference"]


def process_dt(
    dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float], dtype: torch.dtype
) -> Tensor:
    """mamba_ssm's step size: ``dt + dt_bias``, then softplus (identity above 20), then clamp to dt_limit."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def direction_permutation(direction: str, length: int, grid_size: tuple[int, int] | None) -> list[int]:
    """perm[p] = storage (row-major) index of the p-th token visited by ``direction``."""
    height, width = grid_size if grid_size is not None else (1, length)
    order = list(range(length))
    if direction.startswith("col"):
        order = [h * width + w for w in range(width) for h in range(height)]
    if direction.endswith("reversed"):
        order = order[::-1]
    return order


def ssd_scan_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """SSD as a sequential loop. Shapes as :func:`vmamba.kernels.ssd_scan`; no input checking.

    Per batch b and head h (group g = h // (nheads // ngroups)), with the processed step ``dt``:
    ``S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T`` (S is (p, n), S_0 = initial state or 0),
    ``y_t = S_t C_t + D_h * x_t``, ``out = y * silu(z)`` when z is given.
    """
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    dtf = process_dt(dt, dt_bias, dt_softplus, dt_limit, f)  # (b, L, h)
    xf = x.to(f)
    Bf = B.to(f).repeat_interleave(per_group, dim=2)  # (b, L, h, n)
    Cf = C.to(f).repeat_interleave(per_group, dim=2)
    decay = torch.exp(dtf * A.to(f))  # (b, L, h)
    if initial_states is not None:
        state = initial_states.to(f)
    else:
        state = xf.new_zeros(batch, nheads, headdim, B.shape[-1])
    ys = []
    for t in range(length):
        drive = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bf[:, t, :, None, :]  # (b, h, p, n)
        state = decay[:, t, :, None, None] * state + drive
        ys.append((state * Cf[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)  # (b, L, h, p)
    if D is not None:
        Df = D.to(f)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(x.dtype)
    return (out, state) if return_final_states else out


def ssd_multi_direction_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    *,
    directions: Sequence[str],
    grid_size: tuple[int, int] | None = None,
) -> Tensor:
    """``(sum_k restore_k(SSD(reorder_k(x, dt, B, C))) + D x) * silu(z)``, D and z applied once."""
    length = x.shape[1]
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = 0
    for direction in directions:
        perm = torch.tensor(direction_permutation(direction, length, grid_size), device=x.device)
        xs, bs, cs = (t[:, perm].to(f) for t in (x, B, C))
        y = ssd_scan_reference(xs, dt[:, perm], A, bs, cs, None, None, dt_bias, dt_softplus, dt_limit)
        restored = torch.empty_like(y)
        restored[:, perm] = y
        total = total + restored
    if D is not None:
        Df = D.to(f)
        total = total + x.to(f) * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        total = total * F.silu(z.to(f))
    return total.to(x.dtype)
