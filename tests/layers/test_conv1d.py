"""The fused bidirectional causal conv1d against its float64 loop reference and the official two-conv form."""

import pytest
import torch
import torch.nn.functional as F

from vmamba.kernels import bidirectional_causal_conv1d, bidirectional_causal_conv1d_reference
from vmamba.kernels import conv1d as conv1d_module
from vmamba.kernels import cpu as cpu_backend


def _inputs(batch=2, length=9, channels=5, k=4, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x = rnd(batch, length, channels)
    return (
        x,
        rnd(channels, 1, k),
        rnd(channels) if bias else None,
        rnd(channels, 1, k),
        rnd(channels) if bias else None,
    )


@pytest.mark.parametrize("length", [1, 2, 9])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("bias, silu", [(True, True), (False, False)])
def test_matches_float64_reference(length, k, bias, silu):
    args = _inputs(length=length, k=k, bias=bias)
    out = bidirectional_causal_conv1d(*args, silu=silu)
    ref = bidirectional_causal_conv1d_reference(*args, silu=silu)
    assert out.shape == (2, length, 10) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_matches_the_official_two_convolutions():
    """Official Vim: conv1d(x) causally, and conv1d_b over the flipped sequence, flipped back."""
    x, w, b, w_b, b_b = _inputs(length=11, dtype=torch.float32)
    k, channels = w.shape[-1], x.shape[2]
    xc = x.transpose(1, 2)
    fwd = F.conv1d(xc, w, b, padding=k - 1, groups=channels)[..., : x.shape[1]]
    bwd = F.conv1d(xc.flip(-1), w_b, b_b, padding=k - 1, groups=channels)[..., : x.shape[1]].flip(-1)
    expected = F.silu(torch.cat([fwd, bwd], dim=1)).transpose(1, 2)
    torch.testing.assert_close(bidirectional_causal_conv1d(x, w, b, w_b, b_b), expected)


def test_reads_strided_token_major_input():
    """x may be a slice of a projection's (B, L, 2C) output, as in the Vim mixer."""
    x, w, b, w_b, b_b = _inputs(channels=6)
    xz = torch.cat([x, torch.randn_like(x)], dim=2)
    torch.testing.assert_close(
        bidirectional_causal_conv1d(xz[..., :6], w, b, w_b, b_b),
        bidirectional_causal_conv1d(x, w, b, w_b, b_b),
    )


def test_gradients_match_reference_and_finite_differences():
    args = [t.requires_grad_() for t in _inputs(batch=1, length=6, channels=3, k=3)]
    out = bidirectional_causal_conv1d(*args)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, args, grad)
    want = torch.autograd.grad(bidirectional_causal_conv1d_reference(*args), args, grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    assert torch.autograd.gradcheck(bidirectional_causal_conv1d, args)


def test_half_precision_close_to_reference():
    x, w, b, w_b, b_b = _inputs(dtype=torch.float32)
    out = bidirectional_causal_conv1d(
        x.bfloat16(), w.bfloat16(), b.bfloat16(), w_b.bfloat16(), b_b.bfloat16()
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.double(), bidirectional_causal_conv1d_reference(x, w, b, w_b, b_b), rtol=0.05, atol=0.05
    )


def test_bad_shapes_are_named():
    x, w, b, w_b, b_b = _inputs()
    with pytest.raises(ValueError, match="x must be"):
        bidirectional_causal_conv1d(x[0], w, b, w_b, b_b)
    with pytest.raises(ValueError, match="weight and weight_b"):
        bidirectional_causal_conv1d(x, w, b, w_b[:, :, :2], b_b)
    with pytest.raises(ValueError, match="bias and bias_b"):
        bidirectional_causal_conv1d(x, w, b, w_b, b_b[:2])


def test_out_buffer_takes_the_result():
    """out= on the PyTorch path (float64): the same values, written into the given buffer."""
    x, w, b, w_b, b_b = _inputs()
    buffer = torch.full((2, 9, 10), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        got = bidirectional_causal_conv1d(x, w, b, w_b, b_b, out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(
        got, bidirectional_causal_conv1d_reference(x, w, b, w_b, b_b), rtol=1e-12, atol=1e-12
    )


def test_out_buffer_is_checked():
    x, w, b, w_b, b_b = _inputs()
    with pytest.raises(ValueError, match=r"out must be a contiguous \[2, 9, 10\]"):
        bidirectional_causal_conv1d(x, w, b, w_b, b_b, out=torch.empty(2, 9, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        bidirectional_causal_conv1d(x, w, b, w_b, b_b, out=torch.empty(2, 10, 9, dtype=torch.float64).mT)
    with pytest.raises(ValueError, match="out= is for inference"):
        bidirectional_causal_conv1d(
            x, w.requires_grad_(), b, w_b, b_b, out=torch.empty(2, 9, 10, dtype=torch.float64)
        )


# --- The C++ loop (float32 CPU inference) -------------------------------------------------------------


@pytest.fixture
def cpu_library():
    info = cpu_backend.library_info()
    if not info["available"]:
        pytest.skip(f"the C++ library cannot be built on this machine: {info['error']}")
    return info


@pytest.fixture
def counted_cpu_calls(monkeypatch):
    """Counts the calls that reach the C++ kernel (so a test knows which path it checked)."""
    calls = []
    real = conv1d_module.cpu_bidirectional_conv1d

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(conv1d_module, "cpu_bidirectional_conv1d", counted)
    return calls


# Channel counts around the SIMD width (a remainder loop), lengths shorter and longer than the kernel.
@pytest.mark.parametrize("channels", [1, 5, 16, 37, 384])
@pytest.mark.parametrize("length", [1, 3, 4, 9, 197])
@pytest.mark.parametrize("k", [1, 4])
def test_cpu_kernel_matches_float64_reference(cpu_library, counted_cpu_calls, channels, length, k):
    args = _inputs(batch=2, length=length, channels=channels, k=k, dtype=torch.float32, seed=length)
    with torch.no_grad():
        out = bidirectional_causal_conv1d(*args)
        plain = bidirectional_causal_conv1d(*args, silu=False)
    assert len(counted_cpu_calls) == 2
    assert out.shape == (2, length, 2 * channels) and out.is_contiguous() and out.dtype == torch.float32
    args64 = [t.double() for t in args]
    torch.testing.assert_close(
        out.double(), bidirectional_causal_conv1d_reference(*args64), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        plain.double(), bidirectional_causal_conv1d_reference(*args64, silu=False), rtol=1e-5, atol=1e-6
    )


def test_cpu_kernel_reads_strided_input_and_no_bias(cpu_library, counted_cpu_calls):
    x, w, _, w_b, _ = _inputs(batch=3, length=20, channels=24, dtype=torch.float32)
    xz = torch.cat([torch.randn_like(x), x, torch.randn_like(x)], dim=2)[..., 24:48]  # a middle slice
    with torch.no_grad():
        out = bidirectional_causal_conv1d(xz, w, None, w_b, None)
    assert len(counted_cpu_calls) == 1
    want = bidirectional_causal_conv1d_reference(x.double(), w.double(), None, w_b.double(), None)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_cpu_kernel_writes_into_out_buffer(cpu_library, counted_cpu_calls):
    args = _inputs(batch=2, length=30, channels=20, dtype=torch.float32)
    buffer = torch.full((2, 30, 40), float("nan"))
    with torch.no_grad():
        got = bidirectional_causal_conv1d(*args, out=buffer)
        want = bidirectional_causal_conv1d(*args)
    assert len(counted_cpu_calls) == 2 and got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_kernel_runs_float32_weights_only(cpu_library, counted_cpu_calls):
    args = _inputs(dtype=torch.float32)
    with torch.no_grad():
        bidirectional_causal_conv1d(*[t.double() for t in args])  # float64: PyTorch's convolution
        bidirectional_causal_conv1d(*[t.bfloat16() for t in args])  # bfloat16 weights too
        assert not counted_cpu_calls
        bidirectional_causal_conv1d(*args)
    assert len(counted_cpu_calls) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_takes_half_precision_input(cpu_library, counted_cpu_calls, dtype):
    """A half-precision x with float32 weights (what CPU autocast passes) runs the C++ loops on x in float32:
    the output, dx, and the weight and bias gradients are exactly those of the float32 call on the same
    values, rounded to x's dtype (output, dx) or left in float32 (weights, biases)."""
    x, w, b, w_b, b_b = _inputs(batch=2, length=23, channels=20, dtype=torch.float32, seed=5)
    x = x.to(dtype)
    upstream = torch.randn(2, 23, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for xi in (x, x.float()):
        leaves = [t.detach().clone().requires_grad_() for t in (xi, w, b, w_b, b_b)]
        out = bidirectional_causal_conv1d(*leaves)
        grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
        results.append((out, grads))
    assert len(counted_cpu_calls) == 2
    (out, grads), (out32, grads32) = results
    assert out.dtype == grads[0].dtype == dtype and grads[1].dtype == torch.float32
    assert torch.equal(out, out32.to(dtype)) and torch.equal(grads[0], grads32[0].to(dtype))
    for got, want in zip(grads[1:], grads32[1:]):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "length, channels, k, bias, silu",
    [(37, 40, 4, True, True), (3, 5, 4, False, False), (9, 17, 1, True, True)],
)
def test_cpu_kernel_gradients_match_float64_reference(
    cpu_library, counted_cpu_calls, length, channels, k, bias, silu
):
    """The C++ backward: dx, both weights and both biases, against autograd through the float64 loops."""
    args = _inputs(batch=2, length=length, channels=channels, k=k, bias=bias, dtype=torch.float32, seed=k)
    leaves = [t.requires_grad_() for t in args if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]

    def full(ts):
        it = iter(ts)
        return [next(it) if a is not None else None for a in args]

    out = bidirectional_causal_conv1d(*full(leaves), silu=silu)
    assert len(counted_cpu_calls) == 1 and out.requires_grad
    want = bidirectional_causal_conv1d_reference(*full(refs), silu=silu)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, upstream.float())
    expected = torch.autograd.grad(want, refs, upstream)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


def test_cpu_kernel_thread_count_does_not_change_results(cpu_library):
    args = _inputs(batch=2, length=50, channels=40, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = bidirectional_causal_conv1d(*args)
            torch.set_num_threads(2)
            two = bidirectional_causal_conv1d(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
