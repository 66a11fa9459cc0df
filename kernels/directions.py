"""The multi-direction selective scan: K token orders scanned as the groups of one ``selective_scan`` call.

The orders themselves (names, aliases, reorderings) live in :mod:`.token_orders`. Here each direction
gets its own parameters, its block of channels is scanned in its own order and brought back to storage
order before merging. A backend with a fused ``multi_direction`` hook (Triton) realises the orders in the
kernel instead and receives the canonical direction names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import resolve_backend
from .projections import check_low_rank_steps, project_steps
from .selective_scan import selective_scan
from .token_orders import MERGES, canonical_directions, check_grid, from_directions, to_direction_order

__all__ = ["multi_direction_selective_scan"]


def _per_direction(
    t: Tensor | None, k: int, name: str, per_dir_channels: int, names, grid_size
) -> Tensor | None:
    """(batch, C or K*C, L) in storage order -> (batch, K*C, L), each direction's block in its order."""
    if t is None:
        return None
    if t.shape[1] == per_dir_channels:
        blocks = [t] * k
    elif t.shape[1] == k * per_dir_channels:
        blocks = t.chunk(k, dim=1)
    else:
        raise ValueError(
            f"{name} must have {per_dir_channels} channels (shared) or {k}*{per_dir_channels} (one block "
            f"per direction), got {t.shape[1]}"
        )
    return torch.cat([to_direction_order(b, d, grid_size) for b, d in zip(blocks, names)], dim=1)


def multi_direction_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    directions: Sequence[str],
    grid_size: tuple[int, int] | None = None,
    merge: str = "sum",
    backend: str = "auto",
    delta_proj_weight: Tensor | None = None,
) -> Tensor:
    """Scan K directions in one ``selective_scan`` call, each with its own parameters.

    Everything is given in storage (row-major) order; each direction's block is scanned in its own order
    and brought back before merging.

    Args:
        u: (batch, C, L) shared by all directions, or (batch, K*C, L) with one block per direction.
        delta: (batch, K*C, L), direction k's channels in block k.
        A: (K*C, N); D, delta_bias: (K*C,) or None.
        B, C: (batch, K*G, N, L): G groups per direction (usually 1), direction-major.
        z: gate, (batch, C, L) shared or (batch, K*C, L); applied to each direction before merging.
        directions: names from :data:`~.token_orders.DIRECTIONS` (or ``"forward"``/``"backward"``), K of them.
        grid_size: (H, W) with H*W = L, needed for the column directions.
        merge: ``"sum"``, ``"mean"`` (the average over directions) or ``"none"`` (batch, K, C, L).
        delta_proj_weight: (K*C, R) or None. When given, ``delta`` is the low-rank step input
            (batch, K*R, L) and direction k's steps are ``delta_proj_weight[k*C:(k+1)*C] @ delta[:, k*R:(k+1)*R]``
            (mamba_ssm's ``delta_proj_weight``: the step projection fused into the scan where a backend can,
            so the (batch, K*C, L) steps are never stored). ``delta_bias`` is still added afterwards.

    A backend's ``multi_direction`` hook is called with the same arguments, ``directions`` replaced by
    their canonical names (a tuple) and ``merge`` already checked (``delta_proj_weight`` only for a hook
    that declares ``multi_direction_low_rank``; others get the projected steps); it may return
    ``NotImplemented`` for a call it does not take, which then runs the generic path.
    """
    k = len(directions)
    if k == 0:
        raise ValueError("directions must name at least one direction")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    check_grid(u.shape[-1], grid_size)
    names = canonical_directions(directions, grid_size)
    if delta_proj_weight is not None:
        check_low_rank_steps(delta, delta_proj_weight, k)
    if delta.dim() != 3 or delta.shape[1] % k:
        raise ValueError(f"delta must be (batch, K*C, L) with K={k}, got shape {tuple(delta.shape)}")
    if B.dim() != 4 or C.dim() != 4 or B.shape[1] % k or C.shape[1] % k:
        raise ValueError(
            f"B and C must be (batch, K*G, N, L) with K={k}, got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    impl = None
    if not (torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()):
        impl = resolve_backend(backend, u.device)
    low_rank = {}
    if delta_proj_weight is not None:
        if impl is not None and impl.multi_direction is not None and impl.multi_direction_low_rank:
            low_rank = {"delta_proj_weight": delta_proj_weight}
        else:
            delta = project_steps(delta, delta_proj_weight)
    if impl is not None and impl.multi_direction is not None:
        # A fused kernel realises the orders itself: the direction sequences are never materialised.
        fused = impl.multi_direction(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus,
            directions=names,
            grid_size=grid_size,
            merge=merge,
            **low_rank,
        )
        if fused is not NotImplemented:  # NotImplemented: the hook leaves this call to the generic path
            return fused
    if low_rank:
        delta = project_steps(delta, delta_proj_weight)
    channels = delta.shape[1] // k
    us = _per_direction(u, k, "u", channels, names, grid_size)
    deltas = _per_direction(delta, k, "delta", channels, names, grid_size)
    zs = _per_direction(z, k, "z", channels, names, grid_size)
    groups = B.shape[1] // k
    Bs = _per_direction(B.flatten(1, 2), k, "B", groups * B.shape[2], names, grid_size).view(B.shape)
    Cs = _per_direction(C.flatten(1, 2), k, "C", groups * C.shape[2], names, grid_size).view(C.shape)
    ys = selective_scan(us, deltas, A, Bs, Cs, D, zs, delta_bias, delta_softplus, backend=backend)
    return from_directions(ys.unflatten(1, (k, channels)), names, grid_size, merge)
