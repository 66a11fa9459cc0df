"""Per-direction projections of the scan mixers computed as one GEMM."""

import torch
import torch.nn.functional as F
from torch import Tensor

from .eager import is_eager_cpu_inference

__all__ = [
    "block_diagonal",
    "check_low_rank_steps",
    "per_direction_linear",
    "project_steps",
    "project_steps_backward",
]


def block_diagonal(weights: Tensor) -> Tensor:
    """K stacked Linear weights (K, out, in) -> the (K*out, K*in) block-diagonal weight.

    ``F.linear(x, block_diagonal(w))`` on x (..., K*in) applies ``w[k]`` to the k-th block of in-features
    and writes the k-th block of out-features: K small projections as one GEMM whose output is already
    laid out block after block (token-major, direction-major). Used for the step-size projections, whose
    rank is small, so the zero blocks cost little. Differentiable; built from the weights on every call
    (K * out * in values, a few KiB).
    """
    k, out_features, in_features = weights.shape
    eye = torch.eye(k, dtype=weights.dtype, device=weights.device)
    return (weights[:, :, None, :] * eye[:, None, :, None]).reshape(k * out_features, k * in_features)


@torch.jit.ignore  # TorchScript leaves it to Python, so scripted models run the same GEMMs as eager
def per_direction_linear(x: Tensor, weights: Tensor) -> Tensor:
    """K bias-free projections side by side: x (K, M, in), weights (K, out, in) -> (M, K*out).

    Block k of the output's features is ``x[k] @ weights[k].T``, so the result is token-major and
    direction-major, as the scan reads its step sizes. CPU inference runs it as one batched GEMM writing
    into the slices of the output (no copies, no zero blocks); elsewhere (autograd, GPU, tracing) as one
    GEMM with the :func:`block_diagonal` weight, which is differentiable and exportable.
    """
    k, m, in_features = x.shape
    out_features = weights.shape[1]
    if is_eager_cpu_inference(x, weights):
        out = x.new_empty(m, k * out_features)
        torch.bmm(x, weights.transpose(1, 2), out=out.view(m, k, out_features).transpose(0, 1))
        return out
    return F.linear(x.permute(1, 0, 2).reshape(m, k * in_features), block_diagonal(weights))


def check_low_rank_steps(delta: Tensor, weight: Tensor, k: int) -> int:
    """Raise ValueError unless ``weight`` is (K*C, R) and ``delta`` the (batch, K*R, L) low-rank step input
    of K directions; return R."""
    if weight.dim() != 2 or weight.shape[0] % k:
        raise ValueError(f"delta_proj_weight must be (K*C, R) with K={k}, got shape {tuple(weight.shape)}")
    rank = weight.shape[1]
    if delta.dim() != 3 or delta.shape[1] != k * rank:
        raise ValueError(
            f"with delta_proj_weight of rank {rank}, delta must be (batch, K*R, L) = (batch, {k * rank}, L), "
            f"got shape {tuple(delta.shape)}"
        )
    return rank


def project_steps(delta: Tensor, weight: Tensor) -> Tensor:
    """Low-rank step inputs (batch, K*R, L) -> steps (batch, K*C, L), direction by direction, with the
    (K*C, R) ``weight`` of ``multi_direction_selective_scan(..., delta_proj_weight=...)``: a token-major
    result viewed channel-major (:func:`per_direction_linear`)."""
    batch, _, length = delta.shape
    rank = weight.shape[1]
    k = delta.shape[1] // rank
    x = delta.transpose(1, 2).reshape(batch * length, k, rank).transpose(0, 1)  # (K, batch*L, R)
    steps = per_direction_linear(x, weight.reshape(k, -1, rank))  # (batch*L, K*C)
    return steps.view(batch, length, -1).transpose(1, 2)


def project_steps_backward(dsteps: Tensor, delta: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`project_steps`'s low-rank input (batch, K*R, L) and (K*C, R) weight from the
    gradient of its steps (batch, K*C, L), direction by direction (two batched GEMMs in dsteps' dtype): for
    the fused scans that project the steps inside their kernels and write the steps' gradient."""
    rank = weight.shape[1]
    k = delta.shape[1] // rank
    channels = weight.shape[0] // k
    ds = dsteps.unflatten(1, (k, channels))
    xs = delta.unflatten(1, (k, rank)).to(ds.dtype)
    ws = weight.reshape(k, channels, rank).to(ds.dtype)
    dweight = torch.einsum("bkcl,bkrl->kcr", ds, xs).reshape(weight.shape).to(weight.dtype)
    ddelta = torch.einsum("kcr,bkcl->bkrl", ws, ds).reshape(delta.shape).to(delta.dtype)
    return ddelta, dweight
