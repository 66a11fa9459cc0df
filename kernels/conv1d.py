"""Depthwise causal conv1d (+ SiLU) for both directions of a bidirectional scan, as one convolution.

Vim's mixer convolves the same sequence x twice: causally with the forward kernel, and causally over the
reversed sequence with the backward kernel. In storage order the second is an *anti-causal* convolution
with the kernel reversed. :func:`bidirectional_causal_conv1d` is both in one call, in the token-major layout
the projections produce and consume:

- CPU tensors with float32 weights run loops of the C++ library (:mod:`.cpu`), forward and backward: they
  read a float32 x in place and write the token-major result directly (PyTorch's depthwise conv1d is slow on
  CPU, forward and backward, and needs two layout copies); a bfloat16 or float16 x (CPU autocast) is
  converted to float32 for them and the result comes back in its dtype;
- CUDA tensors run Triton kernels (:mod:`.triton.conv1d`, forward and backward): one read of x, one write;
- everywhere else (other dtypes, tracing, compile, export) it is one depthwise convolution with ``2k - 1`` taps
  centred on each token: the forward kernel on taps ``0..k-1`` (the token and the k-1 before it), the
  reversed backward kernel on taps ``k-1..2k-2`` (the token and the k-1 after it), zeros elsewhere, two
  output channels per input channel.

:func:`bidirectional_causal_conv1d_reference` is the float64 loop all three are tested against.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import triton as _triton
from .cpu import cpu_bidirectional_conv1d, cpu_bidirectional_conv1d_backward, cpu_library_available
from .eager import is_eager_cpu_activations, triton_kernels_run

__all__ = ["bidirectional_causal_conv1d", "bidirectional_causal_conv1d_reference"]


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, weight_b: Tensor, bias_b: Tensor | None) -> int:
    """Validate the shapes; return the kernel width k."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, L, channels), got shape {list(x.shape)}")
    channels = x.shape[2]
    k = weight.shape[-1]
    for w in [weight, weight_b]:
        if w.numel() != channels * k or w.shape[0] != channels or w.shape[-1] != k:
            raise ValueError(
                f"weight and weight_b must be (channels, k) or (channels, 1, k) = ({channels}, {k}), "
                f"got {list(weight.shape)} and {list(weight_b.shape)}"
            )
    for b in [bias, bias_b]:
        if b is not None and (b.dim() != 1 or b.shape[0] != channels):
            raise ValueError(f"bias and bias_b must be ({channels},) or None, got {list(b.shape)}")
    return k


@torch.jit.ignore  # TorchScript leaves it to Python, so scripted models run the same kernels as eager
def bidirectional_causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_b: Tensor,
    bias_b: Tensor | None,
    silu: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """Forward-causal and backward-causal depthwise conv1d of one sequence, optionally followed by SiLU.

    Args:
        x: (batch, L, C), token-major; any strides (e.g. a slice of a projection's output).
        weight, weight_b: (C, k) or (C, 1, k) (``nn.Conv1d`` layout) kernels of the two directions.
        bias, bias_b: (C,) or None.
        silu: apply SiLU to the result.
        out: a contiguous (batch, L, 2C) tensor of x's dtype and device to write the result into and return
            (a buffer reused between calls; the C++ loops write it directly). Inference only: a ValueError
            if a gradient would be recorded.

    Returns:
        (batch, L, 2C) contiguous: channels ``[:C]`` are ``y_f[t] = sum_j weight[c, j] x[t - k + 1 + j]``
        (causal, zero-padded), channels ``[C:]`` the backward direction in storage order,
        ``y_b[t] = sum_j weight_b[c, j] x[t + k - 1 - j]`` (a causal convolution of the reversed sequence,
        reversed back), each plus its bias.
    """
    k = _check(x, weight, bias, weight_b, bias_b)
    channels = x.shape[2]
    if out is not None:
        _check_out(out, x, [weight, bias, weight_b, bias_b])
    if bias is None and bias_b is None:
        both_bias: Tensor | None = None
    else:
        zeros = torch.zeros(channels, dtype=weight.dtype, device=weight.device)
        both_bias = torch.stack([zeros if bias is None else bias, zeros if bias_b is None else bias_b])
    on_gpu = triton_kernels_run(x, weight, both_bias, weight_b)
    on_cpu = not on_gpu and is_eager_cpu_activations((weight, both_bias, weight_b), (x,)) and x.stride(2) == 1
    if on_gpu or (on_cpu and cpu_library_available()):
        # (2, k, C): tap j of each direction, channels innermost, as the fused kernels read them.
        taps = torch.stack([weight.reshape(channels, k), weight_b.reshape(channels, k)]).transpose(1, 2)
        if on_gpu:
            y = _triton.triton_bidirectional_conv1d(x, taps, both_bias, silu)
        elif out is not None:
            return cpu_bidirectional_conv1d(x, taps.contiguous(), both_bias, silu, out)
        else:
            kernels = (cpu_bidirectional_conv1d, cpu_bidirectional_conv1d_backward)
            return BidirectionalConv1dFunction.apply(x, taps.contiguous(), both_bias, silu, kernels)
    else:
        y = _conv_as_one_torch_conv(x, weight, both_bias, weight_b, k, silu)
    return y if out is None else out.copy_(y)


def _check_out(out: Tensor, x: Tensor, params: list[Tensor | None]) -> None:
    """Raise ValueError unless ``out`` can take the result for ``x`` without breaking autograd."""
    want = (x.shape[0], x.shape[1], 2 * x.shape[2])
    if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {list(want)} {x.dtype} tensor on {x.device}, got {list(out.shape)} "
            f"{out.dtype} on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x, *params]):
        raise ValueError("out= is for inference: call without it when gradients are needed")


class BidirectionalConv1dFunction(torch.autograd.Function):
    """Autograd for the fused kernels of a backend (the C++ loops or the Triton kernels), given as a
    ``forward(x, taps, bias, silu)`` / ``backward(dout, x, taps, bias, silu) -> (dx, dtaps, dbias)`` pair:
    saves x and the (small) taps and bias, and the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, x: Tensor, taps: Tensor, bias: Tensor | None, silu: bool, kernels: tuple) -> Tensor:
        ctx.save_for_backward(x, taps, bias)
        ctx.silu, ctx.backward_kernel = silu, kernels[1]
        return kernels[0](x, taps, bias, silu)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        x, taps, bias = ctx.saved_tensors
        dx, dtaps, dbias = ctx.backward_kernel(dout, x, taps, bias, ctx.silu)
        return dx, dtaps, dbias, None, None


def _conv_as_one_torch_conv(
    x: Tensor, weight: Tensor, both_bias: Tensor | None, weight_b: Tensor, k: int, silu: bool
) -> Tensor:
    """The op as one grouped ``F.conv1d`` with 2k - 1 taps (other dtypes, tracing, compile and export)."""
    batch, length, channels = x.shape
    w_f = weight.reshape(channels, k)
    w_b = weight_b.reshape(channels, k)
    # (C, 2, 2k-1): tap k-1 is the token itself; output channel 2c + d is input channel c, direction d.
    taps = torch.stack([F.pad(w_f, (0, k - 1)), F.pad(w_b.flip(-1), (k - 1, 0))], dim=1)
    y = F.conv1d(
        x.transpose(1, 2),
        taps.reshape(2 * channels, 1, 2 * k - 1),
        None if both_bias is None else both_bias.t().reshape(2 * channels),
        padding=k - 1,
        groups=channels,
    )
    # (B, C*2, L) -> token-major, direction-major channels (B, L, 2, C): the one copy of the op.
    y = y.view(batch, channels, 2, length).permute(0, 3, 2, 1).reshape(batch, length, 2 * channels)
    return F.silu(y) if silu else y


def bidirectional_causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_b: Tensor,
    bias_b: Tensor | None,
    silu: bool = True,
) -> Tensor:
    """The definition of :func:`bidirectional_causal_conv1d` as float64 loops over taps (a test oracle).

    The backward direction is computed literally: reverse the sequence, convolve causally, reverse back.
    """
    k = _check(x, weight, bias, weight_b, bias_b)
    channels = x.shape[2]
    x64 = x.double()

    def causal(seq: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        w = w.reshape(channels, k).double()
        out = torch.zeros_like(seq)
        for t in range(seq.shape[1]):
            for j in range(k):
                src = t - (k - 1) + j
                if src >= 0:
                    out[:, t] += w[:, j] * seq[:, src]
        return out if b is None else out + b.double()

    y = torch.cat([causal(x64, weight, bias), causal(x64.flip(1), weight_b, bias_b).flip(1)], dim=2)
    return F.silu(y) if silu else y
