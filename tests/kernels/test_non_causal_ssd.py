"""non_causal_ssd (VSSD's NC-SSD): forward against the float64 per-head definition, every gradient, errors."""

import pytest
import torch

from vmamba.kernels import non_causal_ssd, non_causal_ssd_reference

NAMES = ("x", "dt", "A_log", "B", "C", "D", "dt_bias")


def make_inputs(batch=2, length=13, nheads=4, headdim=3, ngroups=1, dstate=5, D="head", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    d_shape = {"head": (nheads,), "channel": (nheads, headdim)}.get(D)
    return dict(
        x=rnd(batch, length, nheads, headdim),
        dt=rnd(batch, length, nheads, scale=0.5),
        A_log=rnd(nheads, scale=0.5),
        B=rnd(batch, length, ngroups, dstate),
        C=rnd(batch, length, ngroups, dstate),
        D=rnd(*d_shape) if d_shape else None,
        dt_bias=rnd(nheads, scale=0.5) if bias else None,
    )


def test_matches_the_official_formula_written_out():
    """One head, one group: y_i = sum_j (C_i . B_j) dt_j exp(A_log) x_j + D x_i, with positive weights."""
    inp = make_inputs(batch=1, nheads=1, bias=False)
    out = non_causal_ssd(**inp)
    x, dt, B, C = inp["x"][0, :, 0], inp["dt"][0, :, 0], inp["B"][0, :, 0], inp["C"][0, :, 0]
    scores = C @ B.T  # (L, L), no mask: every token sees every token
    expected = scores @ (dt[:, None] * inp["A_log"].exp() * x) + inp["D"] * x
    assert torch.allclose(out[0, :, 0], expected, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(length=1),
        dict(ngroups=2),
        dict(ngroups=4, D="channel"),
        dict(D=None, bias=False),
        dict(length=49, nheads=2, headdim=8, dstate=16),
    ],
)
@pytest.mark.parametrize("softplus", [False, True])
def test_forward_matches_reference(case, softplus):
    inp = make_inputs(**case)
    expected = non_causal_ssd_reference(**inp, dt_softplus=softplus)
    out = non_causal_ssd(**inp, dt_softplus=softplus)
    assert out.dtype == torch.float64
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-10)
    single = non_causal_ssd(
        **{k: v if v is None else v.float() for k, v in inp.items()}, dt_softplus=softplus
    )
    assert single.dtype == torch.float32
    assert torch.allclose(single.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_tolerance(dtype):
    inp = make_inputs(length=49, nheads=2, headdim=8, dstate=16, ngroups=2)
    expected = non_causal_ssd_reference(**inp, dt_softplus=True)
    low = {k: v if v is None or k in ("A_log", "dt_bias", "D") else v.to(dtype) for k, v in inp.items()}
    out = non_causal_ssd(**low, dt_softplus=True)
    assert out.dtype == dtype
    scale = expected.abs().max()
    assert (out.double() - expected).abs().max() <= 2e-2 * scale


def test_order_invariance():
    """No causality: permuting the tokens permutes the outputs."""
    inp = make_inputs(length=11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    shuffled = {k: v[:, perm] if k in ("x", "dt", "B", "C") else v for k, v in inp.items()}
    assert torch.allclose(non_causal_ssd(**shuffled), non_causal_ssd(**inp)[:, perm], atol=1e-12)


@pytest.mark.parametrize("case", [dict(), dict(ngroups=2, D="channel")])
def test_gradcheck_every_input(case):
    inp = make_inputs(batch=1, length=7, nheads=2, headdim=2, dstate=3, **case)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}

    def fn(*args):
        return non_causal_ssd(**dict(zip(leaves, args)), dt_softplus=True)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


def test_gradients_match_reference():
    inp = make_inputs(ngroups=2)
    grads = []
    for fn in (non_causal_ssd, non_causal_ssd_reference):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
        out = fn(**leaves, dt_softplus=True)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name in NAMES:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(2, 13, 4)), "x must be"),
        (dict(dt=torch.zeros(2, 13, 3)), "dt must be"),
        (dict(A_log=torch.zeros(4, 1)), "A_log must be"),
        (dict(B=torch.zeros(2, 12, 1, 5)), "B must be"),
        (dict(C=torch.zeros(2, 13, 1, 6)), "same shape"),
        (dict(B=torch.zeros(2, 13, 3, 5), C=torch.zeros(2, 13, 3, 5)), "multiple of ngroups"),
        (dict(D=torch.zeros(3)), "D must be"),
        (dict(dt_bias=torch.zeros(2)), "dt_bias must be"),
    ],
)
def test_bad_shapes_are_named(change, message):
    inp = dict(make_inputs(), **{k: v.double() for k, v in change.items()})
    with pytest.raises(ValueError, match=message):
        non_causal_ssd(**inp)
