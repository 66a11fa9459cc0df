"""The fused CPU selective-scan backend against the float64 reference loop, and its build fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from vmamba.kernels import BACKEND_ENV_VAR, multi_direction_selective_scan, selective_scan
from vmamba.kernels import cpu as cpu_backend
from vmamba.kernels.backends import resolve_backend
from vmamba.kernels.token_orders import canonical_directions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def chunk() -> int:
    """The kernel's chunk length; skips the module's numeric tests when the library cannot be built here."""
    info = cpu_backend.library_info()
    if not info["available"]:
        pytest.skip(f"the cpu backend cannot be built on this machine: {info['error']}")
    return int(info["chunk_size"])


def make_inputs(batch, dim, length, dstate, groups, dtype=torch.float64, z=True, bias=True, seed=0):
    """Scan inputs; ``groups=None`` gives 3-D B and C. Values keep decays in (0, 1) like trained models."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    bc_shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    return {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length, scale=0.5, shift=-1.0),
        "A": (-torch.rand(dim, dstate, generator=g, dtype=torch.float64) * 2 - 0.1).to(dtype),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim),
        "z": rnd(batch, dim, length) if z else None,
        "delta_bias": rnd(dim, scale=0.3) if bias else None,
    }


def run_with_grads(inputs, softplus, backend, upstream=None, dtype=None):
    """Output, last state and the gradient of every tensor input, with gradients flowing into both outputs.

    ``dtype`` casts the inputs first (the leaves then live in that dtype); ``upstream`` fixes the output
    gradients so that two runs can be compared.
    """
    leaves = {
        k: (v.to(dtype) if dtype else v).clone().requires_grad_() for k, v in inputs.items() if v is not None
    }
    args = {k: leaves.get(k) for k in inputs}
    out, last = selective_scan(**args, delta_softplus=softplus, return_last_state=True, backend=backend)
    if upstream is None:
        g = torch.Generator().manual_seed(1)
        upstream = (
            torch.randn(out.shape, generator=g, dtype=torch.float64),
            torch.randn(last.shape, generator=g, dtype=torch.float64),
        )
    loss = (out * upstream[0].to(out.dtype)).sum() + (last * upstream[1].to(last.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, last, dict(zip(leaves, grads)), upstream


def assert_scan_close(got, want, rtol, atol):
    """Compare (out, last, grads) of two runs; atol scales with each tensor's magnitude (sums over L, batch)."""
    pairs = [("out", got[0], want[0]), ("last_state", got[1], want[1])]
    pairs += [(f"d{k}", got[2][k], want[2][k]) for k in want[2]]
    for name, a, b in pairs:
        assert a.shape == b.shape, name
        b = b.to(torch.float64)
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(
            a.to(torch.float64), b, rtol=rtol, atol=atol * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


# (batch, dim, L, N, groups, z, delta_bias, softplus); groups None = 3-D B/C. L covers 1, odd, a multiple of
# the chunk (64) plus or minus one, and several chunks; N 1 and 16 have specialised kernels, 5 is generic.
CASES = [
    (2, 4, 1, 16, 1, True, True, True),
    (1, 3, 1, 1, None, False, False, False),
    (2, 4, 37, 16, None, True, True, True),
    (2, 8, 63, 1, 4, True, False, True),
    (1, 6, 65, 5, 3, False, True, False),
    (2, 4, 129, 16, 2, True, True, True),
    (1, 8, 200, 1, 2, False, False, True),
    (2, 4, 150, 16, 4, True, False, False),
    (1, 80, 70, 16, 2, True, True, True),  # 40 channels a group: full SIMD blocks and a partial one
    (2, 42, 66, 1, 2, True, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-L{}-N{}-G{}-z{:d}-bias{:d}-sp{:d}".format(*c))
def test_float64_matches_reference(chunk, case):
    batch, dim, length, dstate, groups, z, bias, softplus = case
    inputs = make_inputs(batch, dim, length, dstate, groups, z=z, bias=bias)
    want = run_with_grads(inputs, softplus, "reference")
    got = run_with_grads(inputs, softplus, "cpu", upstream=want[3])
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert_scan_close(got, want, rtol=1e-9, atol=1e-10)


# N = 16 in float32 runs the channel-vectorised backward (SIMD blocks of channels, per-lane dB/dC sums): every
# case with and without z, bias and softplus, one channel to several blocks, partial blocks, L = 1 to 3 chunks.
FLOAT32_STATE16 = [
    (2, 4, 1, 16, 1, True, True, True),
    (2, 4, 37, 16, None, False, False, False),
    (1, 34, 129, 16, 1, True, False, True),
    (2, 80, 150, 16, 2, False, True, True),
    (1, 48, 64, 16, 3, True, True, False),
]


@pytest.mark.parametrize(
    "case", FLOAT32_STATE16, ids=lambda c: "b{}-d{}-L{}-N{}-G{}-z{:d}-bias{:d}-sp{:d}".format(*c)
)
def test_float32_state16_backward_matches_reference(chunk, case):
    batch, dim, length, dstate, groups, z, bias, softplus = case
    inputs = make_inputs(batch, dim, length, dstate, groups, z=z, bias=bias, seed=length)
    if not softplus:  # positive steps, so that the float32 states stay finite
        inputs["delta"] = inputs["delta"].abs()
    want = run_with_grads(inputs, softplus, "reference")
    got = run_with_grads(
        {k: None if v is None else v.float() for k, v in inputs.items()}, softplus, "cpu", upstream=want[3]
    )
    assert all(g.dtype == torch.float32 for g in got[2].values())
    assert_scan_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dstate,groups", [(16, 2), (1, None)])
def test_low_precision_matches_float64_reference(chunk, dtype, dstate, groups):
    # mamba_ssm's selective-scan test tolerances (fp32 6e-4/2e-3, fp16 3e-3/5e-3, bf16 3e-2/5e-2).
    rtol, atol = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}[
        dtype
    ]
    inputs = {
        k: v.to(dtype) if v is not None else None
        for k, v in make_inputs(2, 4, 2 * chunk + 3, dstate, groups).items()
    }
    want = run_with_grads(inputs, True, "reference", dtype=torch.float64)
    got = run_with_grads(inputs, True, "cpu", upstream=want[3])
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert all(g.dtype == dtype for g in got[2].values())
    assert_scan_close(got, want, rtol=rtol, atol=atol)


def test_gradcheck_float64(chunk):
    inputs = make_inputs(1, 4, 7, 3, 2)
    names = list(inputs)

    def fn(*tensors):
        out, last = selective_scan(
            **dict(zip(names, tensors)), delta_softplus=True, return_last_state=True, backend="cpu"
        )
        return out, last

    leaves = [t.clone().requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_state16_three_dim(chunk):
    inputs = make_inputs(2, 2, 5, 16, None, z=False, bias=False)
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors):
        return selective_scan(**dict(zip(names, tensors)), delta_softplus=True, backend="cpu")

    leaves = [inputs[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_thread_count_does_not_change_results(chunk):
    # batch 1 and one group: the work is split into as many channel slices as the thread count asks for
    # (forward: runs of SIMD blocks; backward: per-slice dB/dC buffers); the results must agree.
    inputs = make_inputs(1, 80, 100, 16, None, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(inputs, True, "cpu")
        torch.set_num_threads(2)
        two = run_with_grads(inputs, True, "cpu", upstream=one[3])
    finally:
        torch.set_num_threads(previous)
    assert_scan_close(two, one, rtol=1e-5, atol=1e-5)


def token_major_views(inputs: dict, dt_rank: int = 3) -> dict:
    """The inputs as a Vim mixer produces them, without copies: u, delta and z as ``.transpose(1, 2)`` of
    (batch, L, dim) tensors, B and C as slices of one token-major (batch, L, G, dt_rank + 2 N) projection,
    A as the transpose of an (N, dim) tensor."""
    batch, groups, dstate, length = inputs["B"].shape
    views = dict(inputs)
    for name in ("u", "delta", "z"):
        views[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    proj = torch.randn(batch, length, groups, dt_rank + 2 * dstate, dtype=inputs["u"].dtype)
    proj[..., dt_rank : dt_rank + dstate] = inputs["B"].permute(0, 3, 1, 2)
    proj[..., dt_rank + dstate :] = inputs["C"].permute(0, 3, 1, 2)
    views["B"] = proj[..., dt_rank : dt_rank + dstate].permute(0, 2, 3, 1)
    views["C"] = proj[..., dt_rank + dstate :].permute(0, 2, 3, 1)
    views["A"] = inputs["A"].t().contiguous().t()
    for name in ("u", "delta", "z", "B", "C"):
        assert not views[name].is_contiguous(), name
    for name in views:
        if views[name] is not None:
            torch.testing.assert_close(views[name], inputs[name], rtol=0, atol=0)
    return views


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dstate,groups", [(16, 2), (1, 4), (5, 1)])
def test_token_major_views_match_contiguous(chunk, dtype, dstate, groups):
    # Strided views are read in place by the forward (and copied for the backward): the same numbers.
    inputs = make_inputs(2, 8 * groups + 40, chunk + 9, dstate, groups, dtype=dtype)
    want = run_with_grads(inputs, True, "cpu")
    got = run_with_grads(token_major_views(inputs), True, "cpu", upstream=want[3])
    assert_scan_close(got, want, rtol=0, atol=0)
    if dtype == torch.float64:
        assert_scan_close(got, run_with_grads(inputs, True, "reference", upstream=want[3]), 1e-9, 1e-10)


def test_expanded_and_sliced_inputs(chunk):
    # Stride-0 (expanded) B and C, and u/delta/z that are every other channel of wider tensors.
    inputs = make_inputs(2, 24, 40, 16, 2)
    strided = dict(inputs)
    strided["B"] = inputs["B"][:1].expand(2, -1, -1, -1)
    strided["C"] = inputs["C"][:, :1].expand(-1, 2, -1, -1)
    for name in ("u", "delta", "z"):
        strided[name] = torch.stack([inputs[name], -inputs[name]], dim=2).flatten(1, 2)[:, ::2]
    dense = {k: v.contiguous() if v is not None else None for k, v in strided.items()}
    torch.testing.assert_close(
        selective_scan(**strided, delta_softplus=True, backend="cpu"),
        selective_scan(**dense, delta_softplus=True, backend="reference"),
        rtol=1e-9,
        atol=1e-10,
    )


def test_large_and_tiny_step_sizes(chunk):
    # dt from ~0 (softplus of very negative delta) up to 60 (decays underflow to 0): float32 vs float64.
    inputs = make_inputs(1, 24, 90, 16, 2)
    inputs["delta"] = torch.linspace(-60.0, 60.0, 24 * 90, dtype=torch.float64).reshape(1, 24, 90)
    want = run_with_grads(inputs, True, "reference")
    got = run_with_grads(inputs, True, "cpu", upstream=want[3], dtype=torch.float32)
    assert_scan_close(got, want, rtol=6e-4, atol=2e-3)
    assert all(torch.isfinite(g).all() for g in got[2].values())


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in float32 units in the last place at ``want`` (a float64 tensor of normal numbers)."""
    w32 = want.float().abs()
    spacing = torch.nextafter(w32, torch.tensor(float("inf"))).double() - w32.double()
    return (got.double() - want).abs() / spacing


def test_vector_exp_within_one_ulp(chunk):
    x = torch.cat(
        [torch.linspace(-87.0, 88.0, 200_003), torch.randn(10_000), torch.tensor([0.0, -0.0, 1e-30])]
    )
    got = cpu_backend.kernel_math("exp", x)
    assert ulps(got, torch.exp(x.double())).max() <= 1.0
    assert got[-3:].tolist() == [1.0, 1.0, 1.0]


def test_vector_exp_edge_values(chunk):
    edges = torch.tensor([-float("inf"), -1e30, -1e4, -104.0, -150.0, 89.0, 1e4, float("inf"), float("nan")])
    got = cpu_backend.kernel_math("exp", edges)
    assert got[:5].tolist() == [0.0] * 5
    assert got[5:8].tolist() == [float("inf")] * 3
    assert torch.isnan(got[8])
    # Below FLT_MIN the result is the subnormal exp or 0 (flushed), never off by more than FLT_MIN.
    tiny = torch.linspace(-103.9, -87.4, 1001)
    err = (cpu_backend.kernel_math("exp", tiny).double() - torch.exp(tiny.double())).abs()
    assert err.max() <= torch.finfo(torch.float32).smallest_normal


def test_vector_softplus_and_sigmoid(chunk):
    x = torch.cat([torch.linspace(-100.0, 100.0, 100_001), torch.tensor([0.0, 1e4, -1e4, 1e-7, -1e-7])])
    x64 = x.double()
    want = torch.nn.functional.softplus(x64, threshold=40.0)  # exact in float64 above 40
    torch.testing.assert_close(cpu_backend.kernel_math("softplus", x).double(), want, rtol=4e-7, atol=1e-38)
    want = torch.sigmoid(x64)
    torch.testing.assert_close(cpu_backend.kernel_math("sigmoid", x).double(), want, rtol=4e-7, atol=1e-38)
    with pytest.raises(ValueError, match="must be one of"):
        cpu_backend.kernel_math("log", x)


def test_auto_picks_cpu_backend(chunk, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("auto", CPU).name == "cpu"
    assert not cpu_backend._is_available(torch.device("meta"))


def test_cached_library_is_reused(chunk, monkeypatch):
    def no_compile(*args):
        raise AssertionError("the cached library should have been loaded without compiling")

    monkeypatch.setattr(cpu_backend._Library, "_compile", no_compile)
    fresh = cpu_backend._Library()
    assert fresh.get() is not None and fresh.path == cpu_backend._LIBRARY.path


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """An unbuilt library state with an empty cache, so a test can change how the build goes."""
    monkeypatch.setattr(cpu_backend, "_LIBRARY", cpu_backend._Library())
    monkeypatch.setenv(cpu_backend.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(cpu_backend.NO_BUILD_ENV_VAR, raising=False)
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


@pytest.mark.parametrize(
    "compiler,message", [("vmamba-no-such-compiler", "no C\\+\\+ compiler"), ("false", "failed")]
)
def test_falls_back_to_torch_with_one_warning(fresh_library, monkeypatch, compiler, message):
    monkeypatch.setenv("CXX", compiler)  # "false" exists on PATH and fails every build
    inputs = make_inputs(1, 4, 9, 16, None, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=message):
        assert resolve_backend("auto", CPU).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not again
        out = selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(out, selective_scan(**inputs, delta_softplus=True, backend="torch"))
    with pytest.raises(ValueError, match="'cpu' cannot run"):
        selective_scan(**inputs, backend="cpu")


def test_disabled_by_environment_without_warning(fresh_library, monkeypatch):
    monkeypatch.setenv(cpu_backend.NO_BUILD_ENV_VAR, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", CPU).name == "torch"
    assert cpu_backend.NO_BUILD_ENV_VAR in cpu_backend._unavailable_reason(CPU)


@pytest.mark.slow
@pytest.mark.parametrize("isa", [(), ("-mavx2", "-mfma")], ids=["baseline-isa", "avx2"])
def test_portable_builds_match_reference(chunk, monkeypatch, tmp_path, isa):
    # The kernel built without -march=native (SSE2 vectors, or AVX2): the portable exp and the narrower
    # SIMD blocks give the same results as the reference.
    flags = ("-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fopenmp", *isa)
    monkeypatch.setattr(cpu_backend, "FLAG_SETS", (flags,))
    monkeypatch.setattr(cpu_backend, "_LIBRARY", cpu_backend._Library())
    monkeypatch.setenv(cpu_backend.CACHE_ENV_VAR, str(tmp_path))
    info = cpu_backend.library_info()
    assert info["available"] and info["flags"] == " ".join(flags), info
    x = torch.linspace(-87.0, 88.0, 100_001)
    # Without FMA instructions (baseline x86-64) each multiply-add rounds twice: 1.1 ulp measured.
    assert ulps(cpu_backend.kernel_math("exp", x), torch.exp(x.double())).max() <= (1.0 if isa else 1.5)
    assert cpu_backend.kernel_math("exp", torch.tensor([-1e4, 1e4])).tolist() == [0.0, float("inf")]
    inputs = make_inputs(2, 42, 70, 16, 2)
    want = run_with_grads(inputs, True, "reference")
    assert_scan_close(
        run_with_grads(token_major_views(inputs), True, "cpu", upstream=want[3]), want, 1e-9, 1e-10
    )
    # float32 runs the channel-vectorised backward, in blocks of the build's vector width.
    for dstate in (16, 1):
        inputs = make_inputs(2, 42, 70, dstate, 2)
        want = run_with_grads(inputs, True, "reference")
        got = run_with_grads(
            {k: None if v is None else v.float() for k, v in inputs.items()}, True, "cpu", upstream=want[3]
        )
        assert_scan_close(got, want, 2e-5, 2e-5)
    # Vim's mixer core: x_proj's register blocking follows the vector width.
    x, z, params = vim_mixer_inputs(2, 37, 24, 16, 3)
    got = cpu_backend.cpu_vim_mixer(x, z, params)
    torch.testing.assert_close(got.double(), vim_mixer_reference(x, z, params), rtol=2e-5, atol=2e-5)


# --- The fused multi-direction forward (the backend's ``multi_direction`` hook) --------------------------


def multi_direction_inputs(batch, channels, length, dstate, groups, k=2, shared=True, token_major=False):
    """Inputs of ``multi_direction_selective_scan`` for K directions of ``channels`` channels, in float64.

    ``shared``: u and z (batch, C, L) shared by the directions, else (batch, K*C, L). ``token_major``: u,
    delta and z as ``.transpose(1, 2)`` views of (batch, L, channels) tensors and B, C as permuted views of
    one (batch, L, K*G, N) tensor each, as Vim's mixer passes them.
    """
    inputs = make_inputs(batch, k * channels, length, dstate, k * groups, seed=3)
    g = torch.Generator().manual_seed(4)
    u_channels = channels if shared else k * channels
    inputs["u"] = torch.randn(batch, u_channels, length, generator=g, dtype=torch.float64)
    inputs["z"] = torch.randn(batch, u_channels, length, generator=g, dtype=torch.float64)
    if token_major:
        for name in ("u", "delta", "z"):
            inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
        for name in ("B", "C"):
            inputs[name] = inputs[name].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    return inputs


def fused(inputs, directions, merge, **kwargs):
    """The hook called directly (canonical names), so a test fails if it silently declines the call."""
    names = canonical_directions(directions, kwargs.get("grid_size"))
    out = cpu_backend.cpu_multi_direction_scan(
        **inputs, delta_softplus=True, directions=names, merge=merge, **kwargs
    )
    assert out is not NotImplemented
    return out


def generic(inputs, directions, merge, backend="reference"):
    return multi_direction_selective_scan(
        **inputs, delta_softplus=True, directions=directions, merge=merge, backend=backend
    )


# (batch, C, L, N, G per direction, shared u/z, token-major): L 1, odd, past one chunk; N 16 and generic.
MULTI_CASES = [
    (1, 4, 1, 16, 1, True, False),
    (2, 20, 37, 16, 1, True, True),
    (2, 6, 67, 5, 2, False, False),
    (1, 40, 131, 16, 2, False, True),
    (2, 3, 9, 1, 3, True, True),
]


@pytest.mark.parametrize("merge", ["sum", "mean", "none"])
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: "b{}-C{}-L{}-N{}-G{}-sh{:d}-tm{:d}".format(*c))
def test_multi_direction_hook_matches_reference(chunk, case, merge):
    batch, channels, length, dstate, groups, shared, token_major = case
    inputs = multi_direction_inputs(batch, channels, length, dstate, groups, 2, shared, token_major)
    want = generic(inputs, ("forward", "backward"), merge)
    with torch.no_grad():
        got = fused(inputs, ("forward", "backward"), merge)
        public = generic(inputs, ("forward", "backward"), merge, backend="cpu")
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(public, got, rtol=0, atol=0)


@pytest.mark.parametrize("directions", [("backward",), ("backward", "forward", "backward")])
def test_multi_direction_hook_other_direction_lists(chunk, directions):
    inputs = multi_direction_inputs(2, 5, 70, 16, 1, k=len(directions), token_major=True)
    for merge in ("mean", "none"):
        with torch.no_grad():
            got = fused(inputs, directions, merge)
        torch.testing.assert_close(got, generic(inputs, directions, merge), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_direction_hook_low_precision(chunk, dtype):
    inputs = multi_direction_inputs(2, 24, 2 * chunk + 3, 16, 1, token_major=True)
    want = generic(inputs, ("forward", "backward"), "mean")
    low = {k: v.to(dtype) for k, v in inputs.items()}
    with torch.inference_mode():
        got = fused(low, ("forward", "backward"), "mean")
    rtol, atol = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def test_multi_direction_hook_declines_and_generic_path_runs(chunk):
    # Gradients needed, a grid that does not fit: the hook declines and the generic path gives the same results
    # and gradients as the reference backend.
    inputs = multi_direction_inputs(2, 4, 12, 3, 1, shared=False)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    names = ("row", "row_reversed")
    out = cpu_backend.cpu_multi_direction_scan(**leaves, directions=names, merge="sum")
    assert out is NotImplemented
    grid = {"directions": ("row", "col"), "grid_size": (3, 5), "merge": "sum"}  # 15 != L = 12
    assert cpu_backend.cpu_multi_direction_scan(**inputs, **grid) is NotImplemented
    for directions, grid_size in ((("forward", "backward"), None), (("row", "col_reversed"), (3, 4))):
        grads = []
        for backend in ("cpu", "reference"):
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            out = multi_direction_selective_scan(
                **leaves, delta_softplus=True, directions=directions, grid_size=grid_size, backend=backend
            )
            weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            grads.append((out, *torch.autograd.grad((out * weight).sum(), list(leaves.values()))))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_multi_direction_bad_input_still_raises(chunk):
    inputs = multi_direction_inputs(1, 4, 6, 2, 1)
    inputs["u"] = inputs["u"][:, :3]
    with torch.no_grad(), pytest.raises(ValueError, match="u must have 4 channels"):
        generic(inputs, ("forward", "backward"), "sum", backend="cpu")


def low_rank_inputs(batch, channels, length, dstate, rank, k=2, token_major=True):
    """Vim-style inputs whose steps come from a low-rank input: delta (batch, K*R, L) and the weight (K*C, R)."""
    inputs = multi_direction_inputs(batch, channels, length, dstate, 1, k, True, token_major)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, length, k * rank, generator=g, dtype=torch.float64)
    inputs["delta"] = x.transpose(1, 2) if token_major else x.transpose(1, 2).contiguous()
    weight = torch.randn(k * channels, rank, generator=g, dtype=torch.float64) / rank**0.5
    return inputs, weight


@pytest.mark.parametrize("dstate", [16, 5])
@pytest.mark.parametrize("token_major", [True, False])
@pytest.mark.parametrize("rank", [1, 12])
def test_multi_direction_hook_low_rank_steps(chunk, dstate, token_major, rank):
    """dt_proj fused into the kernel: the same as projecting the steps first and scanning (reference)."""
    inputs, weight = low_rank_inputs(2, 20, chunk + 7, dstate, rank, token_major=token_major)
    k, channels = 2, 20
    steps = torch.cat(
        [
            weight[i * channels : (i + 1) * channels] @ inputs["delta"][:, i * rank : (i + 1) * rank]
            for i in range(k)
        ],
        dim=1,
    )
    want = generic({**inputs, "delta": steps}, ("forward", "backward"), "mean")
    with torch.no_grad():
        got = fused(inputs, ("forward", "backward"), "mean", delta_proj_weight=weight)
        public = multi_direction_selective_scan(
            **inputs,
            delta_softplus=True,
            directions=("forward", "backward"),
            merge="mean",
            backend="cpu",
            delta_proj_weight=weight,
        )
        low = fused(
            {n: v.float() for n, v in inputs.items()},
            ("forward", "backward"),
            "mean",
            delta_proj_weight=weight.float(),
        )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(public, got, rtol=0, atol=0)
    torch.testing.assert_close(low.double(), want, rtol=6e-4, atol=2e-3)


# VMamba's four directions over (H, W) grids: odd sides, a grid longer than a chunk, N = 1 and 16.
GRID_CASES = [((3, 5), 1, True), ((7, 11), 16, False), ((9, 10), 1, False), ((1, 6), 4, True)]


@pytest.mark.parametrize("merge", ["sum", "none"])
@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: "{}x{}-N{}-tm{:d}".format(*c[0], c[1], c[2]))
def test_multi_direction_hook_grid_directions(chunk, case, merge):
    """Column walks (and their reverses) read in place: the same as the reference's reordered scans."""
    (height, width), dstate, token_major = case
    directions = ("row", "col", "row_reversed", "col_reversed")
    inputs = multi_direction_inputs(2, 20, height * width, dstate, 1, k=4, token_major=token_major)
    inputs.pop("z")
    grid = {"grid_size": (height, width)}
    want = multi_direction_selective_scan(
        **inputs, delta_softplus=True, directions=directions, merge=merge, backend="reference", **grid
    )
    with torch.no_grad():
        got = fused(inputs, directions, merge, **grid)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# --- The fused multi-direction training path (float32, N = 1 and 16) -------------------------------------

# (batch, C, L or (H, W), N, G per direction, shared u/z, token-major, directions): both Vim directions, one
# reversed direction alone, a repeated direction (a shared u and z accumulate over three directions), and
# VMamba's four over odd grids (column walks, forward and reversed).
TRAIN_CASES = [
    (2, 20, 37, 16, 1, True, True, ("forward", "backward")),
    (1, 40, 131, 16, 2, False, True, ("forward", "backward")),
    (2, 17, 1, 1, 1, False, False, ("row_reversed",)),
    (1, 24, 70, 16, 1, True, False, ("row", "row_reversed", "row")),
    (2, 20, (7, 11), 1, 1, True, True, ("row", "col", "row_reversed", "col_reversed")),
    (1, 18, (9, 10), 16, 1, False, False, ("col_reversed", "col")),
]


@pytest.mark.parametrize("merge", ["sum", "mean", "none"])
@pytest.mark.parametrize(
    "case",
    TRAIN_CASES,
    ids=lambda c: "b{}-C{}-L{}-N{}-G{}-sh{:d}-tm{:d}-".format(*c[:7]) + "-".join(c[7]),
)
def test_multi_direction_training_matches_reference(chunk, monkeypatch, case, merge):
    """With gradients, the hook's autograd function (in-place views forward, channel-vectorised backward per
    direction) gives the float64 reference's output and every gradient, with no generic path involved."""
    batch, channels, size, dstate, groups, shared, token_major, directions = case
    grid = size if isinstance(size, tuple) else None
    length = grid[0] * grid[1] if grid else size
    k = len(directions)
    inputs = multi_direction_inputs(batch, channels, length, dstate, groups, k, shared, token_major)
    calls = []
    real = cpu_backend._backward_in_place
    monkeypatch.setattr(cpu_backend, "_backward_in_place", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run(tensors, backend):
        leaves = {n: t.detach().requires_grad_() for n, t in tensors.items() if t is not None}
        out = multi_direction_selective_scan(
            **leaves, delta_softplus=True, directions=directions, grid_size=grid, merge=merge, backend=backend
        )
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), list(leaves.values()))
        return out, dict(zip(leaves, grads))

    want_out, want = run(inputs, "reference")
    got_out, got = run({n: None if t is None else t.float() for n, t in inputs.items()}, "cpu")
    assert len(calls) == k
    torch.testing.assert_close(got_out.double(), want_out, rtol=2e-5, atol=2e-5)
    for name in want:
        scale = max(1.0, want[name].abs().max().item())
        torch.testing.assert_close(got[name].double(), want[name], rtol=2e-5, atol=2e-5 * scale, msg=name)


@pytest.mark.parametrize(
    "dtype, grid", [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, (5, 7))]
)
def test_multi_direction_training_half_precision_activations(chunk, monkeypatch, dtype, grid):
    """Half-precision activations with float32 parameters (CPU autocast's mix) take the fused training
    path, computed in float32: the output and every gradient are exactly those of the call on the same
    values in float32, rounded to the activations' dtype (the parameters' gradients stay float32). Vim's two
    directions, and VMamba's four over a grid (N = 1, no gate)."""
    if grid is None:
        inputs, weight = low_rank_inputs(2, 20, chunk + 7, 16, 12)
        directions, merge = ("forward", "backward"), "mean"
    else:
        directions, merge = ("row", "col", "row_reversed", "col_reversed"), "sum"
        inputs, weight = low_rank_inputs(2, 20, grid[0] * grid[1], 1, 6, k=4)
        inputs.pop("z")
    inputs = {**inputs, "delta_proj_weight": weight}
    activations = ("u", "delta", "B", "C", "z")
    calls = []
    real = cpu_backend._scan_in_place
    monkeypatch.setattr(cpu_backend, "_scan_in_place", lambda *a: calls.append(1) or real(*a))
    half = {n: t.to(dtype) if n in activations else t.float() for n, t in inputs.items() if t is not None}
    results = []
    for tensors in (half, {n: t.float() for n, t in half.items()}):
        leaves = {n: t.detach().requires_grad_() for n, t in tensors.items()}
        out = multi_direction_selective_scan(
            **leaves, delta_softplus=True, directions=directions, grid_size=grid, merge=merge, backend="cpu"
        )
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        results.append((out, dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), upstream)))))
    assert len(calls) == 2  # the fused function's forward both times, not the generic path
    (out, grads), (out32, grads32) = results
    assert out.dtype == dtype and torch.equal(out, out32.to(dtype))
    for name, grad in grads.items():
        want = grads32[name].to(dtype) if name in activations else grads32[name]
        assert grad.dtype == want.dtype and torch.equal(grad, want), name


def test_multi_direction_training_low_rank_steps(chunk, monkeypatch):
    """Low-rank steps with gradients: projected inside the forward's kernel (the fused function saves the
    low-rank input) and once more, transiently, by its backward; the weight and the low-rank input get the
    reference's gradients."""
    inputs, weight = low_rank_inputs(2, 20, chunk + 7, 16, 12)
    leaves64 = {n: t.detach().requires_grad_() for n, t in {**inputs, "delta_proj_weight": weight}.items()}
    leaves32 = {n: t.detach().float().requires_grad_() for n, t in leaves64.items()}
    projections = []
    real = cpu_backend.project_steps
    monkeypatch.setattr(cpu_backend, "project_steps", lambda *args: projections.append(1) or real(*args))
    outs = []
    for leaves, backend in ((leaves64, "reference"), (leaves32, "cpu")):
        out = multi_direction_selective_scan(
            **leaves, delta_softplus=True, directions=("forward", "backward"), merge="mean", backend=backend
        )
        assert not projections  # the CPU forward projected the steps in its kernel
        out.sum().backward()
        outs.append(out)
    assert len(projections) == 1  # the CPU backward's transient steps
    torch.testing.assert_close(outs[1].double(), outs[0], rtol=2e-5, atol=2e-5)
    for name, t in leaves64.items():
        scale = max(1.0, t.grad.abs().max().item())
        torch.testing.assert_close(
            leaves32[name].grad.double(), t.grad, rtol=2e-5, atol=2e-5 * scale, msg=name
        )


# --- Vim's mixer core in one call (cpu_vim_mixer) ----------------------------------------------------------


def vim_mixer_inputs(batch, length, inner, dstate, rank, k=4, conv_bias=True, seed=0):
    """x and z as the halves of one token-major projection output, and both directions' parameters in the
    layout of ``BiMambaMixer`` (float32)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    xz = rand(batch, length, 2 * inner)
    params = []
    for _ in range(2):
        params.append(
            (
                rand(inner, 1, k, scale=0.5),
                rand(inner, scale=0.1) if conv_bias else None,
                rand(rank + 2 * dstate, inner, scale=inner**-0.5),
                torch.log(torch.arange(1, dstate + 1, dtype=torch.float32)).repeat(inner, 1)
                + rand(inner, dstate, scale=0.1),
                rand(inner),
                rand(inner, scale=0.5) - 3.0,
                rand(inner, rank, scale=rank**-0.5),
            )
        )
    return xz[..., :inner], xz[..., inner:], params


def vim_mixer_reference(x, z, params):
    """The mixer core in float64 from the separately tested references: the convolutions, x_proj, each
    direction's scan (the backward one over the reversed sequence), averaged and gated by silu(z)."""
    from vmamba.kernels import bidirectional_causal_conv1d_reference, selective_scan_reference

    x, z = x.double(), z.double()
    (cw_f, cb_f, *_), (cw_b, cb_b, *_) = params
    u = bidirectional_causal_conv1d_reference(x, cw_f, cb_f, cw_b, cb_b, silu=True)
    inner = x.shape[-1]
    ys = []
    for d, (_, _, proj, a_log, D, dt_b, dt_w) in enumerate(params):
        ud = u[..., d * inner : (d + 1) * inner]
        if d == 1:
            ud = ud.flip(1)
        xdbl = ud @ proj.double().t()
        rank, dstate = dt_w.shape[1], a_log.shape[1]
        delta = xdbl[..., :rank] @ dt_w.double().t()
        y = selective_scan_reference(
            ud.transpose(1, 2),
            delta.transpose(1, 2),
            -torch.exp(a_log.double()),
            xdbl[..., rank : rank + dstate].transpose(1, 2),
            xdbl[..., rank + dstate :].transpose(1, 2),
            D.double(),
            None,
            dt_b.double(),
            delta_softplus=True,
        ).transpose(1, 2)
        ys.append(y.flip(1) if d == 1 else y)
    return (ys[0] + ys[1]) / 2 * torch.nn.functional.silu(z)


@pytest.mark.parametrize(
    "batch, length, inner, dstate, rank, conv_bias",
    [(2, 37, 24, 16, 3, True), (1, 1, 16, 16, 12, True), (2, 70, 40, 4, 2, False), (1, 5, 7, 1, 1, True)],
)
def test_vim_mixer_matches_reference(chunk, batch, length, inner, dstate, rank, conv_bias):
    x, z, params = vim_mixer_inputs(batch, length, inner, dstate, rank, conv_bias=conv_bias)
    u = torch.empty(batch, length, 2 * inner)
    got = cpu_backend.cpu_vim_mixer(x, z, params, u)
    want = vim_mixer_reference(x, z, params)
    assert got.shape == (batch, length, inner) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    # u holds the convolutions' output, as the separate op writes it.
    (cw_f, cb_f, *_), (cw_b, cb_b, *_) = params
    conv = cpu_backend.cpu_bidirectional_conv1d(
        x,
        torch.stack([cw_f.reshape(inner, -1), cw_b.reshape(inner, -1)]).transpose(1, 2).contiguous(),
        None if cb_f is None else torch.stack([cb_f, cb_b]),
        True,
    )
    torch.testing.assert_close(u, conv, rtol=0, atol=0)


def test_vim_mixer_threads_and_wide_projections(chunk):
    x, z, params = vim_mixer_inputs(2, 150, 48, 16, 24)
    with_one = cpu_backend.cpu_vim_mixer(x, z, params)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with_two = cpu_backend.cpu_vim_mixer(x, z, params)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(with_one, with_two, rtol=0, atol=0)
    # An x_proj wider than the kernel's register blocking takes (over 12 vectors) is declined.
    lanes = cpu_backend.library_info()["lanes"]["float32"]
    x, z, params = vim_mixer_inputs(1, 4, 8, 16, 12 * lanes)
    assert cpu_backend.cpu_vim_mixer(x, z, params) is None
