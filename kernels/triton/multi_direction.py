"""Scans through the Triton kernels: the registry's forward/backward and the fused multi-direction scan.

Both run the same two kernels. A problem is K directions of C channels each (K*C channels in all, G
groups of B/C per direction); each direction reads and writes the row-major tensors through its own
token order, computed in the kernel from a direction code, so the K reordered copies of the inputs are
never built. The single-direction scan of the registry is the case K = 1, order "row".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

from ..reference import math_dtype
from ..token_orders import MERGES, canonical_directions
from ._common import DIRECTION_CODES, state_chunk
from .scan_bwd import launch_backward
from .scan_fwd import launch_forward

__all__ = ["ScanProblem", "triton_multi_direction_scan", "triton_scan_backward", "triton_scan_forward"]


@dataclass(frozen=True)
class ScanProblem:
    """Sizes and layout of one kernel launch (K directions x C channels over L tokens)."""

    batch: int
    directions: int  # K
    channels: int  # C, channels per direction
    per_group: int  # channels sharing one B/C group
    dstate: int  # N
    length: int  # L
    height: int  # grid rows (1 for a 1-D sequence)
    width: int  # grid columns (L for a 1-D sequence)
    dirs: Tensor  # (K,) int32 direction codes, on the inputs' device
    has_dirs: bool  # False when every direction is "row" (the kernel then skips the index mapping)
    u_strides: tuple[int, int, int]  # (batch, channel, direction) strides of u, 0 for a shared u
    z_strides: tuple[int, int, int]
    math_dtype: tl.dtype

    @property
    def total_channels(self) -> int:
        return self.directions * self.channels


def _strides(t: Tensor | None, channels: int) -> tuple[int, int, int]:
    """(batch, channel, direction) strides of a (batch, C or K*C, L) tensor; direction stride 0 if shared."""
    if t is None:
        return (0, 0, 0)
    return (t.stride(0), t.stride(1), 0 if t.shape[1] == channels else channels * t.stride(1))


_CODE_TENSORS: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _code_tensor(codes: tuple[int, ...], device: torch.device) -> Tensor:
    """The (K,) int32 direction codes on ``device``, made once per (codes, device)."""
    key = (codes, device)
    if key not in _CODE_TENSORS:
        _CODE_TENSORS[key] = torch.tensor(codes, dtype=torch.int32, device=device)
    return _CODE_TENSORS[key]


def _problem(u, delta, A, B, z, codes: tuple[int, ...], grid_size: tuple[int, int] | None) -> ScanProblem:
    batch, total, length = delta.shape
    k = len(codes)
    channels = total // k
    groups = B.shape[1] // k
    height, width = grid_size if grid_size is not None else (1, length)
    return ScanProblem(
        batch=batch,
        directions=k,
        channels=channels,
        per_group=channels // groups,
        dstate=A.shape[1],
        length=length,
        height=height,
        width=width,
        dirs=_code_tensor(tuple(codes), u.device),
        has_dirs=any(codes),
        u_strides=_strides(u, channels),
        z_strides=_strides(z, channels),
        math_dtype=tl.float64 if u.dtype == torch.float64 else tl.float32,
    )


def _contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    return [t.contiguous() if t is not None else None for t in tensors]


def _state_buffer(p: ScanProblem, u: Tensor) -> tuple[Tensor, int]:
    """An empty (batch, K*C, n_chunks, N) buffer for the states entering each chunk, and the chunk length."""
    chunk = state_chunk(p.length)
    n_chunks = -(-p.length // chunk)
    f = math_dtype(u)
    return torch.empty((p.batch, p.total_channels, n_chunks, p.dstate), dtype=f, device=u.device), chunk


def _forward(problem, u, delta, A, B, C, D, z, delta_bias, delta_softplus, want_last, save_states):
    """Output per direction (batch, K*C, L) in u's dtype, and on request the last state and chunk states."""
    p = problem
    f = math_dtype(u)
    out = torch.empty((p.batch, p.total_channels, p.length), dtype=u.dtype, device=u.device)
    last = torch.empty((p.batch, p.total_channels, p.dstate), dtype=f, device=u.device) if want_last else None
    states, chunk = _state_buffer(p, u) if save_states else (None, None)
    launch_forward(p, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out, last, states, chunk)
    return out, last, states, chunk


def _chunk_states(problem, u, delta, A, B, C, delta_bias, delta_softplus):
    """Recompute only the states entering each chunk (what the backward needs), writing nothing else."""
    states, chunk = _state_buffer(problem, u)
    launch_forward(
        problem, u, delta, A, B, C, None, None, delta_bias, delta_softplus, None, None, states, chunk
    )
    return states, chunk


def _backward(
    problem,
    dout,
    dout_strides,
    dout_scale,
    dlast,
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    delta_softplus,
    states,
    chunk,
    reduce_u: bool,
    reduce_z: bool,
):
    """All gradients, per direction for u and z when ``reduce_*`` (summed over directions afterwards)."""
    p = problem
    f = math_dtype(u)
    shape = (p.batch, p.total_channels, p.length)
    grads = {
        "du": torch.empty(shape, dtype=f if reduce_u else u.dtype, device=u.device),
        "ddelta": torch.empty(shape, dtype=delta.dtype, device=u.device),
        "dB": torch.zeros(B.shape, dtype=f, device=u.device),
        "dC": torch.zeros(C.shape, dtype=f, device=u.device),
        "dA": torch.empty((p.batch, p.total_channels, p.dstate), dtype=f, device=u.device),
    }
    if z is not None:
        grads["dz"] = torch.empty(shape, dtype=f if reduce_z else z.dtype, device=u.device)
    if D is not None:
        grads["dD"] = torch.empty((p.batch, p.total_channels), dtype=f, device=u.device)
    if delta_bias is not None:
        grads["ddelta_bias"] = torch.empty((p.batch, p.total_channels), dtype=f, device=u.device)
    launch_backward(
        p,
        dout,
        dout_strides,
        dout_scale,
        dlast,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        states,
        chunk,
        grads,
    )

    def per_direction_sum(g: Tensor, like: Tensor) -> Tensor:
        return g.view(p.batch, p.directions, p.channels, p.length).sum(1).to(like.dtype)

    du = per_direction_sum(grads["du"], u) if reduce_u else grads["du"]
    dz = None
    if z is not None:
        dz = per_direction_sum(grads["dz"], z) if reduce_z else grads["dz"]
    dD = grads["dD"].sum(0).to(D.dtype) if D is not None else None
    ddelta_bias = grads["ddelta_bias"].sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return (
        du,
        grads["ddelta"],
        grads["dA"].sum(0).to(A.dtype),
        grads["dB"].to(B.dtype),
        grads["dC"].to(C.dtype),
        dD,
        dz,
        ddelta_bias,
    )


def triton_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple[Tensor, Tensor]:
    """Registry forward: B, C grouped (batch, G, N, L). Returns (out in u.dtype, last state)."""
    u, delta, A, B, C, D, z, delta_bias = _contiguous(u, delta, A, B, C, D, z, delta_bias)
    problem = _problem(u, delta, A, B, z, (0,), None)
    out, last, _, _ = _forward(problem, u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, False)
    return out, last


def triton_scan_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Registry backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), states recomputed by chunk."""
    dout, dlast, u, delta, A, B, C, D, z, delta_bias = _contiguous(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias
    )
    problem = _problem(u, delta, A, B, z, (0,), None)
    states, chunk = _chunk_states(problem, u, delta, A, B, C, delta_bias, delta_softplus)
    dout_strides = (dout.stride(0), dout.stride(1), 0)
    return _backward(
        problem,
        dout,
        dout_strides,
        1.0,
        dlast,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        states,
        chunk,
        False,
        False,
    )


class _MultiDirectionScan(torch.autograd.Function):
    """Autograd for the fused multi-direction scan: saves the inputs and the chunk states only."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, codes, grid_size, merge, save):
        problem = _problem(u, delta, A, B, z, codes, grid_size)
        ys, _, states, chunk = _forward(
            problem, u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, save
        )
        ys = ys.view(problem.batch, problem.directions, problem.channels, problem.length)
        if merge == "sum":
            out = ys.sum(1)
        elif merge == "mean":
            out = ys.mean(1)
        else:
            out = ys
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.problem, ctx.chunk, ctx.merge, ctx.delta_softplus = problem, chunk, merge, delta_softplus
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        p = ctx.problem
        dout = dout.contiguous()
        if ctx.merge == "none":
            dout_strides = (dout.stride(0), dout.stride(2), dout.stride(1))
        else:
            dout_strides = (dout.stride(0), dout.stride(1), 0)
        scale = 1.0 / p.directions if ctx.merge == "mean" else 1.0
        grads = _backward(
            p,
            dout,
            dout_strides,
            scale,
            None,
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            ctx.delta_softplus,
            states,
            ctx.chunk,
            p.u_strides[2] == 0 and p.directions > 1,
            z is not None and p.z_strides[2] == 0 and p.directions > 1,
        )
        return (*grads, None, None, None, None, None)


def triton_multi_direction_scan(
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
) -> Tensor:
    """K directions in one launch of the Triton kernels; semantics of ``multi_direction_selective_scan``.

    All inputs are in storage (row-major) order: u (batch, C, L) shared by the directions or
    (batch, K*C, L); delta (batch, K*C, L); A (K*C, N); B, C (batch, K*G, N, L); D, delta_bias (K*C,);
    z (batch, C, L) shared or (batch, K*C, L). Direction k reads its tokens in its own order (row,
    col, row_reversed, col_reversed over the ``grid_size`` grid; "forward"/"backward" are row and
    row_reversed) straight from these tensors, and writes its output back in storage order. ``merge``:
    "sum", "mean" (batch, C, L) or "none" (batch, K, C, L). Gradients flow to every tensor input.
    """
    k = len(directions)
    if k == 0:
        raise ValueError("directions must name at least one direction")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    names = canonical_directions(directions, grid_size)
    if delta.dim() != 3 or delta.shape[1] % k:
        raise ValueError(f"delta must be (batch, K*C, L) with K={k}, got shape {tuple(delta.shape)}")
    batch, total, length = delta.shape
    channels = total // k
    if grid_size is not None and grid_size[0] * grid_size[1] != length:
        raise ValueError(
            f"grid_size {tuple(grid_size)} has {grid_size[0] * grid_size[1]} cells but L={length}"
        )
    for name, t in (("u", u), ("z", z)):
        if t is not None and (
            t.dim() != 3 or t.shape[0] != batch or t.shape[2] != length or t.shape[1] not in (channels, total)
        ):
            raise ValueError(
                f"{name} must be (batch, C, L) = ({batch}, {channels}, {length}) shared by the directions or "
                f"(batch, K*C, L) = ({batch}, {total}, {length}), got {tuple(t.shape)}"
            )
    if A.dim() != 2 or A.shape[0] != total:
        raise ValueError(f"A must be (K*C, N) = ({total}, N), got shape {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[1] % k or t.shape[2:] != (dstate, length):
            raise ValueError(
                f"{name} must be (batch, K*G, N, L) with K={k}, N={dstate}, L={length}, got {tuple(t.shape)}"
            )
    if B.shape[1] != C.shape[1] or channels % (B.shape[1] // k):
        raise ValueError(
            f"B and C must have the same K*G groups, with G dividing C={channels}; got "
            f"{B.shape[1]} and {C.shape[1]}"
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (total,):
            raise ValueError(f"{name} must be ({total},), got {tuple(t.shape)}")
    for name, t in (("u", u), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None and t.device != delta.device:
            raise ValueError(
                f"{name} is on {t.device} but delta is on {delta.device}; put all inputs on one device"
            )
    u, delta, A, B, C, D, z, delta_bias = _contiguous(u, delta, A, B, C, D, z, delta_bias)
    codes = tuple(DIRECTION_CODES[n] for n in names)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    grid = tuple(grid_size) if grid_size is not None else None
    return _MultiDirectionScan.apply(*inputs, bool(delta_softplus), codes, grid, merge, save)
