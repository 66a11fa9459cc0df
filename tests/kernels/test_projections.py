"""block_diagonal and per_direction_linear: K projections as one GEMM."""

import torch
import torch.nn.functional as F

from vmamba.kernels.projections import block_diagonal, per_direction_linear


def test_block_diagonal_applies_each_weight_to_its_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 7, 3 * 2, generator=g, dtype=torch.float64)
    got = F.linear(x, block_diagonal(w))
    want = torch.cat([F.linear(x[..., 2 * k : 2 * k + 2], w[k]) for k in range(3)], dim=-1)
    torch.testing.assert_close(got, want)
    assert torch.equal(block_diagonal(w), torch.block_diag(*w.unbind(0)))
    assert torch.autograd.gradcheck(lambda w: F.linear(x, block_diagonal(w)), (w,))


def _per_direction_want(x, w):
    return torch.cat([x[k].double() @ w[k].double().T for k in range(x.shape[0])], dim=-1)


def test_per_direction_linear_inference_path_writes_slices():
    """float32 CPU inference: one batched GEMM into the output's slices, from a strided view of x."""
    g = torch.Generator().manual_seed(1)
    x_dbl = torch.randn(2, 33, 44, generator=g)  # (K, M, rank + 2N) as x_proj writes it
    w = torch.randn(2, 24, 12, generator=g)
    with torch.no_grad():
        got = per_direction_linear(x_dbl[..., :12], w)
    assert got.shape == (33, 48) and got.is_contiguous()
    torch.testing.assert_close(got.double(), _per_direction_want(x_dbl[..., :12], w), rtol=1e-5, atol=1e-5)


def test_per_direction_linear_autograd_path_matches_and_differentiates():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(per_direction_linear(x, w), _per_direction_want(x, w))
    assert torch.autograd.gradcheck(per_direction_linear, (x, w))
    with torch.no_grad():  # float32 inference takes the other path: same values
        x32, w32 = x.float(), w.float()
        got = per_direction_linear(x32, w32).double()
        torch.testing.assert_close(got, _per_direction_want(x, w), rtol=1e-5, atol=1e-5)
