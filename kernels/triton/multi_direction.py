"""Scans through the Triton kernels: the registry's forward/backward and the fused multi-direction scan.

Both run the same kernels. A problem is K directions of C channels each (K*C channels in all, G groups
of B/C per direction); each direction reads and writes the row-major tensors through its own token
order, computed in the kernel from a direction code, so the K reordered copies of the inputs are never
built. The single-direction scan of the registry is the case K = 1, order "row".

Activations are read through their strides: (batch, channels, L)-contiguous tensors and token-major
ones (a (batch, L, channels) tensor viewed as (batch, channels, L) with ``.transpose(1, 2)``) are read
in place, and outputs and gradients are allocated in the layout of the matching input. Token-major is
the fast layout: a token's channels are then contiguous, which is how the kernels read them.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

from ..projections import check_low_rank_steps, project_steps_backward
from ..reference import math_dtype
from ..token_orders import MERGES
from ._common import Plan, direction_codes, make_plan
from .scan_bwd import launch_backward
from .scan_fwd import launch_forward

__all__ = ["ScanProblem", "triton_multi_direction_scan", "triton_scan_backward", "triton_scan_forward"]


@dataclass(frozen=True)
class ScanProblem:
    """Sizes and layout of one scan (K directions x C channels over L tokens)."""

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
    u_dir_stride: int  # stride between the directions' blocks of u, 0 for a u shared by all
    z_dir_stride: int
    math_dtype: tl.dtype
    rank: int = 0  # R > 0: delta is the (batch, K*R, L) low-rank step input, projected in the kernels

    @property
    def total_channels(self) -> int:
        return self.directions * self.channels


def _dir_stride(t: Tensor | None, channels: int) -> int:
    """Stride between direction blocks of a (batch, C or K*C, L) tensor: 0 when shared by all."""
    if t is None or t.shape[1] == channels:
        return 0
    return channels * t.stride(1)


_CODE_TENSORS: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _code_tensor(codes: tuple[int, ...], device: torch.device) -> Tensor:
    """The (K,) int32 direction codes on ``device``, made once per (codes, device)."""
    key = (codes, device)
    if key not in _CODE_TENSORS:
        _CODE_TENSORS[key] = torch.tensor(codes, dtype=torch.int32, device=device)
    return _CODE_TENSORS[key]


def _problem(u, delta, A, B, z, codes: tuple[int, ...], grid_size, rank: int = 0) -> tuple[ScanProblem, Plan]:
    batch, _, length = delta.shape
    total = A.shape[0]
    k = len(codes)
    channels = total // k
    per_group = channels // (B.shape[1] // k)
    height, width = grid_size if grid_size is not None else (1, length)
    problem = ScanProblem(
        batch=batch,
        directions=k,
        channels=channels,
        per_group=per_group,
        dstate=A.shape[1],
        length=length,
        height=height,
        width=width,
        dirs=_code_tensor(tuple(codes), u.device),
        has_dirs=any(codes),
        u_dir_stride=_dir_stride(u, channels),
        z_dir_stride=_dir_stride(z, channels),
        math_dtype=tl.float64 if u.dtype == torch.float64 else tl.float32,
        rank=rank,
    )
    return problem, make_plan(batch, total, per_group, length, u.device)


def _empty_like_layout(like: Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> Tensor:
    """An empty (batch, channels, L) tensor, token-major when ``like`` is (channels contiguous)."""
    if like.stride(1) == 1 and like.shape[1] > 1:
        batch, channels, length = shape
        return torch.empty((batch, length, channels), dtype=dtype, device=like.device).transpose(1, 2)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _params(A: Tensor, D: Tensor | None, delta_bias: Tensor | None):
    """The small per-channel parameters, contiguous (the kernels index them by channel)."""
    return A.contiguous(), *(t.contiguous() if t is not None else None for t in (D, delta_bias))


def _forward(problem, plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, want_last, dt_weight=None):
    """Output per direction (batch, K*C, L) in u's dtype, the last state on request, the entry states."""
    p = problem
    out = _empty_like_layout(_full_steps_like(p, u, delta), (p.batch, p.total_channels, p.length), u.dtype)
    last = None
    if want_last:
        last = torch.empty((p.batch, p.dstate, p.total_channels), dtype=math_dtype(u), device=u.device)
    entry = launch_forward(p, plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out, last, dt_weight)
    return out, last, entry


def _full_steps_like(problem, u: Tensor, delta: Tensor) -> Tensor:
    """The input whose layout the (batch, K*C, L) outputs and step gradients take: delta, or u when delta
    is the low-rank input."""
    return u if problem.rank else delta


def _backward(
    problem,
    plan,
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
    entry,
    dt_weight=None,
):
    """All gradients; those of a u or z shared by the directions are summed over the directions. With a
    low-rank problem the second and last are those of the low-rank input and of ``dt_weight`` (else the
    last is None)."""
    p = problem
    f = math_dtype(u)
    shape = (p.batch, p.total_channels, p.length)
    reduce_u = p.u_dir_stride == 0 and p.directions > 1
    reduce_z = z is not None and p.z_dir_stride == 0 and p.directions > 1
    rows = p.batch * plan.n_chunks
    steps_like = _full_steps_like(p, u, delta)
    grads = {
        "du": _empty_like_layout(steps_like if reduce_u else u, shape, f if reduce_u else u.dtype),
        "ddelta": _empty_like_layout(steps_like, shape, f if p.rank else delta.dtype),
        "dB": torch.zeros((*B.shape[:2], p.length, p.dstate), dtype=f, device=u.device),
        "dC": torch.zeros((*C.shape[:2], p.length, p.dstate), dtype=f, device=u.device),
        "dA": torch.empty((rows, p.dstate, p.total_channels), dtype=f, device=u.device),
    }
    if z is not None:
        grads["dz"] = _empty_like_layout(steps_like if reduce_z else z, shape, f if reduce_z else z.dtype)
    if D is not None:
        grads["dD"] = torch.empty((rows, p.total_channels), dtype=f, device=u.device)
    if delta_bias is not None:
        grads["ddelta_bias"] = torch.empty((rows, p.total_channels), dtype=f, device=u.device)
    if dlast is not None:
        dlast = dlast.to(f).transpose(1, 2).contiguous()  # (batch, N, K*C), as the kernels keep states
    launch_backward(
        p,
        plan,
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
        entry,
        grads,
        dt_weight,
    )

    def per_direction_sum(g: Tensor, like: Tensor) -> Tensor:
        return g.view(p.batch, p.directions, p.channels, p.length).sum(1).to(like.dtype)

    du = per_direction_sum(grads["du"], u) if reduce_u else grads["du"]
    dz = None
    if z is not None:
        dz = per_direction_sum(grads["dz"], z) if reduce_z else grads["dz"]
    dD = grads["dD"].sum(0).to(D.dtype) if D is not None else None
    ddelta_bias = grads["ddelta_bias"].sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    ddelta, dweight = grads["ddelta"], None
    if p.rank:
        ddelta, dweight = project_steps_backward(ddelta, delta, dt_weight)
    return (
        du,
        ddelta,
        grads["dA"].sum(0).t().to(A.dtype),
        grads["dB"].transpose(2, 3).to(B.dtype),
        grads["dC"].transpose(2, 3).to(C.dtype),
        dD,
        dz,
        ddelta_bias,
        dweight,
    )


def triton_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple[Tensor, Tensor]:
    """Registry forward: B, C grouped (batch, G, N, L). Returns (out in u.dtype, last state)."""
    A, D, delta_bias = _params(A, D, delta_bias)
    problem, plan = _problem(u, delta, A, B, z, (0,), None)
    out, last, _ = _forward(problem, plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    return out, last.transpose(1, 2).contiguous()


def triton_scan_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Registry backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), chunk states recomputed."""
    A, D, delta_bias = _params(A, D, delta_bias)
    problem, plan = _problem(u, delta, A, B, z, (0,), None)
    entry = None
    if plan.n_chunks > 1:  # the entry states only: no output, nothing else written
        entry = launch_forward(
            problem, plan, u, delta, A, B, C, None, None, delta_bias, delta_softplus, None, None
        )
    dout_strides = (dout.stride(0), dout.stride(1), dout.stride(2), 0)
    *grads, _ = _backward(
        problem,
        plan,
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
        entry,
    )
    return tuple(grads)


class _MultiDirectionScan(torch.autograd.Function):
    """Autograd for the fused multi-direction scan: saves the inputs and the chunk-entry states only."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, dt_weight, delta_softplus, codes, grid_size, merge):
        rank = 0 if dt_weight is None else dt_weight.shape[1]
        problem, plan = _problem(u, delta, A, B, z, codes, grid_size, rank)
        ys, _, entry = _forward(
            problem, plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, dt_weight
        )
        ys = ys.view(problem.batch, problem.directions, problem.channels, problem.length)
        if merge == "sum":
            out = ys.sum(1)
        elif merge == "mean":
            out = ys.mean(1)
        else:
            out = ys
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, dt_weight, entry)
        ctx.problem, ctx.plan, ctx.merge, ctx.delta_softplus = problem, plan, merge, delta_softplus
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, dt_weight, entry = ctx.saved_tensors
        p = ctx.problem
        if ctx.merge == "none":
            dout_strides = (dout.stride(0), dout.stride(2), dout.stride(3), dout.stride(1))
        else:
            dout_strides = (dout.stride(0), dout.stride(1), dout.stride(2), 0)
        scale = 1.0 / p.directions if ctx.merge == "mean" else 1.0
        grads = _backward(
            p,
            ctx.plan,
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
            entry,
            dt_weight,
        )
        return (*grads, None, None, None, None)


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
    delta_proj_weight: Tensor | None = None,
) -> Tensor:
    """K directions in one launch of the Triton kernels; semantics of ``multi_direction_selective_scan``.

    All inputs are in storage (row-major) order: u (batch, C, L) shared by the directions or
    (batch, K*C, L); delta (batch, K*C, L); A (K*C, N); B, C (batch, K*G, N, L); D, delta_bias (K*C,);
    z (batch, C, L) shared or (batch, K*C, L). Activations may be token-major views (see the module
    docstring); nothing is copied. Direction k reads its tokens in its own order (row, col,
    row_reversed, col_reversed over the ``grid_size`` grid; "forward"/"backward" are row and
    row_reversed) straight from these tensors, and writes its output back in storage order. ``merge``:
    "sum", "mean" (batch, C, L) or "none" (batch, K, C, L). With ``delta_proj_weight`` (K*C, R), delta is
    the low-rank step input (batch, K*R, L) and the kernels project each token's steps themselves, so the
    (batch, K*C, L) steps are never stored in the forward. Gradients flow to every tensor input.
    """
    k = len(directions)
    if k == 0:
        raise ValueError("directions must name at least one direction")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    codes = direction_codes(directions, grid_size)
    if delta_proj_weight is None:
        if delta.dim() != 3 or delta.shape[1] % k:
            raise ValueError(f"delta must be (batch, K*C, L) with K={k}, got shape {tuple(delta.shape)}")
        batch, total, length = delta.shape
    else:
        check_low_rank_steps(delta, delta_proj_weight, k)
        total = delta_proj_weight.shape[0]
        batch, _, length = delta.shape
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
    others = (("u", u), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias))
    for name, t in (*others, ("delta_proj_weight", delta_proj_weight)):
        if t is not None and t.device != delta.device:
            raise ValueError(
                f"{name} is on {t.device} but delta is on {delta.device}; put all inputs on one device"
            )
    A, D, delta_bias = _params(A, D, delta_bias)
    dt_weight = None if delta_proj_weight is None else delta_proj_weight.contiguous()
    grid = tuple(grid_size) if grid_size is not None else None
    return _MultiDirectionScan.apply(
        u, delta, A, B, C, D, z, delta_bias, dt_weight, bool(delta_softplus), codes, grid, merge
    )
