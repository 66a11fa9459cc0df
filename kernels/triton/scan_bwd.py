"""Backward selective scan: a reverse walk per thread over its channel's tokens, states recomputed.

The grid is the forward's: one program per (block of channels, batch row, chunk), one thread per
channel. The adjoint ``g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}`` runs back to front and needs the
forward state h_t at every token, which is never stored. So:

1. :func:`_bwd_local_kernel` walks each chunk forward from its entry state (saved by the forward, or
   recomputed) and writes a checkpoint of the state every ``SUB`` tokens. With several chunks it also
   walks the chunk backward from a zero adjoint, for the chunk-local adjoint entering the chunk from its
   end; :func:`~.scan_fwd._boundary_kernel` chains those from the last chunk to the first (the decay of a
   chunk is ``exp(A * sum dt)`` both ways), starting from the gradient of the last state.
2. :func:`_bwd_kernel` walks each chunk back to front, ``SUB`` tokens at a time: it rebuilds the SUB
   states from the checkpoint into a (SUB, N, channels) register tile (the SUB axis lies inside each
   thread and is indexed with constants, so it is plain registers), then steps the adjoint back over
   them, forming per token du, ddelta, dz (stored) and dB_t = sum_d g dt u, dC_t = sum_d dy h (summed
   over the program's channels, then one fp32 atomic add per (token, state) per program); dA, dD and
   ddelta_bias are summed in registers and written once per (batch row, chunk, channel).

The decay's gradient uses ``exp(dt_t A) h_{t-1} = h_t - dt_t B_t u_t``, so the shifted state is never
needed.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import Plan, load_bc, load_rows, load_step, softplus, step_rows, store_rows, token_index
from .scan_fwd import kernel_flags, launch_boundary, strides

__all__ = ["launch_backward"]


@triton.jit
def _bwd_local_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    z_ptr,
    bias_ptr,
    dtw_ptr,
    dirs_ptr,
    dout_ptr,
    entry_ptr,
    ckpt_ptr,
    carry_ptr,
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
    n_ckpt,
    dout_scale,
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
    sg_b,
    sg_c,
    sg_t,
    sg_k,
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
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_DIRS: tl.constexpr,
    EVEN_N: tl.constexpr,
    LOAD_ENTRY: tl.constexpr,
    LOCAL_CARRY: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    d0 = pid_d * BLOCK_D
    k = d0 // C_dir
    grp = d0 // dpg
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Dtot
    mask_n = offs_n < N
    A2 = load_rows(A_ptr + offs_d * N, 1, mask_d, N, BLOCK_N, BLOCK_D, MATH) * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(MATH)
    if HAS_DIRS:
        code = tl.load(dirs_ptr + k)
    else:
        code = 0
    ch = offs_d - k * C_dir
    u_row = u_ptr + pid_b * su_b + k * su_k + ch * su_c
    delta_row, dt_weights = step_rows(
        delta_ptr, dtw_ptr, pid_b * sd_b, sd_c, k, offs_d, mask_d, RANK, BLOCK_R, BLOCK_D, MATH
    )
    dout_row = dout_ptr + pid_b * sg_b + k * sg_k + ch * sg_c
    if HAS_Z:
        z_row = z_ptr + pid_b * sz_b + k * sz_k + ch * sz_c
    B_row = B_ptr + pid_b * sB_b + grp * sB_g + offs_n * sB_n
    C_row = C_ptr + pid_b * sC_b + grp * sC_g + offs_n * sC_n
    state_at = (pid_b * n_chunks + pid_c) * N * Dtot + offs_d  # row 0 of this chunk's (N, D) states

    if LOAD_ENTRY:
        h = load_rows(entry_ptr + state_at, Dtot, mask_d, N, BLOCK_N, BLOCK_D, MATH)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=MATH)
    start = pid_c * chunk_len
    stop = tl.minimum(start + chunk_len, L)
    for t0 in range(start, stop, 2 * SUB):
        ckpt_at = (pid_b * n_ckpt + t0 // (2 * SUB)) * N * Dtot + offs_d
        store_rows(ckpt_ptr + ckpt_at, Dtot, h, mask_d, N, BLOCK_N)
        for j in tl.static_range(2 * SUB):
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
            dt = tl.where(mask_t, dt, 0.0)
            Bt = load_bc(B_row + s * sB_t, valid, mask_n, EVEN_N, MATH)
            h = tl.exp2(A2 * dt[None, :]) * h + Bt[:, None] * (dt * u)[None, :]

    if LOCAL_CARRY:
        # The adjoint from a zero start at the chunk's end, walked to its first token: what the chunk adds
        # to the adjoint carried into the chunk before it.
        q = tl.zeros((BLOCK_N, BLOCK_D), dtype=MATH)
        dtsum = tl.zeros((BLOCK_D,), dtype=MATH)
        n_steps = tl.cdiv(stop - start, SUB)
        for i in range(0, n_steps):
            t0 = start + (n_steps - 1 - i) * SUB
            for j in tl.static_range(SUB):
                p = t0 + (SUB - 1 - j)
                valid = p < stop
                s = token_index(p, code, L, W, H, HAS_DIRS)
                mask_t = mask_d & valid
                dt = load_step(delta_row, s * sd_t, mask_t, valid, dt_weights, RANK, BLOCK_R, MATH)
                if HAS_BIAS:
                    dt = dt + bias
                if SOFTPLUS:
                    dt = softplus(dt)
                dt = tl.where(mask_t, dt, 0.0)
                dy = tl.load(dout_row + s * sg_t, mask=mask_t, other=0.0).to(MATH) * dout_scale
                if HAS_Z:
                    zt = tl.load(z_row + s * sz_t, mask=mask_t, other=0.0).to(MATH)
                    dy = dy * zt * tl.sigmoid(zt)
                Ct = load_bc(C_row + s * sC_t, valid, mask_n, EVEN_N, MATH)
                q = tl.exp2(A2 * dt[None, :]) * (Ct[:, None] * dy[None, :] + q)
                dtsum += dt
        store_rows(carry_ptr + state_at, Dtot, q, mask_d, N, BLOCK_N)
        tl.store(dtsum_ptr + (pid_b * n_chunks + pid_c) * Dtot + offs_d, dtsum, mask=mask_d)


@triton.jit
def _bwd_kernel(
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
    dout_ptr,
    dlast_ptr,
    ckpt_ptr,
    carry_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dB_ptr,
    dC_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    L,
    H,
    W,
    Dtot,
    C_dir,
    dpg,
    N,
    chunk_len,
    n_chunks,
    n_ckpt,
    dout_scale,
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
    sg_b,
    sg_c,
    sg_t,
    sg_k,
    sdu_b,
    sdu_c,
    sdu_t,
    sdd_b,
    sdd_c,
    sdd_t,
    sdz_b,
    sdz_c,
    sdz_t,
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
    HAS_DLAST: tl.constexpr,
    LOAD_CARRY: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    d0 = pid_d * BLOCK_D
    k = d0 // C_dir
    grp = d0 // dpg
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Dtot
    mask_n = offs_n < N
    # Only A * log2(e) is kept (registers are short here): A itself is that times ln(2).
    A2 = load_rows(A_ptr + offs_d * N, 1, mask_d, N, BLOCK_N, BLOCK_D, MATH) * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(MATH)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(MATH)
    if HAS_DIRS:
        code = tl.load(dirs_ptr + k)
    else:
        code = 0
    ch = offs_d - k * C_dir
    u_row = u_ptr + pid_b * su_b + k * su_k + ch * su_c
    delta_row, dt_weights = step_rows(
        delta_ptr, dtw_ptr, pid_b * sd_b, sd_c, k, offs_d, mask_d, RANK, BLOCK_R, BLOCK_D, MATH
    )
    dout_row = dout_ptr + pid_b * sg_b + k * sg_k + ch * sg_c
    du_row = du_ptr + pid_b * sdu_b + offs_d * sdu_c
    ddelta_row = ddelta_ptr + pid_b * sdd_b + offs_d * sdd_c
    if HAS_Z:
        z_row = z_ptr + pid_b * sz_b + k * sz_k + ch * sz_c
        dz_row = dz_ptr + pid_b * sdz_b + offs_d * sdz_c
    B_row = B_ptr + pid_b * sB_b + grp * sB_g + offs_n * sB_n
    C_row = C_ptr + pid_b * sC_b + grp * sC_g + offs_n * sC_n
    dBC_row = (pid_b * (Dtot // dpg) + grp) * L * N + offs_n  # dB, dC buffers are (batch, groups, L, N)
    state_at = (pid_b * n_chunks + pid_c) * N * Dtot + offs_d  # row 0 of this chunk's (N, D) states

    # q: the adjoint carried into the token being visited from the token after it, exp(dt A) g.
    if LOAD_CARRY:
        q = load_rows(carry_ptr + state_at, Dtot, mask_d, N, BLOCK_N, BLOCK_D, MATH)
    elif HAS_DLAST:
        q = load_rows(dlast_ptr + pid_b * N * Dtot + offs_d, Dtot, mask_d, N, BLOCK_N, BLOCK_D, MATH)
    else:
        q = tl.zeros((BLOCK_N, BLOCK_D), dtype=MATH)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=MATH)
    dD_acc = tl.zeros((BLOCK_D,), dtype=MATH)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=MATH)
    slot = tl.arange(0, SUB)[:, None, None]

    start = pid_c * chunk_len
    stop = tl.minimum(start + chunk_len, L)
    n_segs = tl.cdiv(stop - start, 2 * SUB)
    for i in range(0, n_segs):
        t_seg = start + (n_segs - 1 - i) * (2 * SUB)
        ckpt_at = (pid_b * n_ckpt + t_seg // (2 * SUB)) * N * Dtot + offs_d
        h_seg = load_rows(ckpt_ptr + ckpt_at, Dtot, mask_d, N, BLOCK_N, BLOCK_D, MATH)
        # The state halfway through the segment, walked from its checkpoint.
        h_mid = h_seg
        for j in tl.static_range(SUB):
            p = t_seg + j
            valid = p < stop
            s = token_index(p, code, L, W, H, HAS_DIRS)
            mask_t = mask_d & valid
            u = tl.load(u_row + s * su_t, mask=mask_t, other=0.0).to(MATH)
            dt = load_step(delta_row, s * sd_t, mask_t, valid, dt_weights, RANK, BLOCK_R, MATH)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = softplus(dt)
            dt = tl.where(mask_t, dt, 0.0)
            Bt = load_bc(B_row + s * sB_t, valid, mask_n, EVEN_N, MATH)
            h_mid = tl.exp2(A2 * dt[None, :]) * h_mid + Bt[:, None] * (dt * u)[None, :]
        # The second half of the segment, then the first.
        for half in tl.static_range(2):
            if half == 0:
                t0 = t_seg + SUB
                h = h_mid
            else:
                t0 = t_seg
                h = h_seg
            # Rebuild the SUB states of this step (as in the forward).
            hist = tl.zeros((SUB, BLOCK_N, BLOCK_D), dtype=MATH)
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
                dt = tl.where(mask_t, dt, 0.0)
                Bt = load_bc(B_row + s * sB_t, valid, mask_n, EVEN_N, MATH)
                h = tl.exp2(A2 * dt[None, :]) * h + Bt[:, None] * (dt * u)[None, :]
                hist = tl.where(slot == j, h[None, :, :], hist)
            # Step the adjoint back over them.
            for j in tl.static_range(SUB):
                jr = SUB - 1 - j
                p = t0 + jr
                valid = p < stop
                s = token_index(p, code, L, W, H, HAS_DIRS)
                mask_t = mask_d & valid
                h = tl.sum(tl.where(slot == jr, hist, -0.0), axis=0)  # picks slot jr (adding -0.0 is exact)
                u = tl.load(u_row + s * su_t, mask=mask_t, other=0.0).to(MATH)
                dt_in = load_step(delta_row, s * sd_t, mask_t, valid, dt_weights, RANK, BLOCK_R, MATH)
                if HAS_BIAS:
                    dt_in = dt_in + bias
                if SOFTPLUS:
                    dt = softplus(dt_in)
                else:
                    dt = dt_in
                dt = tl.where(mask_t, dt, 0.0)
                Bt = load_bc(B_row + s * sB_t, valid, mask_n, EVEN_N, MATH)
                Ct = load_bc(C_row + s * sC_t, valid, mask_n, EVEN_N, MATH)
                dy = tl.load(dout_row + s * sg_t, mask=mask_t, other=0.0).to(MATH) * dout_scale
                if HAS_Z:
                    zt = tl.load(z_row + s * sz_t, mask=mask_t, other=0.0).to(MATH)
                    sig = tl.sigmoid(zt)
                    y = tl.sum(h * Ct[:, None], axis=0)
                    if HAS_D:
                        y += u * Dv
                    dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
                    tl.store(dz_row + s * sdz_t, dz.to(dz_ptr.dtype.element_ty), mask=mask_t)
                    dy = dy * zt * sig
                g = Ct[:, None] * dy[None, :] + q
                dtu = dt * u
                dC = tl.sum(h * dy[None, :], axis=1)
                tl.atomic_add(dC_ptr + dBC_row + s * N, dC, mask=mask_n & valid)
                dB = tl.sum(g * dtu[None, :], axis=1)
                tl.atomic_add(dB_ptr + dBC_row + s * N, dB, mask=mask_n & valid)
                x = g * (h - Bt[:, None] * dtu[None, :])  # g_t exp(dt_t A) h_{t-1}
                dA_acc += x * dt[None, :]
                gB = tl.sum(g * Bt[:, None], axis=0)
                du = gB * dt
                if HAS_D:
                    du += dy * Dv
                    dD_acc += dy * u
                tl.store(du_row + s * sdu_t, du.to(du_ptr.dtype.element_ty), mask=mask_t)
                ddt = tl.sum(x * A2, axis=0) * 0.6931471805599453 + gB * u
                if SOFTPLUS:
                    ddt = ddt * tl.sigmoid(dt_in)
                ddt = tl.where(mask_t, ddt, 0.0)
                dbias_acc += ddt
                tl.store(ddelta_row + s * sdd_t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_t)
                q = tl.exp2(A2 * dt[None, :]) * g

    store_rows(dA_ptr + state_at, Dtot, dA_acc, mask_d, N, BLOCK_N)
    if HAS_D:
        tl.store(dD_ptr + (pid_b * n_chunks + pid_c) * Dtot + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + (pid_b * n_chunks + pid_c) * Dtot + offs_d, dbias_acc, mask=mask_d)


def launch_backward(
    problem,
    plan: Plan,
    dout: Tensor,
    dout_strides: tuple[int, int, int, int],
    dout_scale: float,
    dlast: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    entry: Tensor | None,
    grads: dict[str, Tensor],
    dt_weight: Tensor | None = None,
) -> None:
    """Run the backward for a :class:`~.multi_direction.ScanProblem`.

    ``dout`` is read at (batch, channel-in-direction, token, direction) strides ``dout_strides`` and
    scaled by ``dout_scale`` (a merged output gives every direction the same gradient). ``dlast`` is
    (batch, N, K*C) or None; ``entry`` the forward's chunk-entry states (None with one chunk). ``grads``
    holds the buffers the kernels fill: ``du``, ``ddelta``, ``dz`` (batch, K*C, L), any strides (``ddelta``
    is the gradient of the projected steps when ``delta`` is low-rank, see ``launch_forward``); ``dB``,
    ``dC`` (batch, K*G, L, N) zero-filled fp32 accumulators; ``dA`` (batch * n_chunks, N, K*C); ``dD``,
    ``ddelta_bias`` (batch * n_chunks, K*C).
    """
    p = problem
    f = grads["dA"].dtype
    chunked = plan.n_chunks > 1
    n_ckpt = -(-p.length // (2 * plan.bwd_sub))
    ckpt = torch.empty((p.batch, n_ckpt, p.dstate, p.total_channels), dtype=f, device=u.device)
    carry = dtsum = None
    if chunked:
        carry = torch.empty((p.batch, plan.n_chunks, p.dstate, p.total_channels), dtype=f, device=u.device)
        dtsum = torch.empty((p.batch, plan.n_chunks, p.total_channels), dtype=f, device=u.device)
    dummy = grads["ddelta"]
    z_strides = (*strides(z), p.z_dir_stride) if z is not None else (0, 0, 0, 0)
    sizes = (
        p.length,
        p.height,
        p.width,
        p.total_channels,
        p.channels,
        p.per_group,
        p.dstate,
        plan.chunk,
        plan.n_chunks,
        n_ckpt,
        float(dout_scale),
        *strides(u),
        p.u_dir_stride,
        *strides(delta),
        *z_strides,
        *dout_strides,
    )
    flags = kernel_flags(p, plan, None, z, delta_bias, delta_softplus)
    del flags["HAS_D"]
    flags.update(BLOCK_D=plan.bwd_block_d, SUB=plan.bwd_sub)
    grid = (p.total_channels // plan.bwd_block_d, p.batch, plan.n_chunks)
    _bwd_local_kernel[grid](
        u,
        delta,
        A,
        B,
        C,
        z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy,
        dt_weight if dt_weight is not None else dummy,
        p.dirs,
        dout,
        entry if entry is not None else dummy,
        ckpt,
        carry if chunked else dummy,
        dtsum if chunked else dummy,
        *sizes,
        *B.stride(),
        *C.stride(),
        **flags,
        LOAD_ENTRY=entry is not None,
        LOCAL_CARRY=chunked,
        num_warps=plan.bwd_warps,
    )
    if chunked:
        launch_boundary(p, plan, A, carry, dtsum, dlast, None, reverse=True)
    dz = grads.get("dz", dummy)
    _bwd_kernel[grid](
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
        dout,
        dlast if dlast is not None else dummy,
        ckpt,
        carry if chunked else dummy,
        grads["du"],
        grads["ddelta"],
        dz,
        grads["dB"],
        grads["dC"],
        grads["dA"],
        grads.get("dD", dummy),
        grads.get("ddelta_bias", dummy),
        *sizes,
        *strides(grads["du"]),
        *strides(grads["ddelta"]),
        *strides(dz),
        *B.stride(),
        *C.stride(),
        **{
            **kernel_flags(p, plan, D, z, delta_bias, delta_softplus),
            "BLOCK_D": plan.bwd_block_d,
            "SUB": plan.bwd_sub,
        },
        HAS_DLAST=dlast is not None,
        LOAD_CARRY=chunked,
        num_warps=plan.bwd_warps,
    )
