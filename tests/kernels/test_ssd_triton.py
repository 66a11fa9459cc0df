"""The Triton SSD kernels against the float64 reference: vision lengths, chunk sizes, dtypes, directions.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before triton is first
imported: :func:`test_ssd_kernels_under_interpreter` runs this file again in a subprocess with
``TRITON_INTERPRET=1`` (a few cases; the full matrix, with L = 3136, is the ``slow`` variant). GPU tests are
marked ``gpu`` and run the same checks on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_ssd import make_inputs  # the random inputs of the torch-path tests (same scales)

from vmamba.kernels import multi_direction_ssd_scan, ssd_scan

pytest.importorskip("triton")

from vmamba.kernels.triton import INTERPRETED  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and not INTERPRETED
interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEVICE = "cuda" if HAS_CUDA else "cpu"

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
# Largest error allowed, relative to the largest magnitude of the float64 reference output.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRID_4 = ("row", "col", "row_reversed", "col_reversed")
SMALL = (1, 2, 16, 1, 16)  # (batch, nheads, headdim, ngroups, dstate) of the default interpreter run
VISION_GRIDS = {49: (7, 7), 196: (14, 14), 784: (28, 28), 3136: (56, 56), 35: (5, 7)}


def cast(inputs, dtype):
    """Activations in ``dtype``, parameters and states in float32 (as under AMP), on the test device."""
    return {
        k: v.to(device=DEVICE, dtype=dtype if k in ("x", "B", "C", "z") else torch.float32)
        for k, v in inputs.items()
    }


def rel_err(actual, expected):
    expected = expected.to(torch.float64)
    return ((actual.cpu().to(torch.float64) - expected).abs().max() / expected.abs().max()).item()


def check_forward(
    length, chunk, dtype, shape=(2, 4, 16, 2, 16), D_per_channel=True, limit=(0.0, float("inf"))
):
    inputs = make_inputs(shape[0], length, *shape[1:], D_per_channel=D_per_channel)
    ref, ref_final = ssd_scan(
        **inputs, dt_softplus=True, dt_limit=limit, return_final_states=True, backend="reference"
    )
    out, final = ssd_scan(
        **cast(inputs, dtype),
        dt_softplus=True,
        dt_limit=limit,
        chunk_size=chunk,
        return_final_states=True,
        backend="triton",
    )
    assert out.dtype == dtype and final.dtype == torch.float32
    assert rel_err(out, ref) <= TOL[dtype], (length, chunk, dtype, rel_err(out, ref))
    assert rel_err(final, ref_final) <= TOL[dtype], (length, chunk, dtype, rel_err(final, ref_final))


def check_directions(length, directions, chunk, dtype, shape=(2, 4, 16, 1, 16)):
    inputs = make_inputs(shape[0], length, *shape[1:])
    inputs.pop("initial_states")
    grid = VISION_GRIDS.get(length)
    ref = multi_direction_ssd_scan(
        **inputs, dt_softplus=True, directions=directions, grid_size=grid, backend="reference"
    )
    out = multi_direction_ssd_scan(
        **cast(inputs, dtype),
        dt_softplus=True,
        chunk_size=chunk,
        directions=directions,
        grid_size=grid,
        backend="triton",
    )
    assert rel_err(out, ref) <= TOL[dtype], (length, directions, chunk, dtype, rel_err(out, ref))


def check_gradients(length, chunk, directions=None, shape=(1, 4, 8, 2, 16), dtype=torch.float32):
    """Every gradient through the triton backend (its backward kernel) against autograd through the
    float64 reference, relative to each gradient's largest magnitude."""
    inputs = make_inputs(shape[0], length, *shape[1:], D_per_channel=True)
    if directions is not None:
        inputs.pop("initial_states")
    names = list(inputs)
    grads = {}
    for backend in ("reference", "triton"):
        if backend == "reference":
            args = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items()}
        else:
            args = {k: v.detach().requires_grad_() for k, v in cast(inputs, dtype).items()}
        if directions is None:
            out, final = ssd_scan(
                **args, dt_softplus=True, chunk_size=chunk, return_final_states=True, backend=backend
            )
            loss = out.float().square().sum() + final.sum()
        else:
            grid = VISION_GRIDS.get(length)
            out = multi_direction_ssd_scan(
                **args,
                dt_softplus=True,
                chunk_size=chunk,
                directions=directions,
                grid_size=grid,
                backend=backend,
            )
            loss = out.float().square().sum()
        grads[backend] = torch.autograd.grad(loss, [args[k] for k in names])
    tol = 1e-4 if dtype == torch.float32 else 10 * TOL[dtype]
    for name, ref, got in zip(names, grads["reference"], grads["triton"]):
        assert got.dtype == args[name].dtype, name
        assert rel_err(got, ref) <= tol, (name, length, chunk, directions, dtype, rel_err(got, ref))


# --- interpreter: a few cases in the default run, the full matrix in the slow one -----------------------------


@interpreter
@pytest.mark.parametrize(
    "length,chunk,dtype", [(49, 16, torch.float32), (197, 64, torch.bfloat16), (37, 32, torch.float16)]
)
def test_forward_interpreter(length, chunk, dtype):
    check_forward(length, chunk, dtype, shape=SMALL)


@interpreter
def test_forward_dt_limit_and_shared_D_interpreter():
    check_forward(50, 16, torch.float32, shape=(1, 2, 8, 1, 8), D_per_channel=False, limit=(0.05, 0.5))


@interpreter
@pytest.mark.parametrize("length,directions", [(35, ("forward", "backward")), (49, GRID_4)])
def test_directions_interpreter(length, directions):
    check_directions(length, directions, 16, torch.float32, shape=SMALL)


@interpreter
def test_gradients_interpreter():
    check_gradients(33, 16, shape=(1, 2, 16, 2, 16))


@interpreter
@pytest.mark.slow
@pytest.mark.parametrize("length", [49, 196, 197, 784, 37, 101])
@pytest.mark.parametrize("chunk", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matrix_interpreter(length, chunk, dtype):
    check_forward(length, chunk, dtype)


@interpreter
@pytest.mark.slow
@pytest.mark.parametrize("length", [49, 196, 784])
@pytest.mark.parametrize("directions", [("forward", "backward"), GRID_4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_directions_matrix_interpreter(length, directions, dtype):
    check_directions(length, directions, 64, dtype)


@interpreter
@pytest.mark.slow
@pytest.mark.parametrize("chunk", [64, 256])
def test_forward_3136_interpreter(chunk):
    check_forward(3136, chunk, torch.float32, shape=(1, 2, 16, 1, 16))


@interpreter
@pytest.mark.slow
@pytest.mark.parametrize(
    "length,directions", [(196, None), (197, None), (196, ("forward", "backward")), (196, GRID_4)]
)
def test_gradients_matrix_interpreter(length, directions):
    check_gradients(length, 64, directions)


def _run_interpreted(marker: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("VMAMBA_SSD_BACKEND", None)
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-m", marker]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher of the interpreter run")
def test_ssd_kernels_under_interpreter():
    """Run this file's non-slow ``interpreter`` tests in a fresh process with TRITON_INTERPRET=1."""
    _run_interpreted("not gpu and not slow")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the launcher of the interpreter run")
def test_ssd_kernels_under_interpreter_full():
    """The full interpreter matrix (vision lengths up to 3136, chunk sizes, dtypes, directions, gradients)."""
    _run_interpreted("slow and not gpu")


# --- compiling for a GPU without one ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the interpreter run checks the numbers; this checks compilation")
@pytest.mark.parametrize("io", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(io):
    """Both kernels compile to an sm_90 cubin with every option on (Triton's ptxas; no GPU needed)."""
    import triton

    from vmamba.kernels.triton._common import compile_for_arch
    from vmamba.kernels.triton.ssd_bwd import _ssd_bwd_kernel
    from vmamba.kernels.triton.ssd_fwd import _ssd_fwd_kernel

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("no NVIDIA backend in this triton")
    common = dict(CHUNK=64, BLOCK_N=64, HAS_BIAS=True, SOFTPLUS=True, HAS_LIMIT=True, HAS_INIT=True)
    common |= dict(HAS_DIRS=True, PRECISION="ieee" if io == "fp32" else None, UPCAST=False)
    forward = dict(common, BLOCK_P=64, HAS_D=True, HAS_Z=True, HAS_FINAL=True)
    backward = dict(common, BLOCK_P=32, HAS_DFINAL=True)
    for kernel, constexprs in ((_ssd_fwd_kernel, forward), (_ssd_bwd_kernel, backward)):
        compiled = compile_for_arch(kernel, constexprs, io, arch=90, num_warps=8)
        assert compiled.asm["cubin"], kernel.__name__


# --- GPU --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("length", [49, 196, 197, 784, 3136, 1001])
@pytest.mark.parametrize("chunk", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_gpu(length, chunk, dtype):
    check_forward(length, chunk, dtype, shape=(2, 8, 64, 1, 64))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("length", [196, 3136])
@pytest.mark.parametrize("directions", [("forward", "backward"), GRID_4])
def test_directions_gpu(length, directions):
    check_directions(length, directions, 64, torch.bfloat16, shape=(2, 8, 64, 1, 64))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_gpu(dtype):
    check_gradients(784, 64, shape=(2, 4, 64, 1, 64), dtype=dtype)
    check_gradients(3136, 256, GRID_4, shape=(2, 4, 64, 1, 64), dtype=dtype)
