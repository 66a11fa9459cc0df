"""Token orders: the scan directions over a grid or sequence of tokens, and the reorderings between them.

A direction is an order in which to visit the L = H*W tokens of a grid stored row-major:

- ``"row"`` (alias ``"forward"``): row-major, the storage order;
- ``"col"``: column-major;
- ``"row_reversed"`` (alias ``"backward"``) and ``"col_reversed"``: the same, back to front.

Vim scans ``("forward", "backward")`` over a 1-D sequence; VMamba's SS2D scans
``("row", "col", "row_reversed", "col_reversed")`` over a grid. This module only names the orders and
moves tokens between them (no scan); :mod:`.directions` runs the multi-direction scan on top of it, and a
fused kernel may realise the same orders itself from the canonical names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DIRECTIONS",
    "DIRECTION_ALIASES",
    "MERGES",
    "VIM_DIRECTIONS",
    "VMAMBA_DIRECTIONS",
    "canonical_directions",
    "check_grid",
    "from_direction_order",
    "from_directions",
    "to_direction_order",
    "to_directions",
]

#: The canonical direction names.
DIRECTIONS = ("row", "col", "row_reversed", "col_reversed")
#: Other accepted names and the canonical direction each stands for.
DIRECTION_ALIASES = {"forward": "row", "backward": "row_reversed"}
VIM_DIRECTIONS = ("forward", "backward")
VMAMBA_DIRECTIONS = DIRECTIONS
#: How per-direction results are combined: summed, averaged, or kept apart.
MERGES = ("sum", "mean", "none")


def canonical_directions(
    directions: Sequence[str], grid_size: tuple[int, int] | None = None
) -> tuple[str, ...]:
    """The canonical names of ``directions`` (aliases resolved), checked against ``grid_size``.

    Raises ValueError for an unknown name, or for a column direction without ``grid_size``.
    """
    names = []
    for direction in directions:
        name = DIRECTION_ALIASES.get(direction, direction)
        if name not in DIRECTIONS:
            raise ValueError(
                f"unknown scan direction {direction!r}; expected one of {DIRECTIONS + tuple(DIRECTION_ALIASES)}"
            )
        if name.startswith("col") and grid_size is None:
            raise ValueError(f"direction {direction!r} needs grid_size=(H, W) to know the grid")
        names.append(name)
    return tuple(names)


def check_grid(length: int, grid_size: tuple[int, int] | None) -> None:
    """Raise ValueError when ``grid_size`` (H, W) does not have ``length`` cells (None: a 1-D sequence)."""
    if grid_size is not None and grid_size[0] * grid_size[1] != length:
        raise ValueError(
            f"grid_size {tuple(grid_size)} has {grid_size[0] * grid_size[1]} cells but L={length}"
        )


def to_direction_order(x: Tensor, direction: str, grid_size: tuple[int, int] | None = None) -> Tensor:
    """(..., L) in storage order -> the same tokens in the order of the canonical ``direction``."""
    if direction.startswith("col"):
        h, w = grid_size
        x = x.unflatten(-1, (h, w)).transpose(-1, -2).flatten(-2)
    return x.flip(-1) if direction.endswith("reversed") else x


def from_direction_order(y: Tensor, direction: str, grid_size: tuple[int, int] | None = None) -> Tensor:
    """Inverse of :func:`to_direction_order`: (..., L) in ``direction`` order -> storage order."""
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
    check_grid(x.shape[-1], grid_size)
    names = canonical_directions(directions, grid_size)
    return torch.stack([to_direction_order(x, d, grid_size) for d in names], dim=1)


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
    check_grid(ys.shape[-1], grid_size)
    names = canonical_directions(directions, grid_size)
    restored = torch.stack([from_direction_order(ys[:, k], d, grid_size) for k, d in enumerate(names)], dim=1)
    if merge == "none":
        return restored
    total = restored.sum(1)
    return total / len(names) if merge == "mean" else total
