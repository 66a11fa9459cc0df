"""Forward selective-scan kernel: one program per (block of channels, batch row), state in registers.

A program owns ``BLOCK_D`` channels of one direction and one group (they share B and C) for one batch
row, and walks the sequence in chunks of ``CHUNK`` tokens. Per chunk it loads (BLOCK_D, CHUNK) tiles of
u, delta and z and (N, CHUNK) tiles of B and C, forms ``exp(dt * A)`` and ``dt * B * u`` as
(BLOCK_D, N, CHUNK) tiles, runs an associative scan along the chunk, adds the carried state through the
running decay, and reduces against C for y. softplus(delta + delta_bias), the D skip and the silu(z) gate
are fused; the math runs in float32 (float64 for float64 inputs). Nothing of size (N, L) is written: on
request the state entering each chunk is saved (for the backward) and the state after the last token.

The tokens of a direction are read and written through :func:`token_index`, so a reversed or
column-major scan over a grid reads the row-major tensors in place.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    INTERPRETED,
    INTERPRETER_CHUNK,
    config_pruner,
    forward_configs,
    interpreter_block_d,
    length_bucket,
    linear_combine,
    scan_flags,
    softplus,
    token_index,
)

__all__ = ["launch_forward"]

_KEY = ["Dtot", "dpg", "N", "L_BUCKET", "HAS_Z", "HAS_DIRS", "STORE_OUT", "STORE_STATES"]


@triton.jit
def _scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    dirs_ptr,
    out_ptr,
    last_ptr,
    states_ptr,
    L,
    H,
    W,
    Dtot,
    C_dir,
    dpg,
    N,
    L_BUCKET,
    su_b,
    su_c,
    su_k,
    sz_b,
    sz_c,
    sz_k,
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
    STORE_OUT: tl.constexpr,
    STORE_LAST: tl.constexpr,
    STORE_STATES: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * BLOCK_D
    k = d0 // C_dir  # direction of this block (all its channels share it, and their B/C group)
    g = d0 // dpg
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    jj = tl.arange(0, CHUNK)
    mask_n = offs_n < N
    mask_dn = (offs_d[:, None] < Dtot) & mask_n[None, :]

    # A is pre-multiplied by log2(e) so that the decay is one exp2.
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(MATH)
    A = A * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(MATH)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(MATH)
    if HAS_DIRS:
        code = tl.load(dirs_ptr + k)
    else:
        code = 0

    ch = offs_d - k * C_dir  # channel inside the direction: u and z may be shared by all directions
    u_rows = u_ptr + pid_b * su_b + k * su_k + ch[:, None] * su_c
    delta_rows = delta_ptr + (pid_b * Dtot + offs_d[:, None]) * L
    out_rows = out_ptr + (pid_b * Dtot + offs_d[:, None]) * L
    if HAS_Z:
        z_rows = z_ptr + pid_b * sz_b + k * sz_k + ch[:, None] * sz_c
    B_rows = B_ptr + pid_b * sB_b + g * sB_g + offs_n[:, None] * L
    C_rows = C_ptr + pid_b * sC_b + g * sC_g + offs_n[:, None] * L
    n_chunks = tl.cdiv(L, CHUNK)
    state_rows = states_ptr + ((pid_b * Dtot + offs_d[:, None]) * n_chunks) * N + offs_n[None, :]

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=MATH)
    for ci in range(0, n_chunks):
        if STORE_STATES:
            tl.store(state_rows + ci * N, h, mask=mask_dn)
        p = ci * CHUNK + jj
        s = token_index(p, code, L, W, H, HAS_DIRS)[None, :]
        mask_t = (offs_d[:, None] < Dtot) & (p < L)[None, :]
        mask_nt = mask_n[:, None] & (p < L)[None, :]
        u = tl.load(u_rows + s, mask=mask_t, other=0.0).to(MATH)
        dt = tl.load(delta_rows + s, mask=mask_t, other=0.0).to(MATH)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(mask_t, dt, 0.0)  # padded tokens: decay 1, drive 0
        Bt = tl.load(B_rows + s, mask=mask_nt, other=0.0).to(MATH)
        decay = tl.exp2(dt[:, None, :] * A[:, :, None])
        drive = (dt * u)[:, None, :] * Bt[None, :, :]
        prod, local = tl.associative_scan((decay, drive), 2, linear_combine)
        hs = local + prod * h[:, :, None]
        if STORE_OUT:
            Ct = tl.load(C_rows + s, mask=mask_nt, other=0.0).to(MATH)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += u * Dv[:, None]
            if HAS_Z:
                zt = tl.load(z_rows + s, mask=mask_t, other=0.0).to(MATH)
                y = y * zt * tl.sigmoid(zt)
            tl.store(out_rows + s, y.to(out_ptr.dtype.element_ty), mask=mask_t)
        # Padded tokens carry the state unchanged, so the last column is the state after the chunk.
        h = tl.sum(tl.where((jj == CHUNK - 1)[None, None, :], hs, 0.0), axis=2)
    if STORE_LAST:
        tl.store(last_ptr + (pid_b * Dtot + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


def _tuned(tune_chunk: bool):
    """The autotuned forward: over BLOCK_D and warps, and over CHUNK too when no states are saved."""
    return triton.autotune(
        configs=forward_configs(tune_chunk),
        key=_KEY,
        prune_configs_by={"early_config_prune": config_pruner(per_thread=8)},
    )(_scan_fwd_kernel)


_TUNED = {} if INTERPRETED else {True: _tuned(True), False: _tuned(False)}


def launch_forward(
    problem,
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
    states: Tensor | None,
    chunk: int | None,
) -> None:
    """Run the forward kernel for a :class:`~.multi_direction.ScanProblem` (tensors already laid out).

    ``out`` (batch, K*C, L) in storage order, ``last`` (batch, K*C, N) and ``states``
    (batch, K*C, n_chunks, N) are written when given; ``chunk`` must be given with ``states`` (the
    backward uses the same chunks) and is tuned otherwise.
    """
    p = problem
    dummy = delta  # stands in for absent optional tensors (never read: the flags compile them out)
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
        out if out is not None else dummy,
        last if last is not None else dummy,
        states if states is not None else dummy,
        p.length,
        p.height,
        p.width,
        p.total_channels,
        p.channels,
        p.per_group,
        p.dstate,
        length_bucket(p.length),
        *p.u_strides,
        *p.z_strides,
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
    )
    flags = {
        **scan_flags(p, D, z, delta_bias, delta_softplus),
        "STORE_OUT": out is not None,
        "STORE_LAST": last is not None,
        "STORE_STATES": states is not None,
    }
    if chunk is None and states is not None:
        raise ValueError("launch_forward: saving chunk states needs the chunk length")
    if INTERPRETED:
        block_d = interpreter_block_d(p.per_group)
        grid = (p.total_channels // block_d, p.batch)
        _scan_fwd_kernel[grid](*args, **flags, CHUNK=chunk or INTERPRETER_CHUNK, BLOCK_D=block_d)
        return
    if chunk is not None:
        flags["CHUNK"] = chunk

    def grid(meta):
        return (p.total_channels // meta["BLOCK_D"], p.batch)

    # FMA contraction on (nvcc's default); passing it also keeps triton 3.9's fp-fusion warning quiet.
    _TUNED[chunk is None][grid](*args, **flags, enable_fp_fusion=True)
