"""RMSNorm and the fused residual add + RMSNorm against float64 formulas."""

import pytest
import torch

from vmamba.layers import RMSNorm
from vmamba.layers.norm import add_rms_norm, rms_norm


def _rms_norm64(x, weight, eps):
    x = x.double()
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight.double()


def test_rms_norm_matches_formula():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 8, generator=g), torch.randn(8, generator=g)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), _rms_norm64(x, w, 1e-5).float())
    norm = RMSNorm(8, eps=1e-3)
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(norm(x), _rms_norm64(x, w, 1e-3).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_computes_in_float32_and_keeps_dtype(dtype):
    x, w = torch.randn(3, 16).to(dtype), torch.randn(16).to(dtype)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, _rms_norm64(x, w, 1e-5).to(dtype))


def test_add_rms_norm_returns_norm_of_sum_and_sum():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, generator=g).bfloat16()  # a half-precision mixer output
    residual = torch.randn(2, 4, 8, generator=g)  # float32 residual stream
    w = torch.randn(8, generator=g)
    normed, total = add_rms_norm(x, residual, w, 1e-5)
    assert total.dtype == normed.dtype == torch.float32
    torch.testing.assert_close(total, residual + x.float())
    torch.testing.assert_close(normed, _rms_norm64(residual + x.float(), w, 1e-5).float())
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(w)
    for a, b in zip(norm.forward_add(x, residual), (normed, total)):
        torch.testing.assert_close(a, b)


def test_rms_norm_gradients():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
    r = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, w: add_rms_norm(x, r, w, 1e-5), (x, r, w))


@pytest.mark.parametrize("dim", [1, 8, 16, 37, 192])
def test_cpu_loop_matches_float64_formula(monkeypatch, dim):
    """float32 CPU tensors run the C++ loop (whole vectors and the remainder of a row): the same values as
    the formula in float64, and the sum exactly; a view that is not contiguous takes PyTorch's ops."""
    from vmamba.kernels import cpu as cpu_backend
    from vmamba.kernels import norm as norm_module

    if not cpu_backend.cpu_library_available():
        pytest.skip("the C++ library cannot be built here")
    calls = []
    real = norm_module.cpu_add_rms_norm
    monkeypatch.setattr(norm_module, "cpu_add_rms_norm", lambda *a: calls.append(a[0] is None) or real(*a))
    g = torch.Generator().manual_seed(dim)
    x, residual = torch.randn(2, 7, dim, generator=g), torch.randn(2, 7, dim, generator=g) * 3
    w = torch.randn(dim, generator=g)
    with torch.no_grad():
        normed, total = add_rms_norm(x, residual, w, 1e-5)
        alone = rms_norm(residual, w, 1e-6)
    assert calls == [False, True]
    assert torch.equal(total, residual + x)
    torch.testing.assert_close(normed.double(), _rms_norm64(residual + x, w, 1e-5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone.double(), _rms_norm64(residual, w, 1e-6), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        rms_norm(x[:, ::2], w, 1e-5)  # not contiguous
    assert len(calls) == 2


@pytest.mark.parametrize("with_x", [True, False])
def test_cpu_loop_gradients_match_float64(monkeypatch, with_x):
    """With gradients the C++ loop runs inside an autograd function that saves only the sum and the
    weight: every gradient (x, residual, weight, and through the sum output) against autograd of the
    float64 formula; nothing of the norm's intermediates is kept."""
    from vmamba.kernels import cpu as cpu_backend

    if not cpu_backend.cpu_library_available():
        pytest.skip("the C++ library cannot be built here")
    loops = []
    real = cpu_backend._add_rms_norm_loop
    monkeypatch.setattr(cpu_backend, "_add_rms_norm_loop", lambda *a: loops.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    x, residual = torch.randn(2, 5, 37, generator=g), torch.randn(2, 5, 37, generator=g) * 2
    w = torch.randn(37, generator=g)
    dnormed, dtotal = torch.randn(2, 5, 37, generator=g), torch.randn(2, 5, 37, generator=g)

    def run(x, residual, w, dtype):
        x, residual, w = (t.to(dtype, copy=True).requires_grad_() for t in (x, residual, w))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            normed, total = (
                add_rms_norm(x, residual, w, 1e-5) if with_x else (rms_norm(residual, w, 1e-5), None)
            )
        loss = (normed * dnormed.to(dtype)).sum()
        if with_x:
            loss = loss + (total * dtotal.to(dtype)).sum()
        loss.backward()
        grads = [t.grad for t in ((x, residual, w) if with_x else (residual, w))]
        return normed, grads, saved

    normed, grads, saved = run(x, residual, w, torch.float32)
    ref, ref_grads, _ = run(x, residual, w, torch.float64)
    assert loops == [1]
    torch.testing.assert_close(normed.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    for grad, expected in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), expected, rtol=2e-5, atol=2e-5)
    assert sum(t.numel() for t in saved) == residual.numel() + w.numel()  # the sum (or input) and weight
