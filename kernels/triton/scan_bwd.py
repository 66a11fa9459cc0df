"""Backward selective-scan kernel: a reverse walk over the chunks that recomputes the states.

The grid is the forward's: one program per (block of channels, batch row). It visits the chunks last to
first. For each chunk it rebuilds the states from the saved state entering the chunk (the forward's scan
again, in registers), recomputes y for the gate's gradient, and runs the adjoint recurrence
``g_t = dy_t * C_t + exp(dt_{t+1} A) * g_{t+1}`` as a forward associative scan over the chunk read back to
front (its inputs are loaded in that order and the result is flipped back in registers, rather than
relying on a reversed scan), carrying g across chunks. From the states h and adjoints g it forms

- du, ddelta, dz per token (written in place, in storage order);
- dB_t = sum_d g dt u and dC_t = sum_d dy h, first summed over the program's BLOCK_D channels and then
  added with one atomic add per (n, token) per program, so only dim/G/BLOCK_D programs meet at an
  address (the B/C group's blocks of channels), not every channel;
- dA, dD and ddelta_bias summed over the whole sequence in registers and written once per
  (batch row, channel): the caller sums the batch rows.

The decay's gradient uses ``exp(dt_t A) h_{t-1} = h_t - dt_t B_t u_t``, so the shifted state is never
needed.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    INTERPRETED,
    backward_configs,
    config_pruner,
    interpreter_block_d,
    length_bucket,
    linear_combine,
    scan_flags,
    softplus,
    token_index,
)

__all__ = ["launch_backward"]

_KEY = ["Dtot", "dpg", "N", "L_BUCKET", "HAS_Z", "HAS_DIRS"]


@triton.jit
def _scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    dirs_ptr,
    states_ptr,
    dout_ptr,
    dlast_ptr,
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
    L_BUCKET,
    dout_scale,
    su_b,
    su_c,
    su_k,
    sz_b,
    sz_c,
    sz_k,
    so_b,
    so_c,
    so_k,
    sB_b,
    sB_g,
    sC_b,
    sC_g,
    BLOCK_N: tl.constexpr,
    MATH: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_DIRS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * BLOCK_D
    k = d0 // C_dir
    g_id = d0 // dpg
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    jj = tl.arange(0, CHUNK)
    mask_n = offs_n < N
    mask_dn = (offs_d[:, None] < Dtot) & mask_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(MATH)
    A2 = A * 1.4426950408889634  # exp(dt * A) = exp2(dt * A2)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(MATH)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(MATH)
    if HAS_DIRS:
        code = tl.load(dirs_ptr + k)
    else:
        code = 0

    ch = offs_d - k * C_dir
    u_rows = u_ptr + pid_b * su_b + k * su_k + ch[:, None] * su_c
    dout_rows = dout_ptr + pid_b * so_b + k * so_k + ch[:, None] * so_c
    if HAS_Z:
        z_rows = z_ptr + pid_b * sz_b + k * sz_k + ch[:, None] * sz_c
    row = (pid_b * Dtot + offs_d[:, None]) * L
    groups = Dtot // dpg
    B_rows = B_ptr + pid_b * sB_b + g_id * sB_g + offs_n[:, None] * L
    C_rows = C_ptr + pid_b * sC_b + g_id * sC_g + offs_n[:, None] * L
    dBC_rows = ((pid_b * groups + g_id) * N + offs_n[:, None]) * L
    n_chunks = tl.cdiv(L, CHUNK)
    state_rows = states_ptr + ((pid_b * Dtot + offs_d[:, None]) * n_chunks) * N + offs_n[None, :]
    if HAS_DLAST:
        dlast = tl.load(dlast_ptr + (pid_b * Dtot + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn)
        dlast = dlast.to(MATH)

    g_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=MATH)  # adjoint at the first token of the later chunk
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=MATH)
    dD_acc = tl.zeros((BLOCK_D,), dtype=MATH)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=MATH)
    for i in range(0, n_chunks):
        ci = n_chunks - 1 - i
        p = ci * CHUNK + jj
        s = token_index(p, code, L, W, H, HAS_DIRS)[None, :]
        mask_t = (offs_d[:, None] < Dtot) & (p < L)[None, :]
        mask_nt = mask_n[:, None] & (p < L)[None, :]

        # Rebuild the chunk's states (as in the forward).
        h0 = tl.load(state_rows + ci * N, mask=mask_dn, other=0.0)
        u = tl.load(u_rows + s, mask=mask_t, other=0.0).to(MATH)
        dt_raw = tl.load(delta_ptr + row + s, mask=mask_t, other=0.0).to(MATH)
        if HAS_BIAS:
            dt_raw = dt_raw + bias[:, None]
        if SOFTPLUS:
            dt = softplus(dt_raw)
        else:
            dt = dt_raw
        dt = tl.where(mask_t, dt, 0.0)
        Bt = tl.load(B_rows + s, mask=mask_nt, other=0.0).to(MATH)
        Ct = tl.load(C_rows + s, mask=mask_nt, other=0.0).to(MATH)
        decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
        drive = (dt * u)[:, None, :] * Bt[None, :, :]
        prod, local = tl.associative_scan((decay, drive), 2, linear_combine)
        hs = local + prod * h0[:, :, None]

        # Output side: the gate, the D skip, dC.
        dy = tl.load(dout_rows + s, mask=mask_t, other=0.0).to(MATH) * dout_scale
        if HAS_Z:
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += u * Dv[:, None]
            zt = tl.load(z_rows + s, mask=mask_t, other=0.0).to(MATH)
            sig = tl.sigmoid(zt)
            dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + row + s, dz.to(dz_ptr.dtype.element_ty), mask=mask_t)
            dy = dy * zt * sig
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
            du = dy * Dv[:, None]
        else:
            du = tl.zeros((BLOCK_D, CHUNK), dtype=MATH)
        dC = tl.sum(dy[:, None, :] * hs, axis=0)
        tl.atomic_add(dC_ptr + dBC_rows + s, dC, mask=mask_nt)

        # Adjoint g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}: a forward scan over the chunk read back to
        # front (its inputs are loaded in that order; only g is flipped back, in registers).
        p_rev = ci * CHUNK + (CHUNK - 1 - jj)
        s_rev = token_index(p_rev, code, L, W, H, HAS_DIRS)[None, :]
        mask_rev = (offs_d[:, None] < Dtot) & (p_rev < L)[None, :]
        dy_rev = tl.load(dout_rows + s_rev, mask=mask_rev, other=0.0).to(MATH) * dout_scale
        if HAS_Z:
            z_rev = tl.load(z_rows + s_rev, mask=mask_rev, other=0.0).to(MATH)
            dy_rev = dy_rev * z_rev * tl.sigmoid(z_rev)
        C_rev = tl.load(C_rows + s_rev, mask=mask_n[:, None] & (p_rev < L)[None, :], other=0.0).to(MATH)
        p_next = p_rev + 1
        s_next = token_index(p_next, code, L, W, H, HAS_DIRS)[None, :]
        mask_next = (offs_d[:, None] < Dtot) & (p_next < L)[None, :]
        dt_next = tl.load(delta_ptr + row + s_next, mask=mask_next, other=0.0).to(MATH)
        if HAS_BIAS:
            dt_next = dt_next + bias[:, None]
        if SOFTPLUS:
            dt_next = softplus(dt_next)
        dt_next = tl.where(mask_next, dt_next, 0.0)
        decay_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        emit = dy_rev[:, None, :] * C_rev[None, :, :]
        if HAS_DLAST:
            emit += tl.where((p_rev == L - 1)[None, None, :], dlast[:, :, None], 0.0)
        prod_r, local_r = tl.associative_scan((decay_next, emit), 2, linear_combine)
        g_rev = local_r + prod_r * g_carry[:, :, None]
        g_carry = tl.sum(tl.where((jj == CHUNK - 1)[None, None, :], g_rev, 0.0), axis=2)
        g = tl.flip(g_rev, 2)

        # Input side.
        dlog_decay = g * (hs - drive)  # gradient w.r.t. dt * A: g_t * exp(dt_t A) * h_{t-1}
        gB = tl.sum(g * Bt[None, :, :], axis=1)
        ddt = tl.sum(dlog_decay * A[:, :, None], axis=1) + gB * u
        du += gB * dt
        tl.store(du_ptr + row + s, du.to(du_ptr.dtype.element_ty), mask=mask_t)
        dA_acc += tl.sum(dlog_decay * dt[:, None, :], axis=2)
        dB = tl.sum(g * (dt * u)[:, None, :], axis=0)
        tl.atomic_add(dB_ptr + dBC_rows + s, dB, mask=mask_nt)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(mask_t, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(ddelta_ptr + row + s, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_t)

    tl.store(dA_ptr + (pid_b * Dtot + offs_d[:, None]) * N + offs_n[None, :], dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * Dtot + offs_d, dD_acc)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * Dtot + offs_d, dbias_acc)


_TUNED = (
    None
    if INTERPRETED
    else triton.autotune(
        configs=backward_configs(),
        key=_KEY,
        prune_configs_by={"early_config_prune": config_pruner(per_thread=4)},
        reset_to_zero=["dB_ptr", "dC_ptr"],
    )(_scan_bwd_kernel)
)


def launch_backward(
    problem,
    dout: Tensor,
    dout_strides: tuple[int, int, int],
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
    states: Tensor,
    chunk: int,
    grads: dict[str, Tensor],
) -> None:
    """Run the backward kernel for a :class:`~.multi_direction.ScanProblem`.

    ``dout`` is read at ``(batch, channel-in-direction, direction)`` strides ``dout_strides`` and scaled
    by ``dout_scale`` (a merged output gives every direction the same gradient). ``grads`` holds the
    buffers the kernel fills: ``du``, ``ddelta``, ``dz`` (batch, K*C, L); ``dB``, ``dC`` (batch, K*G, N, L)
    zero-initialised accumulators; ``dA`` (batch, K*C, N); ``dD``, ``ddelta_bias`` (batch, K*C).
    """
    p = problem
    dummy = grads["ddelta"]
    args = (
        u,
        delta,
        A,
        B,
        C,
        D if D is not None else dummy,
        z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy,
        p.dirs,
        states,
        dout,
        dlast if dlast is not None else dummy,
        grads["du"],
        grads["ddelta"],
        grads.get("dz", dummy),
        grads["dB"],
        grads["dC"],
        grads["dA"],
        grads.get("dD", dummy),
        grads.get("ddelta_bias", dummy),
        p.length,
        p.height,
        p.width,
        p.total_channels,
        p.channels,
        p.per_group,
        p.dstate,
        length_bucket(p.length),
        float(dout_scale),
        *p.u_strides,
        *p.z_strides,
        *dout_strides,
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
    )
    flags = {
        **scan_flags(p, D, z, delta_bias, delta_softplus),
        "HAS_DLAST": dlast is not None,
        "CHUNK": chunk,
    }
    if INTERPRETED:
        block_d = interpreter_block_d(p.per_group)
        _scan_bwd_kernel[(p.total_channels // block_d, p.batch)](*args, **flags, BLOCK_D=block_d)
        return

    def grid(meta):
        return (p.total_channels // meta["BLOCK_D"], p.batch)

    _TUNED[grid](*args, **flags, enable_fp_fusion=True)
