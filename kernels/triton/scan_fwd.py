"""Forward selective scan: each thread walks its channel's tokens in order, its N states in registers.

A program owns ``BLOCK_D`` channels (one per thread) of one direction and one B/C group, for one batch
row and one chunk of tokens. It loops over the chunk ``SUB`` tokens per unrolled step; per token it
loads one value of u, delta (and z) per channel -- contiguous across channels when the activations are
token-major -- and the N values of B and C, updates ``h = exp(dt A) h + dt B u`` and reduces
``y = <C, h>`` inside the thread. Nothing crosses threads. softplus(delta + delta_bias), the D skip and
the silu(z) gate are fused; the math runs in float32 (float64 for float64 inputs).

Long sequences at small batch run their chunks in parallel (:class:`~._common.Plan`): a first launch
finds each chunk's end state from a zero start and its summed step (its decay is ``exp(A * sum dt)``),
:func:`_boundary_kernel` walks the chunk boundaries in order to turn those into the state entering each
chunk, and a second launch of :func:`_fwd_kernel` produces the outputs from the right entry states.
With one chunk, one launch does everything.

Every tensor is read through its strides, and the tokens of a direction through :func:`token_index`,
so token-major views and reversed or column-major directions are read in place.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import Plan, load_bc, load_rows, load_step, softplus, step_rows, store_rows, token_index

__all__ = ["kernel_flags", "launch_boundary", "launch_forward"]


@triton.jit
def _fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    dtw_ptr,
    dirs_ptr,
    out_ptr,
    entry_ptr,
    end_ptr,
    dtsum_ptr,
    L,
    H,
    W,
    Dtot,
    C_dir,
    dpg,
    N,
    chunk_len,
    n_chunks,
    su_b,
    su_c,
    su_t,
    su_k,
    sd_b,
    sd_c,
    sd_t,
    sz_b,
    sz_c,
    sz_t,
    sz_k,
    so_b,
    so_c,
    so_t,
    sB_b,
    sB_g,
    sB_n,
    sB_t,
    sC_b,
    sC_g,
    sC_n,
    sC_t,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB: tl.constexpr,
    MATH: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_DIRS: tl.constexpr,
    EVEN_N: tl.constexpr,
    LOAD_ENTRY: tl.constexpr,
    STORE_OUT: tl.constexpr,
    STORE_END: tl.constexpr,
    STORE_DTSUM: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    d0 = pid_d * BLOCK_D
    k = d0 // C_dir  # direction of this block (all its channels share it, and their B/C group)
    grp = d0 // dpg
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Dtot
    mask_n = offs_n < N

    # States are (N, channels) tiles, channels across threads, the N states of a channel in its thread.
    # A is pre-multiplied by log2(e) so that the decay is one exp2.
    A2 = load_rows(A_ptr + offs_d * N, 1, mask_d, N, BLOCK_N, BLOCK_D, MATH) * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(MATH)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(MATH)
    if HAS_DIRS:
        code = tl.load(dirs_ptr + k)
    else:
        code = 0

    ch = offs_d - k * C_dir  # channel inside the direction: u and z may be shared by all directions
    u_row = u_ptr + pid_b * su_b + k * su_k + ch * su_c
    delta_row, dt_weights = step_rows(
        delta_ptr, dtw_ptr, pid_b * sd_b, sd_c, k, offs_d, mask_d, RANK, BLOCK_R, BLOCK_D, MATH
    )
    out_row = out_ptr + pid_b * so_b + offs_d * so_c
    if HAS_Z:
        z_row = z_ptr + pid_b * sz_b + k * sz_k + ch * sz_c
    B_row = B_ptr + pid_b * sB_b + grp * sB_g + offs_n * sB_n
    C_row = C_ptr + pid_b * sC_b + grp * sC_g + offs_n * sC_n
    state_at = (pid_b * n_chunks + pid_c) * N * Dtot + offs_d  # row 0 of this chunk's (N, D) states

    if LOAD_ENTRY:
        h = load_rows(entry_ptr + state_at, Dtot, mask_d, N, BLOCK_N, BLOCK_D, MATH)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=MATH)
    dtsum = tl.zeros((BLOCK_D,), dtype=MATH)
    start = pid_c * chunk_len
    stop = tl.minimum(start + chunk_len, L)
    for t0 in range(start, stop, SUB):
        for j in tl.static_range(SUB):
            p = t0 + j
            valid = p < stop
            s = token_index(p, code, L, W, H, HAS_DIRS)
            mask_t = mask_d & valid
            u = tl.load(u_row + s * su_t, mask=mask_t, other=0.0).to(MATH)
            dt = load_step(delta_row, s * sd_t, mask_t, valid, dt_weights, RANK, BLOCK_R, MATH)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = softplus(dt)
            dt = tl.where(mask_t, dt, 0.0)  # tokens past the chunk: decay 1, drive 0
            Bt = load_bc(B_row + s * sB_t, valid, mask_n, EVEN_N, MATH)
            h = tl.exp2(A2 * dt[None, :]) * h + Bt[:, None] * (dt * u)[None, :]
            if STORE_DTSUM:
                dtsum += dt
            if STORE_OUT:
                Ct = load_bc(C_row + s * sC_t, valid, mask_n, EVEN_N, MATH)
                y = tl.sum(h * Ct[:, None], axis=0)
                if HAS_D:
                    y += u * Dv
                if HAS_Z:
                    zt = tl.load(z_row + s * sz_t, mask=mask_t, other=0.0).to(MATH)
                    y = y * zt * tl.sigmoid(zt)
                tl.store(out_row + s * so_t, y.to(out_ptr.dtype.element_ty), mask=mask_t)
    if STORE_END:
        store_rows(end_ptr + state_at, Dtot, h, mask_d, N, BLOCK_N)
    if STORE_DTSUM:
        tl.store(dtsum_ptr + (pid_b * n_chunks + pid_c) * Dtot + offs_d, dtsum, mask=mask_d)


@triton.jit
def _boundary_kernel(
    A_ptr,
    local_ptr,
    dtsum_ptr,
    init_ptr,
    final_ptr,
    Dtot,
    N,
    n_chunks,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MATH: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_INIT: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    """Chain chunk-local results across chunk boundaries: ``x <- exp(A * sum dt) x + local``, in place.

    ``local`` (batch, n_chunks, N, channels) holds each chunk's result from a zero start and is overwritten
    with the value entering each chunk (in walking order: forward for states, reverse for adjoints).
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dtot
    A2 = load_rows(A_ptr + offs_d * N, 1, mask_d, N, BLOCK_N, BLOCK_D, MATH) * 1.4426950408889634
    if HAS_INIT:
        x = load_rows(init_ptr + pid_b * N * Dtot + offs_d, Dtot, mask_d, N, BLOCK_N, BLOCK_D, MATH)
    else:
        x = tl.zeros((BLOCK_N, BLOCK_D), dtype=MATH)
    for i in range(0, n_chunks):
        if REVERSE:
            c = n_chunks - 1 - i
        else:
            c = i
        chunk_at = (pid_b * n_chunks + c) * N * Dtot + offs_d
        local = load_rows(local_ptr + chunk_at, Dtot, mask_d, N, BLOCK_N, BLOCK_D, MATH)
        dtsum = tl.load(dtsum_ptr + (pid_b * n_chunks + c) * Dtot + offs_d, mask=mask_d, other=0.0)
        store_rows(local_ptr + chunk_at, Dtot, x, mask_d, N, BLOCK_N)
        x = tl.exp2(A2 * dtsum[None, :]) * x + local
    if STORE_FINAL:
        store_rows(final_ptr + pid_b * N * Dtot + offs_d, Dtot, x, mask_d, N, BLOCK_N)


def strides(t: Tensor) -> tuple[int, ...]:
    """(batch, channel, token) strides of a 3-D activation."""
    return (t.stride(0), t.stride(1), t.stride(2))


def kernel_flags(problem, plan: Plan, D, z, delta_bias, delta_softplus) -> dict:
    """The compile-time flags (block sizes, optional inputs, dtypes) shared by the forward and backward kernels."""
    return {
        "BLOCK_D": plan.block_d,
        "BLOCK_N": triton.next_power_of_2(problem.dstate),
        "SUB": plan.sub,
        "MATH": problem.math_dtype,
        "HAS_D": D is not None,
        "HAS_Z": z is not None,
        "HAS_BIAS": delta_bias is not None,
        "RANK": problem.rank,
        "BLOCK_R": triton.next_power_of_2(max(problem.rank, 1)),
        "SOFTPLUS": bool(delta_softplus),
        "HAS_DIRS": problem.has_dirs,
        "EVEN_N": problem.dstate == triton.next_power_of_2(problem.dstate),
    }


def launch_boundary(problem, plan: Plan, A, local, dtsum, init, final, reverse: bool) -> None:
    """Run :func:`_boundary_kernel` over (batch, n_chunks, N, channels) ``local`` in place."""
    p = problem
    _boundary_kernel[(p.total_channels // plan.block_d, p.batch)](
        A,
        local,
        dtsum,
        init if init is not None else local,
        final if final is not None else local,
        p.total_channels,
        p.dstate,
        plan.n_chunks,
        BLOCK_D=plan.block_d,
        BLOCK_N=triton.next_power_of_2(p.dstate),
        MATH=p.math_dtype,
        REVERSE=reverse,
        HAS_INIT=init is not None,
        STORE_FINAL=final is not None,
        num_warps=plan.num_warps,
    )


def launch_forward(
    problem,
    plan: Plan,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    out: Tensor | None,
    last: Tensor | None,
    dt_weight: Tensor | None = None,
) -> Tensor | None:
    """Run the forward for a :class:`~.multi_direction.ScanProblem`; return the chunk-entry states.

    ``out`` (batch, K*C, L), any strides, and ``last`` (batch, N, K*C) are written when given. With a
    low-rank problem (``problem.rank`` > 0), ``delta`` is the (batch, K*R, L) low-rank step input and
    ``dt_weight`` the contiguous (K*C, R) projection (mamba_ssm's ``delta_proj_weight``). With more
    than one chunk the states entering each chunk, (batch, n_chunks, N, K*C) in the math dtype, are
    returned (the backward starts from them); with one chunk, None (the entry state is zero).
    """
    p = problem
    f = u.dtype if u.dtype == torch.float64 else torch.float32
    dummy = delta  # stands in for absent optional tensors (never read: the flags compile them out)
    out_t = out if out is not None else delta

    def args(entry, end, dtsum):
        return (
            u,
            delta,
            A,
            B,
            C,
            D if D is not None else dummy,
            z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            dt_weight if dt_weight is not None else dummy,
            p.dirs,
            out_t,
            entry,
            end,
            dtsum,
            p.length,
            p.height,
            p.width,
            p.total_channels,
            p.channels,
            p.per_group,
            p.dstate,
            plan.chunk,
            plan.n_chunks,
            *strides(u),
            p.u_dir_stride,
            *strides(delta),
            *(strides(z) if z is not None else (0, 0, 0)),
            p.z_dir_stride,
            *strides(out_t),
            *B.stride(),
            *C.stride(),
        )

    flags = kernel_flags(p, plan, D, z, delta_bias, delta_softplus)
    grid = (p.total_channels // plan.block_d, p.batch, plan.n_chunks)
    if plan.n_chunks == 1:
        _fwd_kernel[grid](
            *args(dummy, last if last is not None else dummy, dummy),
            **flags,
            LOAD_ENTRY=False,
            STORE_OUT=out is not None,
            STORE_END=last is not None,
            STORE_DTSUM=False,
            num_warps=plan.num_warps,
        )
        return None
    states = torch.empty((p.batch, plan.n_chunks, p.dstate, p.total_channels), dtype=f, device=u.device)
    dtsum = torch.empty((p.batch, plan.n_chunks, p.total_channels), dtype=f, device=u.device)
    _fwd_kernel[grid](
        *args(dummy, states, dtsum),
        **flags,
        LOAD_ENTRY=False,
        STORE_OUT=False,
        STORE_END=True,
        STORE_DTSUM=True,
        num_warps=plan.num_warps,
    )
    launch_boundary(p, plan, A, states, dtsum, None, last, reverse=False)
    if out is not None:
        _fwd_kernel[grid](
            *args(states, dummy, dummy),
            **flags,
            LOAD_ENTRY=True,
            STORE_OUT=True,
            STORE_END=False,
            STORE_DTSUM=False,
            num_warps=plan.num_warps,
        )
    return states
