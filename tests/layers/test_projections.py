"""block_diagonal: K projections as one GEMM."""

import torch
import torch.nn.functional as F

from vmamba.layers.projections import block_diagonal


def test_block_diagonal_applies_each_weight_to_its_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 7, 3 * 2, generator=g, dtype=torch.float64)
    got = F.linear(x, block_diagonal(w))
    want = torch.cat([F.linear(x[..., 2 * k : 2 * k + 2], w[k]) for k in range(3)], dim=-1)
    torch.testing.assert_close(got, want)
    assert torch.equal(block_diagonal(w), torch.block_diag(*w.unbind(0)))
    assert torch.autograd.gradcheck(lambda w: F.linear(x, block_diagonal(w)), (w,))
