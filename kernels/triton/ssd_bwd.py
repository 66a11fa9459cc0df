"""Triton backward of the SSD scan and of its direction sets (the adjoint of ``ssd_fwd``'s fused kernel).

One program owns the same (batch, direction, head, block of headdim) slice as in the forward. It first
walks the chunks forward to recompute the state entering each chunk (written to a float32 scratch buffer,
(chunks, headdim, dstate) per slice), then walks them backward carrying the state gradient ``dS``. Per
chunk, with ``G_ij = (C_i . B_j) exp(cs_i - cs_j) [j <= i]``, ``DX = dY x^T`` and ``T = G * DX * dt_j``:

- ``dx = dt * (G^T dY) + exp(cs_last - cs) dt * (B dS^T)``;
- ``dC = (DX * decay * dt_j) B + exp(cs) * (dY S_in)``, ``dB = (DX * decay * dt_j)^T C + exp(cs_last - cs)
  dt * (x dS)``;
- the step: ``d dt_j`` directly from T's columns and the state term, and through ``cs`` (row sums minus
  column sums of T, the inter-chunk read-out, the state decays), then a reverse cumsum to ``d(dt * A)``;
- ``dS_in = exp(cs_last) dS + dY^T (C exp(cs))``.

Sums over headdim (dB, dC, the step, dA) are partial per headdim block and per direction; they are
written to float32 buffers with a leading ``part`` axis and summed (and summed over the heads of a group)
by the caller. D, the gate and the direction sum are applied outside the kernel, in torch.
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, token_index
from .ssd_fwd import dot_fp32, triton_ssd_forward

__all__ = ["triton_ssd_backward"]


@triton.jit
def _ssd_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, dt_bias_ptr, init_ptr, dy_ptr, dfinal_ptr, states_ptr, dirs_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dinit_ptr,
    batch, L, grid_h, grid_w, heads_per_group, headdim, dstate, nchunks, dt_min, dt_max,
    sx_b, sx_l, sx_h, sx_p,
    sdt_b, sdt_l, sdt_h,
    sb_b, sb_l, sb_g, sb_n,
    sc_b, sc_l, sc_g, sc_n,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_DFINAL: tl.constexpr, HAS_DIRS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_bk = tl.program_id(0)
    head = tl.program_id(1)
    pid_p = tl.program_id(2)
    nheads = tl.num_programs(1)
    k = pid_bk // batch
    b = pid_bk % batch
    part = k * tl.num_programs(2) + pid_p
    code = tl.load(dirs_ptr + k) if HAS_DIRS else 0
    group = head // heads_per_group

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, CHUNK)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    causal = offs_q[:, None] >= offs_q[None, :]
    last = offs_q == CHUNK - 1
    state_mask = mask_p[:, None] & mask_n[None, :]
    pn = offs_p[:, None] * dstate + offs_n[None, :]
    state_base = (b * nheads + head) * headdim * dstate
    scratch_base = (pid_bk * nheads + head) * nchunks * headdim * dstate

    A = tl.load(A_ptr + head).to(tl.float32)
    x_base = x_ptr + b * sx_b + head * sx_h
    B_base = B_ptr + b * sb_b + group * sb_g
    C_base = C_ptr + b * sc_b + group * sc_g

    # Pass 1: the state entering every chunk.
    if HAS_INIT:
        state = tl.load(init_ptr + state_base + pn, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for c in range(0, nchunks):
        tl.store(states_ptr + scratch_base + c * headdim * dstate + pn, state, mask=state_mask)
        pos = c * CHUNK + offs_q
        valid = pos < L
        s = tl.where(valid, token_index(pos, code, L, grid_w, grid_h, HAS_DIRS), 0)
        raw = tl.load(dt_ptr + b * sdt_b + s * sdt_l + head * sdt_h, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(dt_bias_ptr + head).to(tl.float32)
        dt = raw
        if SOFTPLUS:
            dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))), raw)
        if HAS_LIMIT:
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dt = tl.where(valid, dt, 0.0)
        cs = tl.cumsum(dt * A, axis=0)
        cs_last = tl.sum(dt * A, axis=0)
        xs = tl.load(
            x_base + s[:, None] * sx_l + offs_p[None, :] * sx_p,
            mask=valid[:, None] & mask_p[None, :],
            other=0.0,
        )
        Bs = tl.load(
            B_base + s[:, None] * sb_l + offs_n[None, :] * sb_n,
            mask=valid[:, None] & mask_n[None, :],
            other=0.0,
        )
        weight = tl.exp(cs_last - cs) * dt
        state = state * tl.exp(cs_last) + dot_fp32(
            tl.trans(xs), (Bs * weight[:, None]).to(xs.dtype), PRECISION, UPCAST
        )

    # Pass 2: backward through the chunks.
    if HAS_DFINAL:
        dstate_ = tl.load(dfinal_ptr + state_base + pn, mask=state_mask, other=0.0).to(tl.float32)
    else:
        dstate_ = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for i in range(0, nchunks):
        c = nchunks - 1 - i
        s_in = tl.load(states_ptr + scratch_base + c * headdim * dstate + pn, mask=state_mask, other=0.0)
        pos = c * CHUNK + offs_q
        valid = pos < L
        s = tl.where(valid, token_index(pos, code, L, grid_w, grid_h, HAS_DIRS), 0)
        raw = tl.load(dt_ptr + b * sdt_b + s * sdt_l + head * sdt_h, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(dt_bias_ptr + head).to(tl.float32)
        dt = raw
        if SOFTPLUS:
            dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))), raw)
        grad_scale = tl.full((CHUNK,), 1.0, tl.float32)
        if SOFTPLUS:
            grad_scale = tl.where(raw <= 20.0, tl.sigmoid(raw), 1.0)
        if HAS_LIMIT:
            grad_scale = tl.where((dt >= dt_min) & (dt <= dt_max), grad_scale, 0.0)
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dt = tl.where(valid, dt, 0.0)
        cs = tl.cumsum(dt * A, axis=0)
        cs_last = tl.sum(dt * A, axis=0)

        tile = valid[:, None] & mask_p[None, :]
        bc_mask = valid[:, None] & mask_n[None, :]
        xs = tl.load(x_base + s[:, None] * sx_l + offs_p[None, :] * sx_p, mask=tile, other=0.0)
        Bs = tl.load(B_base + s[:, None] * sb_l + offs_n[None, :] * sb_n, mask=bc_mask, other=0.0)
        Cs = tl.load(C_base + s[:, None] * sc_l + offs_n[None, :] * sc_n, mask=bc_mask, other=0.0)
        dy_offs = ((b * L + s[:, None]) * nheads + head) * headdim + offs_p[None, :]
        dys = tl.load(dy_ptr + dy_offs, mask=tile, other=0.0)  # float32

        xf = xs.to(tl.float32)
        Bf = Bs.to(tl.float32)
        Cf = Cs.to(tl.float32)
        decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))
        cb = dot_fp32(Cs, tl.trans(Bs), PRECISION, UPCAST)
        G = cb * decay
        DX = tl.dot(
            dys, tl.trans(xf), input_precision=PRECISION
        )  # (Q, Q): dy_i . x_j over this headdim block
        T = G * DX * dt[None, :]
        state_w = tl.exp(cs_last - cs) * dt  # (Q,)
        dSB = tl.dot(Bf, tl.trans(dstate_), input_precision=PRECISION)  # (Q, P): (dS B_j)[p]
        x_dSB = tl.sum(xf * dSB, axis=1)  # (Q,): x_j^T dS B_j
        y_off = tl.dot(Cf, tl.trans(s_in), input_precision=PRECISION) * tl.exp(cs)[:, None]  # (Q, P)

        # dx
        dx = dt[:, None] * tl.dot(tl.trans(G), dys, input_precision=PRECISION) + state_w[:, None] * dSB
        dx_offs = (((k * batch + b) * L + s[:, None]) * nheads + head) * headdim + offs_p[None, :]
        tl.store(dx_ptr + dx_offs, dx, mask=tile)
        # dB, dC (partial over headdim)
        W = DX * decay * dt[None, :]
        dC = tl.dot(W, Bf, input_precision=PRECISION) + tl.exp(cs)[:, None] * tl.dot(
            dys, s_in, input_precision=PRECISION
        )
        dB = tl.dot(tl.trans(W), Cf, input_precision=PRECISION) + state_w[:, None] * tl.dot(
            xf, dstate_, input_precision=PRECISION
        )
        bn_offs = (((part * batch + b) * L + s[:, None]) * nheads + head) * dstate + offs_n[None, :]
        tl.store(dB_ptr + bn_offs, dB, mask=bc_mask)
        tl.store(dC_ptr + bn_offs, dC, mask=bc_mask)
        # the step: directly, and through the cumulative decay cs
        U = tl.exp(cs_last - cs) * dt * x_dSB
        ddt = tl.sum(G * DX, axis=0) + tl.exp(cs_last - cs) * x_dSB
        dcs = tl.sum(T, axis=1) - tl.sum(T, axis=0) + tl.sum(dys * y_off, axis=1) - U
        dcs_last = tl.sum(U, axis=0) + tl.exp(cs_last) * tl.sum(tl.sum(dstate_ * s_in, axis=1), axis=0)
        dcs = tl.where(last, dcs + dcs_last, dcs)
        ddA = tl.sum(dcs, axis=0) - tl.cumsum(dcs, axis=0) + dcs  # reverse cumsum
        ddt += ddA * A
        dA_acc += ddA * dt
        ddt_offs = ((part * batch + b) * L + s) * nheads + head
        tl.store(ddt_ptr + ddt_offs, ddt * grad_scale, mask=valid)
        # the state gradient entering this chunk
        dstate_ = dstate_ * tl.exp(cs_last) + tl.dot(
            tl.trans(dys), Cf * tl.exp(cs)[:, None], input_precision=PRECISION
        )

    tl.store(dA_ptr + (part * batch + b) * nheads + head, tl.sum(dA_acc, axis=0))
    if HAS_INIT:
        tl.store(dinit_ptr + state_base + pn, dstate_, mask=state_mask)


def triton_ssd_backward(
    dout,
    dfinal,
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    dt_bias,
    initial_states,
    dt_softplus,
    dt_limit,
    chunk_size,
    directions,
    grid_size,
) -> list:
    """Gradients of :func:`triton_ssd_forward` for (x, dt, A, B, C, D, z, dt_bias, initial_states), None
    for absent inputs, each in its input's dtype."""
    batch, length, nheads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    single = directions == [0]
    k = len(directions)
    height, width = grid_size if grid_size is not None else (1, length)
    Bc, Cc = B.to(x.dtype), C.to(x.dtype)
    dout = dout.float()
    # The epilogue (D skip, gate, direction sum) in torch: dy is the gradient of each direction's raw SSD.
    dy = dout
    dz = None
    if z is not None:
        zf = z.float()
        sig = torch.sigmoid(zf)
        dy = dout * zf * sig
        y_pre, _ = triton_ssd_forward(
            x,
            dt,
            A,
            B,
            C,
            D,
            None,
            dt_bias,
            initial_states,
            dt_softplus,
            dt_limit,
            chunk_size,
            directions,
            grid_size,
        )
        dz = (dout * y_pre.float() * sig * (1 + zf * (1 - sig))).to(z.dtype)
    dy = dy.contiguous()

    # Blocks of 32 headdim channels and 8 warps: the fewest spills in an sm_90 compile (the backward keeps
    # about ten (chunk, block) tiles live; it still spills about 1.6 KB per thread at chunk 64).
    block_p = max(16, min(32, triton.next_power_of_2(headdim)))
    block_n = max(16, triton.next_power_of_2(dstate))
    npb = triton.cdiv(headdim, block_p)
    parts = k * npb
    nchunks = triton.cdiv(length, chunk_size)
    f32 = dict(device=x.device, dtype=torch.float32)
    states = torch.empty(batch * k, nheads, nchunks, headdim, dstate, **f32)
    dx = torch.empty(k, batch, length, nheads, headdim, **f32)
    ddt = torch.empty(parts, batch, length, nheads, **f32)
    dB = torch.empty(parts, batch, length, nheads, dstate, **f32)
    dC = torch.empty(parts, batch, length, nheads, dstate, **f32)
    dA = torch.empty(parts, batch, nheads, **f32)
    dinit = torch.empty(batch, nheads, headdim, dstate, **f32) if initial_states is not None else None
    has_dfinal = single and dfinal is not None
    init = initial_states.contiguous() if initial_states is not None else None
    dirs = torch.tensor(directions, dtype=torch.int32, device=x.device)
    grid = (batch * k, nheads, npb)
    _ssd_bwd_kernel[grid](
        x, dt, A, Bc, Cc, dt_bias, init, dy, dfinal.contiguous() if has_dfinal else None, states, dirs,
        dx, ddt, dB, dC, dA, dinit,
        batch, length, height, width, nheads // groups, headdim, dstate, nchunks,
        float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        *x.stride(), *dt.stride(), *Bc.stride(), *Cc.stride(),
        CHUNK=chunk_size, BLOCK_P=block_p, BLOCK_N=block_n,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_LIMIT=tuple(dt_limit) != (0.0, float("inf")), HAS_INIT=init is not None,
        HAS_DFINAL=has_dfinal, HAS_DIRS=not single,
        PRECISION="ieee" if x.dtype == torch.float32 else None, UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=8,
    )  # fmt: skip
    dx = dx.sum(0)
    dD = None
    if D is not None:
        Df = D.float()
        dx = dx + dy * (Df[:, None] if D.dim() == 1 else Df)
        dD = (dy * x.float()).sum((0, 1))
        dD = (dD.sum(-1) if D.dim() == 1 else dD).to(D.dtype)
    ddt = ddt.sum(0)
    per_group = nheads // groups

    def group_sum(t):
        return t.sum(0).view(batch, length, groups, per_group, dstate).sum(3)

    return [
        dx.to(x.dtype),
        ddt.to(dt.dtype),
        dA.sum((0, 1)).to(A.dtype),
        group_sum(dB).to(B.dtype),
        group_sum(dC).to(C.dtype),
        dD,
        dz,
        ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None,
        dinit.to(initial_states.dtype) if dinit is not None else None,
    ]
