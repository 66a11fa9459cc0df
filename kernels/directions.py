"""Scan directions over token sequences and grids, and the multi-direction selective scan.

A direction is an order in which to visit the L = H*W tokens of a grid stored row-major:

- ``"row"`` (alias ``"forward"``): row-major, the storage order;
- ``"col"``: column-major;
- ``"row_reversed"`` (alias ``"backward"``) and ``"col_reversed"``: the same, back to front.

Vim scans ``("forward", "backward")`` over a 1-D sequence; VMamba's SS2D scans
``("row", "col", "row_reversed", "col_reversed")`` over a grid. :func:`multi_direction_selective_scan`
runs all K directions as the groups of one ``selective_scan`` call, each with its own parameters, and
returns the merged result in the original order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import resolve_backend
from .selective_scan import selective_scan

__all__ = [
    "DIRECTIONS",
    "VIM_DIRECTIONS",
    "VMAMBA_DIRECTIONS",
    "from_directions",
    "multi_direction_selective_scan",
    "to_directions",
]

DIRECTIONS = ("row", "col", "row_reversed", "col_reversed")
_ALIASES = {"forward": "row", "backward": "row_reversed"}
VIM_DIRECTIONS = ("forward", "backward")
VMAMBA_DIRECTIONS = DIRECTIONS
MERGES = ("sum", "mean", "none")


def _canonical(direction: str, grid_size: tuple[int, int] | None) -> str:
    name = _ALIASES.get(direction, direction)
    if name not in DIRECTIONS:
        raise ValueError(
            f"unknown scan direction {direction!r}; expected one of {DIRECTIONS + tuple(_ALIASES)}"
        )
    if name.startswith("col") and grid_size is None:
        raise ValueError(f"direction {direction!r} needs grid_size=(H, W) to know the grid")
    return name


def _check_grid(length: int, grid_size: tuple[int, int] | None) -> None:
    if grid_size is not None and grid_size[0] * grid_size[1] != length:
        raise ValueError(
            f"grid_size {tuple(grid_size)} has {grid_size[0] * grid_size[1]} cells but L={length}"
        )


def _reorder(x: Tensor, direction: str, grid_size: tuple[int, int] | None) -> Tensor:
    """x (batch, C, L) in storage order -> the same tokens in ``direction`` order."""
    if direction.startswith("col"):
        h, w = grid_size
        x = x.unflatten(-1, (h, w)).transpose(-1, -2).flatten(-2)
    return x.flip(-1) if direction.endswith("reversed") else x


def _restore(y: Tensor, direction: str, grid_size: tuple[int, int] | None) -> Tensor:
    """Inverse of :func:`_reorder`: y in ``direction`` order -> storage order."""
    if direction.endswith("reversed"):
        y = y.flip(-1)
    if direction.startswith("col"):
        h, w = grid_size
        y = y.unflatten(-1, (w, h)).transpose(-1, -2).flatten(-2)
    return y


def to_directions(x: Tensor, directions: Sequence[str], grid_size: tuple[int, int] | None = None) -> Tensor:
    """Token grid or sequence -> one sequence per direction.

    ``x`` is (batch, C, H, W) (the grid size is then taken from it) or (batch, C, L) with ``grid_size``
    for the column directions. Returns (batch, K, C, L).
    """
    if x.dim() == 4:
        grid_size = (x.shape[-2], x.shape[-1])
        x = x.flatten(2)
    _check_grid(x.shape[-1], grid_size)
    names = [_canonical(d, grid_size) for d in directions]
    return torch.stack([_reorder(x, d, grid_size) for d in names], dim=1)


def from_directions(
    ys: Tensor,
    directions: Sequence[str],
    grid_size: tuple[int, int] | None = None,
    merge: str = "sum",
) -> Tensor:
    """One sequence per direction (batch, K, C, L) -> storage order, merged.

    ``merge="sum"`` (VMamba's cross-merge) or ``"mean"`` (Vim's averaged directions) give (batch, C, L);
    ``"none"`` keeps (batch, K, C, L).
    """
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if ys.shape[1] != len(directions):
        raise ValueError(f"ys has {ys.shape[1]} directions but {len(directions)} were named")
    _check_grid(ys.shape[-1], grid_size)
    names = [_canonical(d, grid_size) for d in directions]
    restored = torch.stack([_restore(ys[:, k], d, grid_size) for k, d in enumerate(names)], dim=1)
    if merge == "none":
        return restored
    total = restored.sum(1)
    return total / len(names) if merge == "mean" else total


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
    return torch.cat([_reorder(b, d, grid_size) for b, d in zip(blocks, names)], dim=1)


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
        directions: names from :data:`DIRECTIONS` (or ``"forward"``/``"backward"``), K of them.
        grid_size: (H, W) with H*W = L, needed for the column directions.
        merge: ``"sum"``, ``"mean"`` (the average over directions) or ``"none"`` (batch, K, C, L).
    """
    k = len(directions)
    if k == 0:
        raise ValueError("directions must name at least one direction")
    _check_grid(u.shape[-1], grid_size)
    names = [_canonical(d, grid_size) for d in directions]
    if delta.dim() != 3 or delta.shape[1] % k:
        raise ValueError(f"delta must be (batch, K*C, L) with K={k}, got shape {tuple(delta.shape)}")
    channels = delta.shape[1] // k
    if B.dim() != 4 or C.dim() != 4 or B.shape[1] % k or C.shape[1] % k:
        raise ValueError(
            f"B and C must be (batch, K*G, N, L) with K={k}, got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    impl = None
    if not (torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()):
        impl = resolve_backend(backend, u.device)
    if impl is not None and impl.multi_direction is not None:
        # A fused kernel realises the orders itself: the direction sequences are never materialised.
        return impl.multi_direction(
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
        )
    us = _per_direction(u, k, "u", channels, names, grid_size)
    deltas = _per_direction(delta, k, "delta", channels, names, grid_size)
    zs = _per_direction(z, k, "z", channels, names, grid_size)
    groups = B.shape[1] // k
    Bs = _per_direction(B.flatten(1, 2), k, "B", groups * B.shape[2], names, grid_size).view(B.shape)
    Cs = _per_direction(C.flatten(1, 2), k, "C", groups * C.shape[2], names, grid_size).view(C.shape)
    ys = selective_scan(us, deltas, A, Bs, Cs, D, zs, delta_bias, delta_softplus, backend=backend)
    return from_directions(ys.unflatten(1, (k, channels)), names, grid_size, merge)
