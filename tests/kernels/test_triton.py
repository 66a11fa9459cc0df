"""The Triton backend: kernels against the float64 reference, the fused multi-direction scan, dispatch.

Without a GPU the kernels run under Triton's interpreter. Triton chooses compiled or interpreted kernels
when it is first imported (and torch imports it early), so ``TRITON_INTERPRET=1`` cannot be switched on
inside this pytest process: :func:`test_kernels_under_interpreter` runs this file again in a subprocess
with the variable set from the start, where the ``interpreter`` tests below run and the rest skip. GPU
tests are marked ``gpu`` and skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vmamba.kernels import multi_direction_selective_scan, selective_scan
from vmamba.kernels.backends import available_backends, get_backend, resolve_backend

triton = pytest.importorskip("triton")

from vmamba.kernels.triton import (  # noqa: E402
    INTERPRETED,
    is_available,
    triton_multi_direction_scan,
    unavailable_reason,
)

HAS_CUDA = torch.cuda.is_available() and not INTERPRETED
interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# (rtol, atol) against the float64 reference, as in mamba_ssm's tests.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
}


def _quicker_interpreter_calls() -> None:
    """Let the interpreter patch ``triton.language`` once per ``@triton.jit`` helper, not on every call.

    On every call of a helper from a kernel (softplus, token_index, tl.sigmoid, ...) the interpreter
    patches the modules the helper sees (about a millisecond) and never undoes it, so patching the first
    time is enough. That makes the kernels about 1.5x faster under the interpreter; results are
    unchanged. Only used by this test module, only under the interpreter, and only where the
    interpreter has the internals it relies on.
    """
    from triton.runtime import interpreter as interp

    if not (hasattr(interp, "_patch_lang") and hasattr(interp.InterpretedFunction, "rewrite")):
        return
    patched = set()

    def call(self, *args, **kwargs):
        if self.fn not in patched:
            interp._patch_lang(self.fn)
            patched.add(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    interp.InterpretedFunction.__call__ = call


if INTERPRETED:
    _quicker_interpreter_calls()


def make_inputs(
    batch,
    dim,
    length,
    dstate,
    groups,
    dtype=torch.float64,
    weight_dtype=None,
    D=True,
    z=True,
    bias=True,
    device="cpu",
):
    """Random scan inputs with grouped B/C; ``weight_dtype`` for A, D, delta_bias (fp32 under AMP)."""
    gen = torch.Generator().manual_seed(batch * 1000 + dim * 100 + length * 10 + dstate + groups)
    weight_dtype = weight_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    return dict(
        u=rnd(batch, dim, length),
        delta=rnd(batch, dim, length, scale=0.5),
        A=(-torch.rand(dim, dstate, generator=gen, dtype=torch.float64) * 2 - 0.1)
        .to(weight_dtype)
        .to(device),
        B=rnd(batch, groups, dstate, length),
        C=rnd(batch, groups, dstate, length),
        D=rnd(dim, dt=weight_dtype) if D else None,
        z=rnd(batch, dim, length) if z else None,
        delta_bias=rnd(dim, scale=0.5, dt=weight_dtype) if bias else None,
    )


def _leaves(inputs, to=None):
    return {
        k: None if v is None else v.detach().clone().to(to or v.dtype).requires_grad_(True)
        for k, v in inputs.items()
    }


def _weights(like, rounded_to, seed):
    """Random loss weights for ``like``, rounded to ``rounded_to`` so that both runs use the same ones."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(like.shape, generator=gen, dtype=torch.float64).to(rounded_to)
    return w.to(like.dtype).to(like.device)


def run_scan(inputs, softplus, backend, last, to=None):
    """Output, last state and every input gradient of a weighted sum of out (and the last state)."""
    leaves = _leaves(inputs, to)
    out, state = selective_scan(**leaves, delta_softplus=softplus, return_last_state=True, backend=backend)
    io_dtype = inputs["u"].dtype
    loss = (out * _weights(out, io_dtype, 1)).sum()
    if last:
        loss = (
            loss
            + (state * _weights(state, torch.float32 if io_dtype != torch.float64 else io_dtype, 2)).sum()
        )
    loss.backward()
    return out, state, {k: v.grad for k, v in leaves.items() if v is not None}


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(inputs, softplus, last=True):
    """Triton's output, last state and gradients against the reference run in float64 on the same inputs.

    The last state is computed in float32 from the same (rounded) inputs, so it gets float32's tolerance
    whatever the input dtype.
    """
    io_dtype = inputs["u"].dtype
    out, state, grads = run_scan(inputs, softplus, "triton", last)
    ref_out, ref_state, ref_grads = run_scan(inputs, softplus, "reference", last, to=torch.float64)
    assert out.dtype == io_dtype
    assert state.dtype == (torch.float64 if io_dtype == torch.float64 else torch.float32)
    assert_close(out, ref_out, io_dtype, "out")
    assert_close(state, ref_state, state.dtype, "last state")
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close(grads[name], ref_grads[name], io_dtype, f"d{name}")


# --- the kernels under the interpreter -------------------------------------------------------------------

# Under the interpreter a chunk is 8 tokens walked 4 at a time (``_common.INTERPRETER_CHUNK`` and
# ``INTERPRETER_SUB``), so L > 8 runs the chunk-parallel path and L <= 8 the single-chunk one.
SHAPES = [  # (batch, dim, L, N, groups)
    (1, 4, 1, 4, 1),  # a single token
    (1, 8, 17, 1, 2),  # odd L across three chunks, N = 1, two groups
    (1, 8, 19, 16, 1),  # N = 16, several blocks of channels in one group
    (2, 4, 7, 3, 1),  # N not a power of two, one chunk, L not a multiple of the step
    (1, 6, 16, 2, 3),  # two channels per group, L a multiple of the chunk
]


@interpreter
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}d{}L{}N{}G{}".format(*s))
def test_forward_backward_float64(shape):
    check_against_reference(make_inputs(*shape), softplus=True)


@interpreter
def test_one_chunk_over_many_steps(monkeypatch):
    """The single-chunk path (what short sequences at large batch take on a GPU) over several steps."""
    from vmamba.kernels.triton import _common

    monkeypatch.setattr(_common, "INTERPRETER_CHUNK", 64)
    check_against_reference(make_inputs(1, 4, 13, 4, 1), softplus=True)


@interpreter
@pytest.mark.parametrize("softplus", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_without_optional_inputs(softplus):
    inputs = make_inputs(2, 4, 11, 4, 2, D=False, z=False, bias=False)
    inputs["delta"] = inputs["delta"].abs()  # a positive step without softplus
    check_against_reference(inputs, softplus=softplus)


@interpreter
def test_gradient_through_last_state_only():
    inputs = make_inputs(1, 4, 13, 4, 1)
    leaves = _leaves(inputs)
    _, state = selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend="triton")
    state.sum().backward()
    ref = _leaves(inputs)
    _, ref_state = selective_scan(**ref, delta_softplus=True, return_last_state=True, backend="reference")
    ref_state.sum().backward()
    for name in NAMES:
        expected = ref[name].grad  # None where the last state does not depend on the input (C, D, z)
        expected = torch.zeros_like(ref[name]) if expected is None else expected
        assert_close(leaves[name].grad, expected, torch.float64, f"d{name}")


@interpreter
@pytest.mark.parametrize(
    "io_dtype,weight_dtype",
    [
        pytest.param(torch.float32, torch.float32, marks=pytest.mark.slow),
        (torch.bfloat16, torch.float32),
        pytest.param(torch.float16, torch.float16, marks=pytest.mark.slow),
    ],
    ids=["fp32", "bf16-fp32-weights", "fp16"],
)
def test_low_precision_inputs(io_dtype, weight_dtype):
    check_against_reference(make_inputs(1, 8, 11, 16, 2, dtype=io_dtype, weight_dtype=weight_dtype), True)


def token_major(t: torch.Tensor) -> torch.Tensor:
    """The same values as a (batch, L, channels)-contiguous tensor viewed as (batch, channels, L)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_token_major_inputs(dtype):
    """Token-major activations, as the projections produce them, and B/C as (batch, L, G, N) views."""
    weights = torch.float32 if dtype != torch.float64 else None
    inputs = make_inputs(1, 8, 11, 4, 2, dtype=dtype, weight_dtype=weights)
    for name in ("u", "delta", "z"):
        inputs[name] = token_major(inputs[name])
    for name in ("B", "C"):
        inputs[name] = inputs[name].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert inputs["u"].stride(1) == 1 and inputs["B"].stride(2) == 1
    check_against_reference(inputs, softplus=True)


def _direction_inputs(
    batch, channels, length, dstate, groups, k, shared_u, shared_z, dtype=torch.float64, z=True
):
    """Inputs of a K-direction scan: u and z shared by the directions or one block each."""
    base = make_inputs(batch, k * channels, length, dstate, k * groups, dtype=dtype)
    base["u"] = base["u"][:, :channels].contiguous() if shared_u else base["u"]
    if not z:
        base["z"] = None
    elif shared_z:
        base["z"] = base["z"][:, :channels].contiguous()
    return base


def run_directions(inputs, fn, to=None, **kwargs):
    leaves = _leaves(inputs, to)
    out = fn(**leaves, delta_softplus=True, **kwargs)
    (out * _weights(out, inputs["u"].dtype, 3)).sum().backward()
    return out, {k: v.grad for k, v in leaves.items() if v is not None}


def _reference_scan(**kwargs):
    return multi_direction_selective_scan(**kwargs, backend="reference")


def check_directions(inputs, fn, dtype, to=None, **kwargs):
    """``fn``'s output and every input gradient against the reference backend's on the same inputs (run in
    ``to`` precision, first), with ``dtype``'s tolerance; returns ``fn``'s output and gradients."""
    ref_out, ref_grads = run_directions(inputs, _reference_scan, to=to, **kwargs)
    out, grads = run_directions(inputs, fn, **kwargs)
    assert out.shape == ref_out.shape
    assert_close(out, ref_out, dtype, "out")
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].shape == inputs[name].shape
        assert_close(grads[name], ref_grads[name], dtype, f"d{name}")
    return out, grads


DIRECTION_CASES = [
    # (batch, C, grid, N, G, directions, merge, shared u, shared z)
    (1, 4, (3, 5), 4, 1, ("row", "col", "row_reversed", "col_reversed"), "sum", True, None),  # SS2D, no z
    (2, 4, (1, 13), 4, 1, ("forward", "backward"), "mean", False, True),  # Vim: own u, shared z
    (1, 4, (4, 3), 1, 2, ("col_reversed", "row", "col"), "none", False, False),
    pytest.param(
        (1, 2, (5, 2), 16, 1, ("col", "row_reversed"), "sum", True, True),
        marks=pytest.mark.slow,
        id="col-row_reversed-sum",
    ),
]


@interpreter
@pytest.mark.parametrize("case", DIRECTION_CASES, ids=lambda c: "-".join(c[5]) + f"-{c[6]}")
def test_multi_direction_matches_reference(case):
    batch, channels, grid, dstate, groups, directions, merge, shared_u, shared_z = case
    length = grid[0] * grid[1]
    inputs = _direction_inputs(
        batch,
        channels,
        length,
        dstate,
        groups,
        len(directions),
        shared_u,
        bool(shared_z),
        z=shared_z is not None,
    )
    kwargs = dict(directions=directions, grid_size=grid, merge=merge)
    check_directions(inputs, triton_multi_direction_scan, torch.float64, **kwargs)


@interpreter
def test_multi_direction_bfloat16_token_major():
    """VMamba's four directions on bf16 token-major activations; gradients come back token-major."""
    inputs = _direction_inputs(1, 4, 12, 4, 1, 4, True, False, dtype=torch.bfloat16)
    for name in ("u", "delta", "z"):
        inputs[name] = token_major(inputs[name])
    kwargs = dict(directions=("row", "col", "row_reversed", "col_reversed"), grid_size=(3, 4), merge="sum")
    out, grads = check_directions(
        inputs, triton_multi_direction_scan, torch.bfloat16, torch.float64, **kwargs
    )
    assert out.dtype == torch.bfloat16
    assert grads["delta"].stride(1) == 1 and grads["z"].stride(1) == 1


def _low_rank(inputs, k, rank, seed=7):
    """``inputs`` with delta replaced by a low-rank step input (batch, K*R, L), and the (K*C, R) weight."""
    gen = torch.Generator().manual_seed(seed)
    batch, total, length = inputs["delta"].shape
    x = torch.randn(batch, k * rank, length, generator=gen, dtype=torch.float64).to(inputs["delta"].dtype)
    weight = 0.5 * torch.randn(total, rank, generator=gen, dtype=torch.float64)
    return dict(inputs, delta=x, delta_proj_weight=weight.to(inputs["A"].dtype))


LOW_RANK_CASES = [
    # (batch, C, grid, N, R, directions, merge, shared u): Vim's pair over two chunks, VMamba's four
    (2, 4, (1, 13), 4, 3, ("forward", "backward"), "mean", False),
    (1, 4, (3, 5), 16, 2, ("row", "col", "row_reversed", "col_reversed"), "sum", True),
]


@interpreter
@pytest.mark.parametrize("case", LOW_RANK_CASES, ids=lambda c: f"K{len(c[5])}-R{c[4]}-{c[6]}")
def test_multi_direction_low_rank_steps(case, monkeypatch):
    """delta_proj_weight projected inside the kernels: the output and every gradient (low-rank input and
    weight included) against the reference scan of the projected steps, with no projection run outside."""
    from vmamba.kernels import directions as directions_module

    batch, channels, grid, dstate, rank, directions, merge, shared_u = case
    k = len(directions)
    inputs = _direction_inputs(batch, channels, grid[0] * grid[1], dstate, 1, k, shared_u, True)
    inputs = _low_rank(inputs, k, rank)
    kwargs = dict(directions=directions, grid_size=grid, merge=merge)

    def triton_only(**kw):
        with monkeypatch.context() as patch:
            patch.setattr(directions_module, "project_steps", no_projection)
            return multi_direction_selective_scan(**kw, backend="triton")

    def no_projection(*args):
        raise AssertionError("the steps were projected outside the kernels")

    _, grads = check_directions(inputs, triton_only, torch.float64, **kwargs)
    assert "delta_proj_weight" in grads


@interpreter
def test_multi_direction_low_rank_bfloat16_token_major():
    """Vim's mixer as it calls the scan on a GPU: bf16 token-major activations and low-rank steps,
    float32 parameters."""
    inputs = _direction_inputs(1, 8, 11, 4, 1, 2, False, True, dtype=torch.bfloat16)
    inputs = _low_rank(inputs, 2, 3)
    for name in ("u", "delta", "z"):
        inputs[name] = token_major(inputs[name])
    for name in ("A", "D", "delta_bias", "delta_proj_weight"):
        inputs[name] = inputs[name].float()
    kwargs = dict(directions=("forward", "backward"), merge="mean")
    out, grads = check_directions(
        inputs, triton_multi_direction_scan, torch.bfloat16, torch.float64, **kwargs
    )
    assert out.dtype == torch.bfloat16 and grads["delta_proj_weight"].dtype == torch.float32


@interpreter
def test_bench_scan_cuda_dry_run(monkeypatch, capsys):
    """``benchmarks/bench_scan_cuda.py`` builds its rows and table end to end (tiny shapes, CPU tensors
    under the interpreter, one call per timing), so a GPU session does not find it broken."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scan_cuda.py"
    spec = importlib.util.spec_from_file_location("bench_scan_cuda", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_scan_cuda", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "LOW_RANK_TIMED", 3)  # the first shape's rank: timed; the second's not
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def do_bench(fn, grad_to_none=None):
        fn()
        return 1.0

    shapes = [
        bench.Shape("vim", "vim", bench.VIM, 8, 4, (1, 13), False, True, "mean", 2, 3),
        bench.Shape("ss2d", "vmamba", bench.SS2D, 8, 1, (3, 5), True, False, "sum", 1, 2),
    ]
    rows = [bench.bench_shape(s, s.batch, torch.float32, 1e12, do_bench) for s in shapes]
    bench.print_table(rows, 1e12, "dry run")
    assert all(r["fused_over_one_fwdbwd"] == 1.0 for r in rows)
    assert rows[0]["lowrank_over_fused_fwd"] == 1.0 and rows[1]["lowrank_fwd_ms"] is None
    assert "low-rank fwd, fwd+bwd ms" in capsys.readouterr().out


@interpreter
def test_multi_direction_without_grad_saves_nothing():
    inputs = _direction_inputs(1, 4, 6, 4, 1, 2, True, True)
    with torch.no_grad():
        out = triton_multi_direction_scan(**inputs, delta_softplus=True, directions=("forward", "backward"))
    ref = multi_direction_selective_scan(
        **inputs, delta_softplus=True, directions=("forward", "backward"), backend="reference"
    )
    assert_close(out, ref, torch.float64, "out")


@interpreter
def test_backend_runs_on_cpu_under_interpreter():
    assert "triton" in available_backends("cpu")
    assert is_available(torch.device("cpu"))
    # "auto" never picks Triton for CPU tensors, even here.
    assert resolve_backend("auto", torch.device("cpu")).name != "triton"


# --- argument checks of the fused multi-direction scan (no kernel runs) -----------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(directions=()), "at least one direction"),
        (dict(directions=("diagonal",)), "unknown scan direction"),
        (dict(directions=("row", "col")), "needs grid_size"),
        (dict(directions=("row", "col"), grid_size=(2, 5)), "has 10 cells"),
        (dict(directions=("row", "row_reversed"), merge="max"), "merge must be one of"),
    ],
)
def test_multi_direction_argument_errors(kwargs, match):
    inputs = _direction_inputs(1, 4, 12, 4, 1, 2, True, True)
    with pytest.raises(ValueError, match=match):
        triton_multi_direction_scan(**inputs, **kwargs)


def test_multi_direction_low_rank_shape_errors():
    inputs = _low_rank(_direction_inputs(1, 4, 12, 4, 1, 2, True, True), 2, 3)
    with pytest.raises(ValueError, match="delta_proj_weight must be"):
        triton_multi_direction_scan(
            **dict(inputs, delta_proj_weight=inputs["delta_proj_weight"][:7]),
            directions=("forward", "backward"),
        )
    with pytest.raises(ValueError, match=r"delta must be \(batch, K\*R, L\)"):
        triton_multi_direction_scan(
            **dict(inputs, delta=inputs["delta"][:, :5]), directions=("forward", "backward")
        )


def test_multi_direction_shape_errors():
    inputs = _direction_inputs(1, 4, 12, 4, 1, 2, True, True)
    bad_u = dict(inputs, u=inputs["u"][:, :3])
    with pytest.raises(ValueError, match="u must be"):
        triton_multi_direction_scan(**bad_u, directions=("forward", "backward"))
    bad_a = dict(inputs, A=inputs["A"][:4])
    with pytest.raises(ValueError, match="A must be"):
        triton_multi_direction_scan(**bad_a, directions=("forward", "backward"))


# --- dispatch (this process) ----------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="checks the behaviour without the interpreter")
def test_cpu_tensors_need_the_interpreter():
    assert "triton" not in available_backends("cpu")
    assert resolve_backend("auto", torch.device("cpu")).name != "triton"
    inputs = make_inputs(1, 4, 5, 2, 1)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        selective_scan(**inputs, backend="triton")
    assert "TRITON_INTERPRET=1" in unavailable_reason(torch.device("cpu"))


def test_cuda_devices_are_available_when_triton_imports():
    assert is_available(torch.device("cuda"))
    assert not is_available(torch.device("meta"))
    assert get_backend("triton").name == "triton"


@pytest.mark.skipif(INTERPRETED, reason="runs once, in the main process")
def test_kernels_import_without_triton():
    """``import vmamba.kernels`` works where triton is missing; the backend then says why it cannot run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from vmamba.kernels import available_backends, selective_scan\n"
        "from vmamba.kernels.backends import get_backend\n"
        "assert 'triton' not in available_backends('cuda'), available_backends('cuda')\n"
        "print(get_backend('triton').unavailable_reason(torch.device('cuda')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton is not importable" in result.stdout


# --- the bidirectional causal conv1d (+ SiLU) ---------------------------------------------------------------


def _conv_inputs(batch, length, channels, k, dtype, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device)

    x = rnd(batch, length, 2 * channels)[..., :channels].to(dtype)  # a slice, as of in_proj's output
    w, w_b = rnd(channels, 1, k, scale=0.5), rnd(channels, 1, k, scale=0.5)
    b, b_b = (rnd(channels), rnd(channels)) if bias else (None, None)
    return x, w, b, w_b, b_b


def check_conv(batch, length, channels, k, dtype, bias, silu, device="cpu"):
    """Forward and the gradients of x, both weights and both biases against the float64 reference."""
    from vmamba.kernels import bidirectional_causal_conv1d_reference
    from vmamba.kernels.triton import triton_bidirectional_conv1d

    x, w, b, w_b, b_b = _conv_inputs(batch, length, channels, k, dtype, bias, device)
    params = [t for t in (w, b, w_b, b_b) if t is not None]
    leaves = [x.detach().requires_grad_()] + [p.float().requires_grad_() for p in params]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]

    def taps_and_bias(w, b, w_b, b_b):
        taps = torch.stack([w.reshape(channels, k), w_b.reshape(channels, k)]).transpose(1, 2)
        return taps, None if b is None else torch.stack([b, b_b])

    def unpack(ts):
        it = iter(ts[1:])
        w_, b_ = next(it), next(it) if bias else None
        w_b_, b_b_ = next(it), next(it) if bias else None
        return w_, b_, w_b_, b_b_

    out = triton_bidirectional_conv1d(leaves[0], *taps_and_bias(*unpack(leaves)), silu)
    want = bidirectional_causal_conv1d_reference(ref_leaves[0], *unpack(ref_leaves), silu=silu)
    assert out.shape == (batch, length, 2 * channels) and out.dtype == dtype and out.is_contiguous()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), want.detach(), rtol=rtol, atol=atol)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, upstream.to(device, dtype))
    expected = torch.autograd.grad(want, ref_leaves, upstream.to(device))
    for name, a, e in zip(("x", "w", "b", "w_b", "b_b") if bias else ("x", "w", "w_b"), got, expected):
        scale = max(1.0, e.abs().max().item())  # weight gradients sum over batch * L tokens
        torch.testing.assert_close(a.double() / scale, e / scale, rtol=rtol, atol=atol, msg=name)


@interpreter
@pytest.mark.parametrize(
    "batch, length, channels, k, bias, silu",
    [
        (2, 37, 24, 4, True, True),
        (1, 3, 130, 4, False, True),
        (2, 17, 5, 1, True, False),
        (1, 1, 8, 4, True, True),
    ],
)
def test_bidirectional_conv1d_interpreter(batch, length, channels, k, bias, silu):
    """Tiles past L and C, L shorter than the kernel, k = 1, no bias, no SiLU."""
    check_conv(batch, length, channels, k, torch.float32, bias, silu)


@interpreter
def test_bidirectional_conv1d_bfloat16_interpreter():
    check_conv(2, 40, 24, 4, torch.bfloat16, True, True)


# --- the residual add fused with RMSNorm ---------------------------------------------------------------------


def check_add_rms_norm(rows, n, dtype, residual=True, device="cpu"):
    """Both outputs and the gradients of x, the residual and the weight against float64 PyTorch ops."""
    from vmamba.kernels.triton import triton_add_rms_norm

    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(2, rows, n, generator=g, dtype=torch.float64)
    res = torch.randn(2, rows, n, generator=g, dtype=torch.float64) if residual else None
    w = 1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    leaves = [
        x.to(device, dtype),
        None if res is None else res.to(device, torch.float32),
        w.float().to(device),
    ]
    leaves = [t if t is None else t.requires_grad_() for t in leaves]
    refs = [t if t is None else t.detach().double().requires_grad_() for t in leaves]
    normed, total = triton_add_rms_norm(leaves[0], leaves[1], leaves[2], 1e-5)
    ref_total = refs[0] if refs[1] is None else refs[1] + refs[0]
    ref_normed = ref_total * torch.rsqrt(ref_total.square().mean(-1, keepdim=True) + 1e-5) * refs[2]
    out_dtype = dtype if res is None else torch.float32
    assert normed.dtype == out_dtype and total.dtype == out_dtype and normed.shape == x.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(normed.double(), ref_normed.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(total.double(), ref_total.detach(), rtol=rtol, atol=atol)
    up = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    outputs, ref_outputs = (normed, total), (ref_normed, ref_total)
    if res is None:  # the "sum" is x itself
        outputs, ref_outputs, up = outputs[:1], ref_outputs[:1], up[:1]
    got = torch.autograd.grad(
        outputs, [t for t in leaves if t is not None], [u.to(device, o.dtype) for u, o in zip(up, outputs)]
    )
    want = torch.autograd.grad(ref_outputs, [t for t in refs if t is not None], [u.to(device) for u in up])
    for a, e in zip(got, want):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.double() / scale, e / scale, rtol=rtol, atol=atol)


@interpreter
@pytest.mark.parametrize(
    "rows, n, residual", [(37, 192, True), (5, 100, False), (1, 1, True), (20, 33, True)]
)
def test_add_rms_norm_interpreter(rows, n, residual):
    """More rows than a backward program takes, a width that is not a power of 2, no residual, n = 1."""
    check_add_rms_norm(rows, n, torch.float32, residual)


@interpreter
def test_add_rms_norm_bfloat16_input_interpreter():
    check_add_rms_norm(9, 64, torch.bfloat16)


def _run_under_interpreter(marks: str) -> None:
    """Run this file's tests selected by ``marks`` in a fresh process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    env.pop("VMAMBA_SCAN_BACKEND", None)
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-m", marks]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.skipif(INTERPRETED, reason="this is the driver of the interpreter run")
def test_kernels_under_interpreter():
    """This file's ``interpreter`` tests (not the slow ones), in a subprocess with TRITON_INTERPRET=1."""
    _run_under_interpreter("not gpu and not slow")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the driver of the interpreter run")
def test_slow_kernels_under_interpreter():
    """The slow ``interpreter`` tests, in a subprocess with TRITON_INTERPRET=1."""
    _run_under_interpreter("slow and not gpu")


# --- compiling for a GPU without one ------------------------------------------------------------------------


def _compile_for_sm90(kernel, constexprs: dict, io: str, io_pointers: tuple[str, ...] = ()) -> bytes:
    """Compile ``kernel`` to an sm_90 cubin (Triton ships ptxas, so no GPU or driver is needed)."""
    from vmamba.kernels.triton._common import compile_for_arch

    return compile_for_arch(kernel, constexprs, io, arch=90, io_pointers=io_pointers).asm["cubin"]


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the interpreter run checks the numbers; this checks compilation")
@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}), reason="no NVIDIA backend")
def test_kernels_compile_for_sm90():
    """Everything the interpreter accepts must also compile: both kernels, every feature on, bf16 I/O."""
    import triton.language as tl

    from vmamba.kernels.triton.scan_bwd import _bwd_kernel, _bwd_local_kernel
    from vmamba.kernels.triton.scan_fwd import _boundary_kernel, _fwd_kernel

    flags = dict(
        BLOCK_N=16,
        MATH=tl.float32,
        HAS_Z=True,
        HAS_BIAS=True,
        RANK=0,
        BLOCK_R=1,
        SOFTPLUS=True,
        HAS_DIRS=True,
        EVEN_N=True,
        BLOCK_D=32,
        SUB=4,
    )
    fwd = dict(HAS_D=True, LOAD_ENTRY=True, STORE_OUT=True, STORE_END=True, STORE_DTSUM=True)
    boundary = dict(BLOCK_D=32, BLOCK_N=16, MATH=tl.float32, REVERSE=True, HAS_INIT=True, STORE_FINAL=True)
    assert _compile_for_sm90(_fwd_kernel, dict(flags, **fwd), "bf16")
    assert _compile_for_sm90(_boundary_kernel, boundary, "bf16")
    assert _compile_for_sm90(_bwd_local_kernel, dict(flags, LOAD_ENTRY=True, LOCAL_CARRY=True), "bf16")
    assert _compile_for_sm90(_bwd_kernel, dict(flags, HAS_D=True, HAS_DLAST=True, LOAD_CARRY=True), "bf16")
    # Steps projected from low-rank inputs (Vim-Ti's rank 12), as the mixers call the scan.
    low_rank = dict(flags, RANK=12, BLOCK_R=16)
    assert _compile_for_sm90(_fwd_kernel, dict(low_rank, **fwd), "bf16")
    assert _compile_for_sm90(_bwd_local_kernel, dict(low_rank, LOAD_ENTRY=True, LOCAL_CARRY=True), "bf16")
    assert _compile_for_sm90(_bwd_kernel, dict(low_rank, HAS_D=True, HAS_DLAST=True, LOAD_CARRY=True), "bf16")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the interpreter run checks the numbers; this checks compilation")
@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}), reason="no NVIDIA backend")
def test_conv1d_kernels_compile_for_sm90():
    from vmamba.kernels.triton.conv1d import (
        _bidir_conv_bwd_dx_kernel,
        _bidir_conv_bwd_grad_kernel,
        _bidir_conv_fwd_kernel,
    )

    tiles = dict(KW=4, BLOCK_T=16, BLOCK_C=128)
    flags = dict(tiles, HAS_BIAS=True, SILU=True)
    assert _compile_for_sm90(_bidir_conv_fwd_kernel, flags, "bf16")
    assert _compile_for_sm90(_bidir_conv_bwd_grad_kernel, flags, "bf16")
    assert _compile_for_sm90(_bidir_conv_bwd_dx_kernel, tiles, "bf16", io_pointers=("dx_ptr",))


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the interpreter run checks the numbers; this checks compilation")
@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}), reason="no NVIDIA backend")
def test_add_rms_norm_kernels_compile_for_sm90():
    from vmamba.kernels.triton.rms_norm import _add_rms_norm_bwd_kernel, _add_rms_norm_fwd_kernel

    assert _compile_for_sm90(_add_rms_norm_fwd_kernel, dict(HAS_RES=True, BLOCK_N=256), "fp32")
    assert _compile_for_sm90(_add_rms_norm_bwd_kernel, dict(HAS_DSUM=True, ROWS=16, BLOCK_N=256), "fp32")


# --- on a GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 1030, 16, 1), (2, 96, 257, 1, 1), (1, 128, 197, 16, 2)])
def test_gpu_matches_reference(shape, dtype):
    check_against_reference(make_inputs(*shape, dtype=dtype, weight_dtype=torch.float32, device="cuda"), True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(64, 192, 197, 16, 1), (1, 384, 1030, 16, 1)], ids=["one-chunk", "chunks"])
def test_gpu_token_major_bfloat16(shape):
    """Vim-like bf16 token-major activations, on the single-chunk and the chunk-parallel paths."""
    inputs = make_inputs(*shape, dtype=torch.bfloat16, weight_dtype=torch.float32, device="cuda")
    for name in ("u", "delta", "z"):
        inputs[name] = token_major(inputs[name])
    check_against_reference(inputs, True)


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_picks_triton():
    assert resolve_backend("auto", torch.device("cuda")).name == "triton"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", DIRECTION_CASES, ids=lambda c: "-".join(c[5]) + f"-{c[6]}")
def test_gpu_multi_direction(case):
    batch, channels, grid, dstate, groups, directions, merge, shared_u, shared_z = case
    grid = (grid[0] * 7, grid[1] * 5)
    length = grid[0] * grid[1]
    inputs = _direction_inputs(
        batch,
        channels * 8,
        length,
        dstate,
        groups,
        len(directions),
        shared_u,
        bool(shared_z),
        z=shared_z is not None,
        dtype=torch.float32,
    )
    inputs = {k: None if v is None else v.cuda() for k, v in inputs.items()}
    kwargs = dict(directions=directions, grid_size=grid, merge=merge)
    check_directions(inputs, triton_multi_direction_scan, torch.float32, torch.float64, **kwargs)


@pytest.mark.gpu
@needs_cuda
def test_gpu_multi_direction_low_rank():
    """Vim's case only: every rank compiles the kernels once more, and GPU time is short."""
    batch, channels, grid, dstate, rank, directions, merge, shared_u = LOW_RANK_CASES[0]
    grid = (grid[0] * 7, grid[1] * 5)
    k = len(directions)
    inputs = _direction_inputs(
        batch, channels * 8, grid[0] * grid[1], dstate, 1, k, shared_u, True, dtype=torch.float32
    )
    inputs = {n: v.cuda() for n, v in _low_rank(inputs, k, rank).items()}
    kwargs = dict(directions=directions, grid_size=grid, merge=merge)
    check_directions(inputs, triton_multi_direction_scan, torch.float32, torch.float64, **kwargs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bidirectional_conv1d(dtype):
    check_conv(4, 1025, 384, 4, dtype, True, True, device="cuda")
    check_conv(2, 197, 40, 4, dtype, False, False, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_conv1d_dispatches_to_triton(monkeypatch):
    from vmamba.kernels import bidirectional_causal_conv1d
    from vmamba.kernels import triton as triton_package

    calls = []
    real = triton_package.probe().triton_bidirectional_conv1d
    monkeypatch.setattr(
        triton_package.probe(), "triton_bidirectional_conv1d", lambda *a: calls.append(1) or real(*a)
    )
    x, w, b, w_b, b_b = (
        t if t is None else t.float() for t in _conv_inputs(1, 9, 8, 4, torch.float32, True, "cuda")
    )
    bidirectional_causal_conv1d(x, w, b, w_b, b_b, True)
    assert calls == [1]


@pytest.mark.gpu
@needs_cuda
def test_gpu_add_rms_norm():
    check_add_rms_norm(4 * 197, 192, torch.float32, device="cuda")
    check_add_rms_norm(1025, 384, torch.bfloat16, device="cuda")
    check_add_rms_norm(50, 192, torch.float32, residual=False, device="cuda")
