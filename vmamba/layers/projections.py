"""Per-direction projections of the scan mixers computed as one GEMM."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_diagonal"]


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
