"""selective_scan: every op backend against the float64 sequential reference, plus dispatch and errors."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vmamba.kernels import available_backends, selective_scan, selective_scan_reference
from vmamba.kernels.backends import BACKEND_ENV_VAR, resolve_backend
from vmamba.kernels.torch_scan import chunked_linear_scan

OP_BACKENDS = [b for b in available_backends("cpu") if b not in ("reference", "triton")]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    batch=2, dim=8, length=37, dstate=4, groups=None, z=True, bias=True, D=True, dtype=torch.float64
):
    """Random scan inputs; ``groups=None`` gives 3-D B and C."""
    g = torch.Generator().manual_seed(batch * 1000 + dim * 100 + length * 10 + dstate)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    bc_shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    return dict(
        u=rnd(batch, dim, length),
        delta=rnd(batch, dim, length, scale=0.5),
        A=(-torch.rand(dim, dstate, generator=g, dtype=torch.float64) * 2 - 0.1).to(dtype),
        B=rnd(*bc_shape),
        C=rnd(*bc_shape),
        D=rnd(dim) if D else None,
        z=rnd(batch, dim, length) if z else None,
        delta_bias=rnd(dim, scale=0.5) if bias else None,
    )


def run(inputs, softplus, backend, last=True):
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_(True)) for k, v in inputs.items()}
    if backend == "ground truth":
        out, state = selective_scan_reference(**leaves, delta_softplus=softplus, return_last_state=True)
    else:
        out, state = selective_scan(
            **leaves, delta_softplus=softplus, return_last_state=True, backend=backend
        )
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    if last:
        loss = (
            loss + (state * torch.randn(state.shape, generator=g, dtype=torch.float64).to(state.dtype)).sum()
        )
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return out, state, grads


CASES = [
    dict(length=1),
    dict(length=2, dstate=1),
    dict(length=37),
    dict(length=64, dstate=16),
    dict(length=101, dstate=16, groups=2),
    dict(length=50, groups=4, dim=8),
    dict(length=33, groups=1, z=False),
    dict(length=29, bias=False, D=False),
    dict(length=130, dstate=1, dim=4, batch=1),
]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("softplus", [True, False])
def test_matches_float64_reference(backend, case, softplus):
    inputs = make_inputs(**case)
    ref = run(inputs, softplus, "ground truth")
    got = run(inputs, softplus, backend)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-9)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-8, atol=1e-8, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize(
    "dtype, rtol, atol",
    [(torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2), (torch.float16, 3e-3, 5e-3)],
)
def test_low_precision_within_mamba_tolerances(backend, dtype, rtol, atol):
    inputs = make_inputs(length=45, dstate=16, groups=2, dtype=dtype)
    inputs["A"] = inputs["A"].float()  # A stays float32, as in mamba_ssm
    out, state, grads = run(inputs, True, backend, last=False)
    ref_inputs = {k: None if v is None else v.double() for k, v in inputs.items()}
    ref_out, ref_state, ref_grads = run(ref_inputs, True, "ground truth", last=False)
    assert out.dtype == dtype and state.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype
        scale = ref_grads[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.double() / scale, ref_grads[name] / scale, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_gradcheck_float64(backend):
    inputs = make_inputs(batch=1, dim=4, length=6, dstate=2, groups=2)
    names = [k for k, v in inputs.items() if v is not None]
    leaves = [inputs[k].clone().requires_grad_(True) for k in names]

    def f(*args):
        kw = dict(zip(names, args))
        out, state = selective_scan(**kw, delta_softplus=True, return_last_state=True, backend=backend)
        return out, state

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_reference_gradcheck_is_exact():
    """The ground truth itself agrees with finite differences (guards the reference, too)."""
    inputs = make_inputs(batch=1, dim=2, length=5, dstate=3)
    names = [k for k, v in inputs.items() if v is not None]
    leaves = [inputs[k].clone().requires_grad_(True) for k in names]
    f = lambda *a: selective_scan_reference(**dict(zip(names, a)), delta_softplus=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, leaves)


def test_reference_matches_a_hand_computed_step():
    # One channel, one state, two steps: h1 = dt*B1*u1, h2 = exp(dt*A)*h1 + dt*B2*u2, y = C*h + D*u.
    u = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    delta = torch.full_like(u, 0.5)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[2.0, 3.0]]], dtype=torch.float64)
    C = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    D = torch.tensor([0.25], dtype=torch.float64)
    h1 = 0.5 * 2.0 * 1.0
    h2 = torch.exp(torch.tensor(-0.5)).item() * h1 + 0.5 * 3.0 * 2.0
    expected = torch.tensor([[[h1 + 0.25, -h2 + 0.5]]], dtype=torch.float64)
    torch.testing.assert_close(selective_scan_reference(u, delta, A, B, C, D), expected)
    for backend in OP_BACKENDS:
        torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, backend=backend), expected)


@pytest.mark.parametrize("length, chunk", [(1, None), (7, 3), (16, 4), (17, 4), (100, None)])
def test_chunked_linear_scan_matches_loop(length, chunk):
    a = torch.rand(2, 3, length, 5, dtype=torch.float64)
    b = torch.randn(2, 3, length, 5, dtype=torch.float64)
    h, expected = torch.zeros_like(b[..., 0, :]), []
    for t in range(length):
        h = a[..., t, :] * h + b[..., t, :]
        expected.append(h)
    torch.testing.assert_close(chunked_linear_scan(a, b, chunk), torch.stack(expected, dim=-2))


def test_bad_inputs_raise_clear_errors():
    x = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="u must be"):
        selective_scan(x["u"][0], x["delta"], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match="delta must have"):
        selective_scan(x["u"], x["delta"][..., :-1], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match=r"A must be \(dim, N\)"):
        selective_scan(x["u"], x["delta"], x["A"][:3], x["B"], x["C"])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][..., :-1], x["C"])
    with pytest.raises(ValueError, match="does not divide"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][:, None].expand(-1, 3, -1, -1), x["C"])
    with pytest.raises(ValueError, match="D must be"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=torch.ones(3))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        selective_scan(x["u"].long(), x["delta"], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match="complex A"):
        selective_scan(x["u"], x["delta"], x["A"].to(torch.complex64), x["B"], x["C"])
    with pytest.raises(ValueError, match="unknown selective-scan backend 'fast'"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="fast")
    with pytest.raises(ValueError, match="meta"):
        selective_scan(x["u"], x["delta"], x["A"].to("meta"), x["B"], x["C"])


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    assert resolve_backend("reference", torch.device("cpu")) is None  # explicit names win
    monkeypatch.setenv(BACKEND_ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        resolve_backend("auto", torch.device("cpu"))


def test_auto_picks_a_cpu_backend_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("auto", torch.device("cpu")).name in ("cpu", "torch")


def _scan_module():
    class Scan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(-torch.rand(8, 4) - 0.1)
            self.D = torch.nn.Parameter(torch.ones(8))

        def forward(self, u, delta, B, C, z):
            return selective_scan(u, delta, self.A, B, C, self.D, z, None, True)

    torch.manual_seed(0)
    args = (torch.randn(2, 8, 37), torch.randn(2, 8, 37), torch.randn(2, 4, 37), torch.randn(2, 4, 37))
    return Scan(), args + (torch.randn(2, 8, 37),)


def test_torch_compile_sees_one_op():
    module, args = _scan_module()
    eager = module(*args)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert module.A.grad is not None and torch.isfinite(module.A.grad).all()


def test_torch_export_keeps_the_custom_op():
    module, args = _scan_module()
    exported = torch.export.export(module, args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any("vmamba.selective_scan" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(*args), module(*args))


def test_custom_ops_have_explicit_schemas():
    """Every ``torch.library.custom_op`` in the package passes ``schema=``: torch < 2.8 cannot infer a
    schema from string annotations (``from __future__ import annotations``), which would break
    ``import vmamba`` there although the current torch accepts it."""
    root = Path(__file__).resolve().parents[2]
    missing = []
    for path in sorted([*(root / "kernels").rglob("*.py"), *(root / "vmamba").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            is_custom_op = isinstance(node, ast.Call) and (
                getattr(node.func, "attr", None) == "custom_op"
                or getattr(node.func, "id", None) == "custom_op"
            )
            if is_custom_op and not any(k.arg == "schema" for k in node.keywords):
                missing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not missing, f"torch.library.custom_op without schema=...: {missing}"


@pytest.mark.parametrize(
    "name, function, schema",
    [
        ("selective_scan", "_scan_op", "SCAN_SCHEMA"),
        ("selective_scan_backward", "_scan_backward_op", "SCAN_BACKWARD_SCHEMA"),
    ],
)
def test_custom_op_schema_is_registered_and_fits_the_function(name, function, schema):
    module = importlib.import_module("vmamba.kernels.selective_scan")  # the package exports the function

    registered = getattr(torch.ops.vmamba, name).default._schema
    assert str(registered) == f"vmamba::{name}{getattr(module, schema)}"
    python_names = list(inspect.signature(getattr(module, function)._init_fn).parameters)
    assert [a.name for a in registered.arguments] == python_names


# A fresh interpreter in which triton is broken in one of the ways seen on users' machines: the CPU path
# works without probing Triton, and once Triton is probed (here through TRITON_INTERPRET=1) an explicit
# backend="triton" says what is wrong.
_BROKEN_TRITON = """
import importlib.abc, os, sys
how = sys.argv[1]
if how == "missing":
    sys.modules["triton"] = None  # import triton -> ImportError
else:  # importing our kernels fails as on a machine without a GPU driver (triton 3.3)
    class NoDriver(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("vmamba.kernels.triton."):
                raise RuntimeError("0 active drivers ([]). There should only be one.")
    sys.meta_path.insert(0, NoDriver())

import torch
import vmamba
import vmamba.kernels.triton as kt
from vmamba.kernels import available_backends, selective_scan

if how == "old":
    kt.MIN_TRITON = (99, 0)  # the installed triton is older than the kernels need

u, A, B = torch.randn(1, 4, 5), -torch.rand(4, 3), torch.randn(1, 3, 5)
assert torch.isfinite(selective_scan(u, u, A, B, B)).all()
assert "triton" not in available_backends("cpu")
assert kt._PROBE is None, "CPU tensors probed Triton"

os.environ["TRITON_INTERPRET"] = "1"
assert "triton" not in available_backends("cpu")
assert torch.isfinite(selective_scan(u, u, A, B, B)).all()
try:
    selective_scan(u, u, A, B, B, backend="triton")
except ValueError as error:
    print(error)
else:
    raise AssertionError("backend='triton' ran although triton is broken")
assert kt.INTERPRETED is False and kt.triton_multi_direction_scan is None
"""


@pytest.mark.parametrize(
    "how, reason",
    [
        ("missing", "ModuleNotFoundError"),
        ("old", "these kernels need triton >= 99.0"),
        ("no-driver", "0 active drivers"),
    ],
)
def test_a_broken_triton_only_disables_the_triton_backend(how, reason):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV_VAR)}
    result = subprocess.run(
        [sys.executable, "-c", _BROKEN_TRITON, how], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'triton'" in result.stdout and reason in result.stdout, result.stdout
