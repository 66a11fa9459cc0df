"""The residual add fused with RMSNorm (mamba_ssm's ``fused_add_norm``) as Triton kernels.

``total = residual + x`` and ``normed = total / sqrt(mean(total**2) + eps) * weight`` over the last
dimension, both in float32, in one pass: one program per row (token) reads x and the residual once and
writes the sum and the norm once, against about six separate passes of the PyTorch ops. The backward
takes the gradients of both outputs (the norm feeds the mixer, the sum the next residual add), recomputes
the normalised row from the saved sum and its inverse RMS, and sums the weight gradient per block of
rows (reduced in PyTorch).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["triton_add_rms_norm"]

ROWS_PER_PROGRAM = 16  # rows per program of the backward (its weight-gradient partial sums)


@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    rstd_ptr,
    N,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    total = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        total += tl.load(res_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row * N + cols, total.to(sum_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(total * total, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (total * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_bwd_kernel(
    sum_ptr,
    rstd_ptr,
    w_ptr,
    dout_ptr,
    dsum_ptr,
    dx_ptr,
    dw_part_ptr,
    M,
    N,
    HAS_DSUM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dx = rstd * (g - xhat * mean(g * xhat)) + dsum with g = dout * w; dw partial = sum dout * xhat."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(ROWS):
        row = pid.to(tl.int64) * ROWS + i
        if row < M:
            total = tl.load(sum_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            dout = tl.load(dout_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = total * rstd
            g = dout * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
            if HAS_DSUM:
                dx += tl.load(dsum_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * N + cols, dx, mask=mask)
            dw += dout * xhat
    tl.store(dw_part_ptr + pid * N + cols, dw, mask=mask)


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


class _AddRMSNorm(torch.autograd.Function):
    """Autograd for the kernels: saves the sum (an output anyway), the inverse RMS per row and the weight."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float):
        n = x.shape[-1]
        dtype = x.dtype if residual is None else residual.dtype
        x2 = x.reshape(-1, n).contiguous()
        rows = x2.shape[0]
        res2 = None if residual is None else residual.reshape(-1, n).contiguous()
        total = x2 if res2 is None else torch.empty((rows, n), dtype=dtype, device=x.device)
        out = torch.empty((rows, n), dtype=dtype, device=x.device)
        rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
        if rows:
            _add_rms_norm_fwd_kernel[(rows,)](
                x2, x2 if res2 is None else res2, weight, out, total, rstd, n, eps,
                HAS_RES=res2 is not None, BLOCK_N=_block(n), num_warps=4 if n > 1024 else 1,
            )  # fmt: skip
        ctx.save_for_backward(total, rstd, weight)
        ctx.has_residual = residual is not None
        ctx.dtypes = (x.dtype, dtype)
        if residual is None:
            return out.view(x.shape)  # the sum is x itself: the caller returns it
        return out.view(x.shape), total.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor, dsum: Tensor | None = None):
        total, rstd, weight = ctx.saved_tensors
        rows, n = total.shape
        dout2 = dout.reshape(-1, n).contiguous()
        dsum2 = None if dsum is None else dsum.reshape(-1, n).contiguous()
        programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
        dx = torch.empty((rows, n), dtype=torch.float32, device=total.device)
        dw_part = torch.empty((max(programs, 1), n), dtype=torch.float32, device=total.device)
        if rows:
            _add_rms_norm_bwd_kernel[(programs,)](
                total, rstd, weight, dout2, dout2 if dsum2 is None else dsum2, dx, dw_part, rows, n,
                HAS_DSUM=dsum2 is not None, ROWS=ROWS_PER_PROGRAM, BLOCK_N=_block(n),
                num_warps=4 if n > 1024 else 1,
            )  # fmt: skip
        else:
            dw_part.zero_()
        dx = dx.view(dout.shape)
        dweight = dw_part.sum(0).to(weight.dtype)
        dres = dx.to(ctx.dtypes[1]) if ctx.has_residual else None
        return dx.to(ctx.dtypes[0]), dres, dweight, None


def triton_add_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(residual + x), residual + x)`` in one kernel (``residual=None``: the norm of x, and x).

    The sum is formed in the residual's dtype (float32 for Vim's residual stream) and normalised in
    float32; both come back in the residual's dtype (x's when there is none). Differentiable.
    """
    if residual is None:
        return _AddRMSNorm.apply(x, None, weight, eps), x
    return _AddRMSNorm.apply(x, residual, weight, eps)
