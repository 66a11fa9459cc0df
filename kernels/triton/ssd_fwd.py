"""Triton forward of the SSD scan (Mamba-2's chunked algorithm) and of its direction sets, in one kernel.

mamba_ssm runs the chunked SSD as five launches (chunk cumsum, chunk states, state passing, C.B^T, chunk
outputs) that pass (batch, chunks, heads, headdim, dstate) states through global memory. Here one program
owns a (batch, direction, head, block of headdim) slice, keeps its state in registers and walks the chunks
in order; per chunk it does all four steps on the tile it has loaded:

1. chunk cumsum: ``cs = cumsum(dt * A)`` (dt after bias, softplus and limits; zero past the end of L);
2. chunk outputs, intra-chunk: ``y = ((C B^T) * exp(cs_i - cs_j) * dt_j [j <= i]) x`` (tensor cores);
3. chunk outputs, inter-chunk: ``y += exp(cs_i) * C S^T`` with S the state entering the chunk;
4. state passing: ``S = exp(cs_last) S + x^T (B * exp(cs_last - cs) * dt)``.

Inputs are read once and outputs written once. A direction (row, column, and their reverses over an H x W
grid) only changes which storage index the p-th visited token has (``token_index``), so all directions of a
set run in the same launch, one grid row each. Float32 inputs use exact float32 dot products; float16 and
bfloat16 feed the tensor cores in their own dtype with float32 accumulation, as mamba_ssm does.
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, softplus, token_index

__all__ = ["dot_fp32", "triton_ssd_forward"]


@triton.jit
def dot_fp32(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with float32 accumulation; UPCAST feeds it float32 copies (the interpreter's tl.dot
    mishandles bfloat16, so bfloat16 operands are widened there, exactly, after their rounding)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, init_ptr, out_ptr, final_ptr, dirs_ptr,
    batch, L, grid_h, grid_w, heads_per_group, headdim, dstate, dt_min, dt_max,
    sx_b, sx_l, sx_h, sx_p,
    sdt_b, sdt_l, sdt_h,
    sb_b, sb_l, sb_g, sb_n,
    sc_b, sc_l, sc_g, sc_n,
    sz_b, sz_l, sz_h, sz_p,
    so_b, so_l, so_h, so_p,
    sd_h, sd_p,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr, HAS_DIRS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_bk = tl.program_id(0)
    head = tl.program_id(1)
    pid_p = tl.program_id(2)
    k = pid_bk // batch
    b = pid_bk % batch
    code = tl.load(dirs_ptr + k) if HAS_DIRS else 0
    group = head // heads_per_group

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, CHUNK)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    causal = offs_q[:, None] >= offs_q[None, :]

    A = tl.load(A_ptr + head).to(tl.float32)
    state_offs = ((b * tl.num_programs(1) + head) * headdim + offs_p[:, None]) * dstate + offs_n[None, :]
    state_mask = mask_p[:, None] & mask_n[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + head * sd_h + offs_p * sd_p, mask=mask_p, other=0.0).to(tl.float32)

    x_base = x_ptr + b * sx_b + head * sx_h
    B_base = B_ptr + b * sb_b + group * sb_g
    C_base = C_ptr + b * sc_b + group * sc_g
    for start in range(0, L, CHUNK):
        pos = start + offs_q
        valid = pos < L
        s = token_index(pos, code, L, grid_w, grid_h, HAS_DIRS)
        s = tl.where(valid, s, 0)

        # 1. the step and its running decay inside the chunk
        dt = tl.load(dt_ptr + b * sdt_b + s * sdt_l + head * sdt_h, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += tl.load(dt_bias_ptr + head).to(tl.float32)
        if SOFTPLUS:
            dt = softplus(dt)
        if HAS_LIMIT:
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dt = tl.where(valid, dt, 0.0)
        cs = tl.cumsum(dt * A, axis=0)
        cs_last = tl.sum(dt * A, axis=0)

        tile = valid[:, None] & mask_p[None, :]
        xs = tl.load(x_base + s[:, None] * sx_l + offs_p[None, :] * sx_p, mask=tile, other=0.0)
        bc_mask = valid[:, None] & mask_n[None, :]
        Bs = tl.load(B_base + s[:, None] * sb_l + offs_n[None, :] * sb_n, mask=bc_mask, other=0.0)
        Cs = tl.load(C_base + s[:, None] * sc_l + offs_n[None, :] * sc_n, mask=bc_mask, other=0.0)

        # 2. intra-chunk outputs: the masked, decayed C B^T applied to dt * x
        cb = dot_fp32(Cs, tl.trans(Bs), PRECISION, UPCAST)
        decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))
        mix = cb * decay * dt[None, :]
        y = dot_fp32(mix.to(xs.dtype), xs, PRECISION, UPCAST)
        # 3. inter-chunk outputs: the entering state read out by C
        y += dot_fp32(Cs, tl.trans(state).to(Cs.dtype), PRECISION, UPCAST) * tl.exp(cs)[:, None]
        # 4. state passing
        weight = tl.exp(cs_last - cs) * dt
        state = state * tl.exp(cs_last) + dot_fp32(
            tl.trans(xs), (Bs * weight[:, None]).to(xs.dtype), PRECISION, UPCAST
        )

        if HAS_D:
            y += xs.to(tl.float32) * D[None, :]
        if HAS_Z:
            zs = tl.load(
                z_ptr + b * sz_b + s[:, None] * sz_l + head * sz_h + offs_p[None, :] * sz_p,
                mask=tile,
                other=0.0,
            ).to(tl.float32)
            y *= zs * tl.sigmoid(zs)
        out_offs = b * so_b + s[:, None] * so_l + head * so_h + offs_p[None, :] * so_p
        if HAS_DIRS:  # the directions of a set add into one float32 output
            tl.atomic_add(out_ptr + out_offs, y, mask=tile)
        else:
            tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=tile)

    if HAS_FINAL:
        tl.store(final_ptr + state_offs, state, mask=state_mask)


def triton_ssd_forward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    chunk_size: int,
    directions: list[int],
    grid_size: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD forward (one direction, or a set summed in storage order) in one launch.

    Same contract as ``vmamba.kernels.ssd_torch.torch_ssd_forward``, with directions given as codes
    (indices into ``vmamba.kernels.DIRECTIONS``). Inputs in float16, bfloat16 or float32; the math is
    float32. With several directions the kernel adds each direction's SSD into one float32 buffer
    (``tl.atomic_add``; with more than two directions the order of the additions, hence the last bit, can
    vary between runs), and ``D x`` and the gate are applied afterwards.
    """
    batch, length, nheads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    B, C = B.to(x.dtype), C.to(x.dtype)  # the dot products need one dtype
    single = directions == [0]
    height, width = grid_size if grid_size is not None else (1, length)
    k = len(directions)
    dirs = torch.tensor(directions, dtype=torch.int32, device=x.device)
    out = torch.empty_like(x) if single else torch.zeros_like(x, dtype=torch.float32)
    final = x.new_empty((batch, nheads, headdim, dstate), dtype=torch.float32) if single else None
    init = initial_states.contiguous() if initial_states is not None else None
    if D is not None:
        D_strides = (D.stride(0), D.stride(1) if D.dim() == 2 else 0)
    else:
        D_strides = (0, 0)
    z_strides = z.stride() if z is not None else (0, 0, 0, 0)
    block_p = max(16, min(64, triton.next_power_of_2(headdim)))
    block_n = max(16, triton.next_power_of_2(dstate))
    has_limit = tuple(dt_limit) != (0.0, float("inf"))
    grid = (batch * k, nheads, triton.cdiv(headdim, block_p))
    _ssd_fwd_kernel[grid](
        x, dt, A, B, C, D if single else None, z if single else None, dt_bias, init, out, final, dirs,
        batch, length, height, width, nheads // groups, headdim, dstate,
        float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *z_strides, *out.stride(), *D_strides,
        CHUNK=chunk_size, BLOCK_P=block_p, BLOCK_N=block_n,
        HAS_D=D is not None and single, HAS_Z=z is not None and single, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit, HAS_INIT=init is not None, HAS_FINAL=single,
        HAS_DIRS=not single, PRECISION="ieee" if x.dtype == torch.float32 else None,
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=8,  # sm_90 compile: 4 warps spill 232 B/thread at chunk 64, 8 warps 64 B
    )  # fmt: skip
    if single:
        return out, final
    y = out
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    return y.to(x.dtype), x.new_empty(0, dtype=torch.float32)
