"""The SSD (Mamba-2) scan on CPU: reference, torch path, custom op, directions, errors, compile/export.

The float64 sequential reference is itself checked against the materialised quadratic ("attention") form
of SSD, which shares no code with it; the chunked torch path and its gradients are then checked against the
reference. The Triton kernels are checked in ``test_ssd_triton.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmamba.kernels import bidirectional_ssd_scan, multi_direction_ssd_scan, ssd_scan, ssd_scan_reference
from vmamba.kernels.ssd import SSD_BACKEND_ENV_VAR, resolve_ssd_backend

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
# (rtol, atol) against the float64 reference, relative to the output's scale (see ``assert_near``).
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_inputs(batch=2, length=49, nheads=4, headdim=8, groups=2, dstate=16, D_per_channel=False, seed=0):
    """Random float64 inputs with mamba_ssm-like scales (A in [-4.5, -0.5], raw dt around softplus^-1(0.1))."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    return {
        "x": rnd(batch, length, nheads, headdim),
        "dt": rnd(batch, length, nheads, scale=0.5, shift=-2.0),
        "A": -(torch.rand(nheads, generator=gen, dtype=torch.float64) * 4 + 0.5),
        "B": rnd(batch, length, groups, dstate),
        "C": rnd(batch, length, groups, dstate),
        "D": rnd(nheads, headdim) if D_per_channel else rnd(nheads),
        "z": rnd(batch, length, nheads, headdim),
        "dt_bias": rnd(nheads, scale=0.5),
        "initial_states": rnd(batch, nheads, headdim, dstate),
    }


def assert_near(actual, expected, tol):
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.to(torch.float64) - expected).abs().max() / scale
    assert err <= tol, f"max error {err:.3g} of the output scale > {tol}"


def quadratic_ssd(x, dt, A, B, C, D, z, dt_bias, initial_states):
    """SSD as one (L, L) matrix per batch and head: y = (C B^T * exp(segsum(dt A))) (dt x) + init term."""
    per_group = x.shape[2] // B.shape[2]
    dtp = F.softplus(dt + dt_bias)  # (b, L, h)
    Bh, Ch = B.repeat_interleave(per_group, 2), C.repeat_interleave(per_group, 2)
    cs = torch.cumsum(dtp * A, dim=1)  # (b, L, h)
    seg = cs[:, :, None, :] - cs[:, None, :, :]  # (b, i, j, h)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, :, :, None]
    mix = torch.einsum("bihn,bjhn->bijh", Ch, Bh) * torch.where(causal, seg.exp(), 0.0)
    y = torch.einsum("bijh,bjh,bjhp->bihp", mix, dtp, x)
    y = y + torch.einsum("bihn,bhpn,bih->bihp", Ch, initial_states, cs.exp())
    return (y + x * D[:, None]) * F.silu(z)


def test_reference_matches_quadratic_form():
    inputs = make_inputs(length=23)
    out = ssd_scan_reference(**inputs, dt_softplus=True)
    torch.testing.assert_close(out, quadratic_ssd(**inputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "length,chunk,D_per_channel,groups",
    [(1, 16, False, 1), (49, 16, True, 2), (197, 64, False, 4), (100, 32, True, 1), (64, 64, False, 2)],
)
def test_torch_path_matches_reference(length, chunk, D_per_channel, groups):
    inputs = make_inputs(length=length, groups=groups, D_per_channel=D_per_channel)
    ref, ref_final = ssd_scan(**inputs, dt_softplus=True, return_final_states=True, backend="reference")
    out, final = ssd_scan(
        **inputs, dt_softplus=True, chunk_size=chunk, return_final_states=True, backend="torch"
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-10)


def test_optional_arguments_and_dt_limit():
    inputs = make_inputs(length=37)
    for k in ("D", "z", "dt_bias", "initial_states"):
        inputs.pop(k)
    for softplus, limit in ((False, (0.0, float("inf"))), (True, (0.05, 0.2))):
        args = dict(inputs, dt=inputs["dt"].abs())
        ref = ssd_scan(**args, dt_softplus=softplus, dt_limit=limit, backend="reference")
        out = ssd_scan(**args, dt_softplus=softplus, dt_limit=limit, chunk_size=16, backend="torch")
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    clamped = ssd_scan(**inputs, dt_softplus=True, dt_limit=(0.05, 0.2), backend="reference")
    assert not torch.allclose(clamped, ssd_scan(**inputs, dt_softplus=True, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_torch_path(dtype):
    inputs = make_inputs(length=197)
    ref = ssd_scan(**inputs, dt_softplus=True, backend="reference")
    low = {k: (v.to(dtype) if k in ("x", "B", "C", "z") else v.float()) for k, v in inputs.items()}
    out = ssd_scan(**low, dt_softplus=True, backend="torch")
    assert out.dtype == dtype
    assert_near(out, ref, TOL[dtype])


def test_gradients_match_reference():
    inputs = {k: v.requires_grad_() for k, v in make_inputs(length=41, D_per_channel=True).items()}
    gen = torch.Generator().manual_seed(1)
    results = {}
    for backend in ("reference", "torch"):
        out, final = ssd_scan(
            **inputs,
            dt_softplus=True,
            dt_limit=(0.0, 5.0),
            chunk_size=16,
            return_final_states=True,
            backend=backend,
        )
        if backend == "reference":
            dout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            dfinal = torch.randn(final.shape, generator=gen, dtype=final.dtype)
        loss = (out * dout).sum() + (final * dfinal).sum()
        results[backend] = torch.autograd.grad(loss, [inputs[k] for k in NAMES])
    for name, ref, got in zip(NAMES, results["reference"], results["torch"]):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_gradcheck_torch_backend():
    inputs = make_inputs(batch=1, length=19, nheads=2, headdim=2, groups=1, dstate=3)
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}

    def fn(*args):
        out, final = ssd_scan(*args[:8], True, 16, args[8], True, backend="torch")
        return out, final

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in NAMES), fast_mode=True)


def test_states_chain_across_calls():
    inputs = make_inputs(length=50)
    inputs.pop("initial_states")
    full, full_final = ssd_scan(**inputs, dt_softplus=True, return_final_states=True, backend="torch")
    first = {k: (v[:, :20] if v.dim() >= 3 else v) for k, v in inputs.items()}
    second = {k: (v[:, 20:] if v.dim() >= 3 else v) for k, v in inputs.items()}
    y1, s1 = ssd_scan(**first, dt_softplus=True, return_final_states=True, backend="torch")
    y2, s2 = ssd_scan(
        **second, dt_softplus=True, initial_states=s1, return_final_states=True, backend="torch"
    )
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, full_final, rtol=1e-10, atol=1e-10)


# --- directions ----------------------------------------------------------------------------------------------


def test_bidirectional_is_two_scans_plus_one_skip():
    inputs = make_inputs(length=49)
    inputs.pop("initial_states")
    x, dt, A, B, C, D, z, bias = (inputs[k] for k in NAMES[:8])
    bi = bidirectional_ssd_scan(x, dt, A, B, C, D, z, bias, True, backend="torch")
    fwd = ssd_scan(x, dt, A, B, C, None, None, bias, True, backend="reference")
    flip = [t.flip(1) for t in (x, dt, B, C)]
    bwd = ssd_scan(flip[0], flip[1], A, flip[2], flip[3], None, None, bias, True, backend="reference").flip(1)
    expected = (fwd + bwd + x * D[:, None]) * F.silu(z)
    torch.testing.assert_close(bi, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "directions,grid",
    [
        (("forward", "backward"), None),
        (("row", "col", "row_reversed", "col_reversed"), (7, 7)),
        (("col",), (5, 8)),
    ],
)
def test_multi_direction_matches_reference_with_gradients(directions, grid):
    length = 49 if grid is None or grid == (7, 7) else 40
    inputs = make_inputs(length=length)
    inputs.pop("initial_states")
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    grads = {}
    for backend in ("reference", "torch"):
        out = multi_direction_ssd_scan(
            **inputs, dt_softplus=True, chunk_size=16, directions=directions, grid_size=grid, backend=backend
        )
        grads[backend] = (out, *torch.autograd.grad(out.square().sum(), list(inputs.values())))
    for name, ref, got in zip(("out", *inputs), grads["reference"], grads["torch"]):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=name)


def test_column_direction_is_a_transposed_row_scan():
    inputs = make_inputs(length=12)
    for k in ("initial_states", "D", "z"):
        inputs.pop(k)
    col = multi_direction_ssd_scan(**inputs, directions=("col",), grid_size=(3, 4), backend="torch")
    t = {
        k: (v.unflatten(1, (3, 4)).transpose(1, 2).flatten(1, 2) if v.dim() >= 3 else v)
        for k, v in inputs.items()
    }
    row = ssd_scan(**t, backend="reference")
    torch.testing.assert_close(col, row.unflatten(1, (4, 3)).transpose(1, 2).flatten(1, 2))


# --- errors and dispatch -------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    inputs = make_inputs(length=8)
    cases = [
        (dict(x=inputs["x"][0]), "x must be"),
        (dict(dt=inputs["dt"][..., :2]), "dt must be"),
        (dict(A=inputs["A"][:, None]), "A must be"),
        (dict(B=inputs["B"][:, :, :, :3]), "B and C must have the same shape"),
        (
            dict(B=inputs["B"][:, :, :1].expand(2, 8, 3, 16), C=inputs["C"][:, :, :1].expand(2, 8, 3, 16)),
            "divide",
        ),
        (dict(D=torch.ones(3)), "D must be"),
        (dict(z=inputs["z"][..., :2]), "z must have"),
        (dict(dt_bias=torch.ones(2)), "dt_bias must be"),
        (dict(initial_states=inputs["initial_states"][:, :, :2]), "initial_states must be"),
        (dict(chunk_size=48), "chunk_size"),
        (dict(x=inputs["x"].int()), "x has dtype"),
        (dict(backend="cuda"), "unknown SSD backend"),
        (dict(dt_limit=(1.0, 0.5)), "dt_limit"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            ssd_scan(**dict(inputs, **change))
    with pytest.raises(ValueError, match="grid_size"):
        multi_direction_ssd_scan(*(inputs[k] for k in NAMES[:5]), directions=("col",))
    with pytest.raises(ValueError, match="unknown scan direction"):
        multi_direction_ssd_scan(*(inputs[k] for k in NAMES[:5]), directions=("diagonal",))
    with pytest.raises(ValueError, match="cells"):
        multi_direction_ssd_scan(*(inputs[k] for k in NAMES[:5]), directions=("row",), grid_size=(3, 3))


def test_dispatch_and_environment_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(SSD_BACKEND_ENV_VAR, raising=False)
    assert resolve_ssd_backend("auto", cpu) == "torch"
    monkeypatch.setenv(SSD_BACKEND_ENV_VAR, "reference")
    assert resolve_ssd_backend("auto", cpu) == "reference"
    assert resolve_ssd_backend("torch", cpu) == "torch"
    monkeypatch.setenv(SSD_BACKEND_ENV_VAR, "cpu")
    with pytest.raises(ValueError, match=SSD_BACKEND_ENV_VAR):
        resolve_ssd_backend("auto", cpu)
    with pytest.raises(ValueError, match="float64"):
        resolve_ssd_backend("triton", torch.device("cuda"), torch.float64)


# --- compile, export -----------------------------------------------------------------------------------------


class _SSDModule(torch.nn.Module):
    def __init__(self, directions=None):
        super().__init__()
        self.A = torch.nn.Parameter(-torch.linspace(0.5, 2.0, 4))
        self.D = torch.nn.Parameter(torch.ones(4))
        self.dt_bias = torch.nn.Parameter(torch.zeros(4))
        self.directions = directions

    def forward(self, x, dt, B, C, z):
        if self.directions is None:
            return ssd_scan(x, dt, self.A, B, C, self.D, z, self.dt_bias, True, chunk_size=16)
        return multi_direction_ssd_scan(
            x,
            dt,
            self.A,
            B,
            C,
            self.D,
            z,
            self.dt_bias,
            True,
            16,
            directions=self.directions,
            grid_size=(5, 7),
        )


def _module_args():
    gen = torch.Generator().manual_seed(0)
    shapes = ((2, 35, 4, 8), (2, 35, 4), (2, 35, 2, 16), (2, 35, 2, 16), (2, 35, 4, 8))
    return tuple(torch.randn(*s, generator=gen) for s in shapes)


def test_torch_compile_sees_one_op():
    module, args = _SSDModule(), _module_args()
    eager = module(*args)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert module.A.grad is not None and torch.isfinite(module.A.grad).all()


def test_opcheck_custom_op():
    from vmamba.kernels.ssd import _ssd_op

    x, dt, B, C, z = _module_args()
    A, D = -torch.linspace(0.5, 2.0, 4).requires_grad_(), torch.ones(4, requires_grad=True)
    x.requires_grad_()
    args = (x, dt, A, B, C, D, z, None, None, True, 0.0, float("inf"), 16, [0], [], "torch")
    torch.library.opcheck(_ssd_op, args)


def test_torch_export_keeps_the_custom_op():
    module, args = _SSDModule(("row", "col_reversed")), _module_args()
    exported = torch.export.export(module, args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any("vmamba.ssd_scan" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(*args), module(*args))


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    module, args = _SSDModule(("row", "col", "row_reversed", "col_reversed")), _module_args()
    path = tmp_path / "ssd.onnx"
    torch.onnx.export(module, args, str(path), dynamo=True)
    session = ort.InferenceSession(str(path))
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    out = session.run(None, feeds)[0]
    torch.testing.assert_close(torch.from_numpy(out), module(*args).detach(), rtol=1e-4, atol=1e-4)
