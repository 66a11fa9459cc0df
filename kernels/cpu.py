"""Fast CPU backend: a fused C++ selective scan compiled on first use and loaded with ctypes.

Installing the package needs no compiler. The first time the ``"cpu"`` backend is asked whether it can run
(``backend="auto"`` on CPU tensors does that), ``csrc/selective_scan_cpu.cpp`` is compiled with the system
C++ compiler (``$CXX``, else the first of g++, clang++, c++, cc on PATH) into a shared library cached under
``$VMAMBA_CACHE_DIR`` (default ``~/.cache/vmamba``), in a file named by a hash of the source, compiler,
flags and CPU. Later processes load the cached file. The flags are tried from fastest to most portable
(OpenMP and ``-march=native`` first, then without OpenMP, then plain ``-O3``). When no compiler is found or
every build fails, the backend reports itself unavailable, ``"auto"`` falls back to the pure-PyTorch
``"torch"`` backend, and one ``RuntimeWarning`` says why. ``VMAMBA_NO_CPU_BUILD=1`` disables the build.

The library computes in float32 for float16/bfloat16/float32 inputs (converted here) and in float64 for
float64 inputs. Its backward recomputes the states chunk by chunk instead of storing (batch, dim, L, N)
tensors. See ``docs/kernels.md`` for the calling convention shared by all backends.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .backends import ScanBackend, register_backend
from .eager import is_eager_cpu_activations
from .projections import project_steps, project_steps_backward
from .reference import math_dtype
from .token_orders import MERGES
from .torch_scan import torch_scan_backward, torch_scan_forward

__all__ = [
    "CACHE_ENV_VAR",
    "NO_BUILD_ENV_VAR",
    "cpu_bidirectional_conv1d",
    "cpu_bidirectional_conv1d_backward",
    "cpu_library_available",
    "cpu_multi_direction_scan",
    "cpu_scan_backward",
    "cpu_scan_forward",
    "cpu_vim_mixer",
    "kernel_math",
    "library_info",
]

NO_BUILD_ENV_VAR = "VMAMBA_NO_CPU_BUILD"
CACHE_ENV_VAR = "VMAMBA_CACHE_DIR"
SOURCE = Path(__file__).resolve().parent / "csrc" / "selective_scan_cpu.cpp"
COMPILERS = ("g++", "clang++", "c++", "cc")
# Tried in order; the first that compiles is used. No -ffast-math: the kernel's exp/log are written to be
# accurate and vectorisable without it. -ffp-contract=fast fuses multiply-adds; -fno-trapping-math (which
# changes no result, only whether floating-point exception flags are kept exact) lets GCC turn the kernel's
# branch-free selects into SIMD blends.
_FAST = ("-O3", "-ffp-contract=fast", "-fno-trapping-math")
FLAG_SETS = (
    (*_FAST, "-march=native", "-fopenmp"),
    (*_FAST, "-march=native", "-fopenmp-simd"),
    (*_FAST, "-fopenmp-simd"),
    ("-O2",),
)
_COMMON_FLAGS = ("-shared", "-fPIC")
_BUILD_TIMEOUT_S = 300


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "vmamba"


def _find_compiler() -> str | None:
    """The compiler to build with: ``$CXX`` when set (and only it), else the first of COMPILERS on PATH."""
    requested = os.environ.get("CXX", "").strip()
    if requested:
        return shutil.which(requested)
    for name in COMPILERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on, so a cache shared between machines never loads foreign code."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class _Library:
    """Builds (once per process, under a lock) and holds the compiled library, or why there is none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self.lib: ctypes.CDLL | None = None
        self.path: Path | None = None
        self.flags: tuple[str, ...] = ()
        self.error: str | None = None

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, building it on the first call; None (with ``error`` set) if unavailable."""
        if self._tried:
            return self.lib
        with self._lock:
            if not self._tried:
                self._load()
                self._tried = True
        return self.lib

    def _load(self) -> None:
        if os.environ.get(NO_BUILD_ENV_VAR, "").strip() not in ("", "0"):
            self.error = f"disabled by {NO_BUILD_ENV_VAR}={os.environ[NO_BUILD_ENV_VAR]}"
            return
        compiler = _find_compiler()
        if compiler is None:
            wanted = os.environ.get("CXX", "").strip() or " / ".join(COMPILERS)
            self._fail(f"no C++ compiler found on PATH (looked for {wanted})")
            return
        try:
            source = SOURCE.read_bytes()
        except OSError as exc:
            self._fail(f"cannot read the kernel source {SOURCE}: {exc}")
            return
        stem = hashlib.sha256(
            b"\0".join(
                [source, compiler.encode(), _compiler_version(compiler).encode(), _cpu_signature().encode()]
                + [platform.machine().encode(), sys.platform.encode()]
            )
        ).hexdigest()
        suffix = ".dll" if os.name == "nt" else ".so"
        candidates = []
        for flags in FLAG_SETS:
            key = hashlib.sha256((stem + " ".join(flags)).encode()).hexdigest()[:20]
            candidates.append((flags, _cache_dir() / f"selective_scan_cpu_{key}{suffix}"))
        # A cached build from an earlier process wins over compiling again (even with slower flags).
        for flags, path in candidates:
            if path.is_file() and self._open(path, flags):
                return
        errors = []
        for flags, path in candidates:
            message = self._compile(compiler, flags, path)
            if message is None and self._open(path, flags):
                return
            errors.append(f"[{' '.join(flags)}] {message or self.error}")
        self._fail(f"building {SOURCE.name} with {compiler} failed: " + " | ".join(errors))

    def _compile(self, compiler: str, flags: tuple[str, ...], path: Path) -> str | None:
        """Compile into ``path`` (atomically, so concurrent processes never see half a file); error or None."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create the cache directory {path.parent}: {exc} (set {CACHE_ENV_VAR})"
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
        cmd = [compiler, *flags, *_COMMON_FLAGS, str(SOURCE), "-o", str(tmp), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return f"exit status {done.returncode}: " + " / ".join(tail)
        os.replace(tmp, path)
        return None

    def _open(self, path: Path, flags: tuple[str, ...]) -> bool:
        try:
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except (OSError, AttributeError) as exc:
            self.error = f"cannot load {path}: {exc}"
            return False
        self.lib, self.path, self.flags, self.error = lib, path, flags, None
        return True

    def _fail(self, reason: str) -> None:
        self.error = reason
        warnings.warn(
            f"vmamba: the fast 'cpu' selective-scan backend is unavailable ({reason}); CPU scans use the "
            f"slower pure-PyTorch 'torch' backend instead. Install a C++ compiler (g++ or clang) to enable "
            f"it, or set {NO_BUILD_ENV_VAR}=1 to skip the build and this warning.",
            RuntimeWarning,
            stacklevel=4,
        )


def _declare(lib: ctypes.CDLL) -> None:
    """Give the entry points their C signatures (all tensors are passed as raw pointers)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        forward = getattr(lib, f"ss_forward_{suffix}")
        forward.argtypes = [p] * 9 + [i64, i64] + [p] * 4 + [i32, i32, i32, ctypes.c_double, i32]
        forward.restype = i32
        backward = getattr(lib, f"ss_backward_{suffix}")
        backward.argtypes = [p] * 18 + [i64] * 6 + [i32, i32]
        backward.restype = i32
    lib.ss_backward_views_f32.argtypes = [p] * 20 + [i64, i32, i32, i32, ctypes.c_double, i32]
    lib.ss_backward_views_f32.restype = i32
    lib.ss_chunk_size.restype = i32
    lib.ss_lanes.argtypes = [i32]
    lib.ss_lanes.restype = i32
    lib.ss_math_f32.argtypes = [i32, p, p, i64]
    lib.ss_math_f32.restype = None
    lib.ss_has_openmp.restype = i32
    lib.ss_add_rms_norm_f32.argtypes = [p, p, p, ctypes.c_double, p, p, i64, i64, i32]
    lib.ss_add_rms_norm_f32.restype = i32
    lib.ss_bidir_conv_f32.argtypes = [p, i64, i64, p, p, p, i64, i64, i64, i64, i32, i32]
    lib.ss_bidir_conv_f32.restype = i32
    lib.ss_bidir_conv_backward_f32.argtypes = [p, i64, i64, p, p, p, p, p, p, p, i64, i64, i64, i64, i32, i32]
    lib.ss_bidir_conv_backward_f32.restype = i32
    lib.ss_vim_mixer_f32.argtypes = [p, i64, i64, p, i64, i64, p, p, p, p] + [i64] * 6 + [i32]
    lib.ss_vim_mixer_f32.restype = i32


_LIBRARY = _Library()


def library_info() -> dict[str, object]:
    """Where the compiled kernel lives and how it was built (building it if needed), or why it is missing."""
    lib = _LIBRARY.get()
    if lib is None:
        return {"available": False, "error": _LIBRARY.error}
    return {
        "available": True,
        "path": str(_LIBRARY.path),
        "flags": " ".join(_LIBRARY.flags),
        "openmp": bool(lib.ss_has_openmp()),
        "chunk_size": int(lib.ss_chunk_size()),
        "lanes": {"float32": int(lib.ss_lanes(0)), "float64": int(lib.ss_lanes(1))},
    }


_MATH = ("exp", "softplus", "sigmoid")


def kernel_math(name: str, x: Tensor) -> Tensor:
    """The kernel's own float32 ``exp``, ``softplus`` or ``sigmoid`` (the SIMD code the scan runs) on ``x``."""
    if name not in _MATH:
        raise ValueError(f"name must be one of {_MATH}, got {name!r}")
    xf = x.detach().to(torch.float32).contiguous()
    out = torch.empty_like(xf)
    lib = _LIBRARY.get()
    if lib is None:
        raise RuntimeError(f"the 'cpu' selective-scan backend is unavailable: {_LIBRARY.error}")
    lib.ss_math_f32(_MATH.index(name), xf.data_ptr(), out.data_ptr(), xf.numel())
    return out


def cpu_bidirectional_conv1d(
    x: Tensor, taps: Tensor, bias: Tensor | None, silu: bool, out: Tensor | None = None
) -> Tensor:
    """Vim's two causal depthwise convolutions (+ SiLU) in the C++ library, computed in float32 (no autograd
    here: see ``vmamba.kernels.conv1d``).

    ``x`` (batch, L, C) with unit channel stride, float32 or (under autocast) bfloat16/float16, which is
    converted to float32 first; ``taps`` (2, k, C) and ``bias`` (2, C) as
    :func:`vmamba.kernels.conv1d.bidirectional_causal_conv1d` builds them. Returns the (batch, L, 2C)
    token-major result in x's dtype, written into ``out`` (contiguous, checked by the caller) when given.
    The library must be available (:func:`cpu_library_available`).
    """
    if x.dtype != torch.float32:
        y = cpu_bidirectional_conv1d(x.float(), taps, bias, silu)
        return y.to(x.dtype) if out is None else out.copy_(y)
    lib = _LIBRARY.get()
    batch, length, channels = x.shape
    if out is None:
        out = torch.empty((batch, length, 2 * channels), dtype=torch.float32)
    if length == 0 or batch == 0:
        return out
    taps = taps.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    with _named("vmamba::cpu_bidirectional_conv1d"):
        rc = lib.ss_bidir_conv_f32(
            x.data_ptr(),
            x.stride(0),
            x.stride(1),
            taps.data_ptr(),
            _ptr(bias),
            out.data_ptr(),
            batch,
            length,
            channels,
            taps.shape[1],
            int(silu),
            torch.get_num_threads(),
        )
    _check(rc, "bidirectional conv1d")
    return out


def cpu_bidirectional_conv1d_backward(
    dout: Tensor, x: Tensor, taps: Tensor, bias: Tensor | None, silu: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`cpu_bidirectional_conv1d` (x, taps and bias as it took them) for ``dout``
    (batch, L, 2C): ``(dx (batch, L, C) in x's dtype, dtaps (2, k, C), dbias (2, C) or None)``, computed in
    float32. The pre-activations are recomputed; the library must be available (the forward ran)."""
    if x.dtype != torch.float32:
        dx, dtaps, dbias = cpu_bidirectional_conv1d_backward(dout, x.float(), taps, bias, silu)
        return dx.to(x.dtype), dtaps, dbias
    lib = _LIBRARY.get()
    batch, length, channels = x.shape
    k = taps.shape[1]
    dx = torch.zeros((batch, length, channels), dtype=torch.float32)
    if dx.numel() == 0:
        return dx, torch.zeros_like(taps), None if bias is None else torch.zeros_like(bias)
    threads = torch.get_num_threads()
    dout = dout.to(torch.float32).contiguous()
    g = torch.empty((batch, length, 2 * channels), dtype=torch.float32)
    dw_part = torch.empty((threads, 2, k, channels), dtype=torch.float32)
    db_part = torch.empty((threads, 2, channels), dtype=torch.float32)
    with _named("vmamba::cpu_bidirectional_conv1d_backward"):
        rc = lib.ss_bidir_conv_backward_f32(
            x.data_ptr(),
            x.stride(0),
            x.stride(1),
            taps.data_ptr(),
            _ptr(bias),
            dout.data_ptr(),
            g.data_ptr(),
            dx.data_ptr(),
            dw_part.data_ptr(),
            db_part.data_ptr(),
            batch,
            length,
            channels,
            k,
            int(silu),
            threads,
        )
    _check(rc, "bidirectional conv1d backward")
    return dx, dw_part.sum(0), None if bias is None else db_part.sum(0)


# The widest x_proj output (R + 2N, in SIMD vectors) ss_vim_mixer_f32 takes.
_MAX_PROJ_VECTORS = 12


def cpu_vim_mixer(
    x: Tensor,
    z: Tensor,
    direction_params: list[tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor, Tensor, Tensor]],
    u: Tensor | None = None,
) -> Tensor | None:
    """Vim's mixer between its two projections, for float32 CPU inference, in one call of the C++ library:
    both directions' causal convolution + SiLU, x_proj and scan, averaged and gated by ``silu(z)``.

    ``x`` and ``z`` are (batch, L, E) views with unit channel stride (the halves of in_proj's output);
    ``direction_params`` holds, for the forward and then the backward direction, ``(conv weight (E, 1, k),
    conv bias (E,) or None, x_proj weight (R + 2N, E), A_log (E, N), D (E,), dt_proj bias (E,), dt_proj
    weight (E, R))``, contiguous float32; ``u`` an optional contiguous (batch, L, 2E) buffer for the
    convolution's output. Returns the merged scan output (batch, L, E), token-major, or None when the
    library cannot take the call (unavailable, or an x_proj wider than it handles): the caller then runs
    the separate ops, which compute the same thing (:class:`vmamba.layers.BiMambaMixer`). No autograd.
    """
    lib = _LIBRARY.get()
    batch, length, inner = x.shape
    conv_weight, _, proj_weight, a_log, *_ = direction_params[0]
    k, dstate = conv_weight.shape[-1], a_log.shape[1]
    rank = proj_weight.shape[0] - 2 * dstate
    if lib is None or batch == 0 or length == 0 or rank < 1:
        return None
    lanes = lib.ss_lanes(0)
    padded = -(-proj_weight.shape[0] // lanes) * lanes
    if padded // lanes > _MAX_PROJ_VECTORS:
        return None
    if u is None:
        u = torch.empty((batch, length, 2 * inner), dtype=torch.float32)
    xdbl = torch.empty((2, batch, length, padded), dtype=torch.float32)
    out = torch.empty((batch, length, inner), dtype=torch.float32)
    pointers = (ctypes.c_void_p * 14)(
        *(_ptr(t) for i in range(7) for t in (direction_params[0][i], direction_params[1][i]))
    )
    with _named("vmamba::cpu_vim_mixer"):
        rc = lib.ss_vim_mixer_f32(
            x.data_ptr(),
            x.stride(0),
            x.stride(1),
            z.data_ptr(),
            z.stride(0),
            z.stride(1),
            pointers,
            u.data_ptr(),
            xdbl.data_ptr(),
            out.data_ptr(),
            batch,
            length,
            inner,
            k,
            dstate,
            rank,
            torch.get_num_threads(),
        )
    _check(rc, "vim mixer")
    return out


def cpu_add_rms_norm(
    x: Tensor | None, residual: Tensor, weight: Tensor, eps: float, want_total: bool
) -> tuple[Tensor, Tensor | None]:
    """Vim's residual add and RMSNorm in the C++ library, float32, contiguous (batch, L, D) tensors (see
    ``vmamba.kernels.norm``): ``(rms_norm(residual + x), residual + x or None)``; x None normalises
    ``residual`` alone. The library must be available (:func:`cpu_library_available`).

    Differentiable: where a gradient is recorded, :class:`_AddRMSNormFunction` keeps only the sum (the
    residual stream, kept anyway) and the weight for the backward, not the norm's intermediates.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight)):
        if x is None:
            return _AddRMSNormFunction.apply(None, residual, weight, eps), None
        normed, total = _AddRMSNormFunction.apply(x, residual, weight, eps)
        return normed, total if want_total else None
    return _add_rms_norm_loop(x, residual, weight, eps, want_total)


def _add_rms_norm_loop(
    x: Tensor | None, residual: Tensor, weight: Tensor, eps: float, want_total: bool
) -> tuple[Tensor, Tensor | None]:
    """One call of the C++ loop (``ss_add_rms_norm_f32``), no autograd."""
    dim = residual.shape[-1]
    normed = torch.empty_like(residual)
    total = torch.empty_like(residual) if want_total else None
    with _named("vmamba::cpu_add_rms_norm"):
        rc = _LIBRARY.get().ss_add_rms_norm_f32(
            _ptr(x),
            residual.data_ptr(),
            weight.data_ptr(),
            float(eps),
            normed.data_ptr(),
            _ptr(total),
            residual.numel() // dim,
            dim,
            torch.get_num_threads(),
        )
    _check(rc, "add_rms_norm")
    return normed, total


class _AddRMSNormFunction(torch.autograd.Function):
    """Autograd for the C++ add + RMSNorm: the forward is the loop; the backward recomputes each row's
    inverse RMS from the saved sum and runs as PyTorch ops (transients only). With x None the input is
    ``residual`` alone and the output the norm alone."""

    @staticmethod
    def forward(ctx, x: Tensor | None, residual: Tensor, weight: Tensor, eps: float):
        normed, total = _add_rms_norm_loop(x, residual, weight, eps, x is not None)
        ctx.save_for_backward(residual if total is None else total, weight)
        ctx.eps = eps
        ctx.has_x = x is not None
        return normed if total is None else (normed, total)

    @staticmethod
    @once_differentiable
    def backward(ctx, dnormed: Tensor, dtotal: Tensor | None = None):
        total, weight = ctx.saved_tensors
        rstd = torch.rsqrt(total.square().mean(-1, keepdim=True) + ctx.eps)
        xhat = total * rstd
        dweight = (dnormed * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        dnormed = dnormed * weight
        dx = (dnormed - xhat * (dnormed * xhat).mean(-1, keepdim=True)) * rstd
        if dtotal is not None:
            dx = dx + dtotal
        return (dx if ctx.has_x else None), dx, dweight, None


def cpu_library_available() -> bool:
    """Whether the C++ library is built and loaded (building it on the first call)."""
    return _LIBRARY.get() is not None


def _is_available(device: torch.device) -> bool:
    return torch.device(device).type == "cpu" and _LIBRARY.get() is not None


def _unavailable_reason(device: torch.device) -> str:
    if torch.device(device).type != "cpu":
        return "the 'cpu' backend only runs CPU tensors"
    _LIBRARY.get()
    return _LIBRARY.error or "not available"


def _contig(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _entry(kind: str, dtype: torch.dtype):
    lib = _LIBRARY.get()
    if lib is None:
        raise RuntimeError(f"the 'cpu' selective-scan backend is unavailable: {_LIBRARY.error}")
    return getattr(lib, f"ss_{kind}_{'f64' if dtype == torch.float64 else 'f32'}")


def _check(rc: int, what: str) -> None:
    if rc == -1:
        raise MemoryError(f"selective_scan cpu {what}: could not allocate the per-thread workspace")
    if rc != 0:
        raise RuntimeError(f"selective_scan cpu {what}: the kernel rejected the sizes (code {rc})")


def _states_first(BC: Tensor, dtype: torch.dtype) -> Tensor:
    """(batch, G, N, L) -> contiguous (batch, G, L, N) in ``dtype``: one step's N values side by side."""
    return BC.to(dtype).transpose(-1, -2).contiguous()


def _is_empty(u: Tensor, A: Tensor) -> bool:
    return u.numel() == 0 or A.shape[1] == 0


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``, keeping its strides (no copy, and no dispatch, when it already has that dtype)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _named(name: str):
    """A profiler range named ``name`` while a profiler records (C++ calls are invisible to it otherwise);
    nothing otherwise, since entering a range costs about 20 us per call even with no profiler."""
    return (
        torch.profiler.record_function(name)
        if torch.autograd._profiler_enabled()
        else contextlib.nullcontext()
    )


def _int64s(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def cpu_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple[Tensor, Tensor]:
    """Forward of the fused CPU scan. B, C grouped (batch, G, N, L). Returns (out in u.dtype, last state).

    u, delta, z, A, B and C are read through their strides: any views (token-major ``(batch, L, dim)``
    tensors passed as ``.transpose(1, 2)``, slices of a wider projection, expanded B/C) are not copied.
    """
    if _is_empty(u, A):
        return torch_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out, last = _scan_views(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ("row",), None, "sum", None)
    return out[:, 0], last


def _slices(batch: int, groups: int, per_group: int, threads: int) -> int:
    """How many parts to split each group's channels into so there are about 4 work units per thread."""
    units = batch * groups
    return max(1, min(per_group, -(-4 * threads // units))) if units < 4 * threads else 1


def cpu_scan_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of the fused CPU scan, in the inputs' dtypes."""
    if _is_empty(u, A):
        return torch_scan_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    f = math_dtype(u)
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    if f == torch.float32 and dstate in _BLOCK_STATES:  # the vectorised kernel, on the views as they are
        uf, df, zf, Bf, Cf, dout_f = (_as(t, f) for t in (u, delta, z, B, C, dout))
        du, ddelta = torch.empty_like(uf), torch.empty_like(df)
        dz = None if z is None else torch.empty_like(zf)
        dA, dB, dC, dD, dbias = _backward_in_place(
            uf,
            df,
            _contig(A, f),
            Bf,
            Cf,
            _contig(D, f),
            zf,
            _contig(delta_bias, f),
            delta_softplus,
            dout_f,
            du,
            ddelta,
            dz,
            reverse=False,
            col_h=0,
            add_du=False,
            add_dz=False,
            dout_scale=1.0,
            dlast=_contig(dlast, f),
        )
        grads = (du, ddelta, dA, dB, dC, dD, dz, dbias)
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))
    threads = torch.get_num_threads()
    slices = _slices(batch, groups, dim // groups, threads)
    uf, df, Af, Df, zf, bf = (_contig(t, f) for t in (u, delta, A, D, z, delta_bias))
    Bt, Ct = _states_first(B, f), _states_first(C, f)
    dout_f, dlast_f = _contig(dout, f), _contig(dlast, f)
    du, ddelta = torch.empty_like(uf), torch.empty_like(uf)
    dz = torch.empty_like(uf) if z is not None else None
    dA_rows = torch.empty((batch, dim, dstate), dtype=f)
    dB_part = torch.zeros((batch, groups, slices, length, dstate), dtype=f)
    dC_part = torch.zeros_like(dB_part)
    dD_rows = torch.empty((batch, dim), dtype=f) if D is not None else None
    dbias_rows = torch.empty((batch, dim), dtype=f) if delta_bias is not None else None
    rc = _entry("backward", f)(
        *(_ptr(t) for t in (uf, df, Af, Bt, Ct, Df, zf, bf, dout_f, dlast_f)),
        *(_ptr(t) for t in (du, ddelta, dz, dA_rows, dB_part, dC_part, dD_rows, dbias_rows)),
        batch,
        dim,
        length,
        dstate,
        groups,
        slices,
        int(bool(delta_softplus)),
        threads,
    )
    _check(rc, "backward")
    dB = dB_part.sum(2) if slices > 1 else dB_part[:, :, 0]
    dC = dC_part.sum(2) if slices > 1 else dC_part[:, :, 0]
    return (
        du.to(u.dtype),
        ddelta.to(delta.dtype),
        dA_rows.sum(0).to(A.dtype),
        dB.transpose(-1, -2).to(B.dtype),
        dC.transpose(-1, -2).to(C.dtype),
        None if D is None else dD_rows.sum(0).to(D.dtype),
        None if z is None else dz.to(z.dtype),
        None if delta_bias is None else dbias_rows.sum(0).to(delta_bias.dtype),
    )


# The directions the fused multi-direction forward reads in place, and whether each runs back to front.
_REVERSED = {"row": False, "row_reversed": True, "col": False, "col_reversed": True}
_COLUMN = frozenset({"col", "col_reversed"})
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable(u, delta, A, B, C, D, z, delta_bias, directions, merge, delta_proj_weight, grid_size) -> bool:
    """Whether the fused forward can take this call's shapes and dtypes (else the generic path runs, and
    checks it)."""
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj_weight) if t is not None]
    if not directions or any(d not in _REVERSED for d in directions) or merge not in MERGES:
        return False
    if any(d in _COLUMN for d in directions) and (
        grid_size is None or grid_size[0] * grid_size[1] != delta.shape[-1]
    ):
        return False
    if any(t.dtype not in _KERNEL_DTYPES or t.device.type != "cpu" for t in tensors):
        return False
    k = len(directions)
    if delta.dim() != 3 or A.dim() != 2 or delta.numel() == 0 or A.shape[1] == 0 or A.shape[0] % k:
        return False
    batch, steps, length = delta.shape
    total = A.shape[0]
    channels = total // k
    if delta_proj_weight is None and steps != total:
        return False
    if delta_proj_weight is not None:
        rank = delta_proj_weight.shape[-1]
        if (
            delta_proj_weight.shape != (total, rank)
            or steps != k * rank
            or delta_proj_weight.dtype != A.dtype
        ):
            return False
    for t in (u, z):
        if t is not None and (t.dim() != 3 or t.shape[0] != batch or t.shape[2] != length):
            return False
        if t is not None and t.shape[1] not in (channels, total):
            return False
    if A.shape[0] != total or B.dim() != 4 or B.shape != C.shape or B.shape[1] % k:
        return False
    if B.shape[0] != batch or B.shape[2:] != (A.shape[1], length) or channels % (B.shape[1] // k):
        return False
    return all(t is None or t.shape == (total,) for t in (D, delta_bias))


def _start(t: Tensor, reverse: bool) -> int:
    """Address of token 0 of ``t`` in scan order: its last token when the direction runs back to front."""
    if not reverse:
        return t.data_ptr()
    return t.data_ptr() + (t.shape[-1] - 1) * t.stride(-1) * t.element_size()


def _scan_strides(t: Tensor, reverse: bool) -> list[int]:
    """Element strides of ``t`` with the token (last) stride negated for a back-to-front direction."""
    strides = list(t.stride())
    if reverse:
        strides[-1] = -strides[-1]
    return strides


def cpu_multi_direction_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    directions: tuple[str, ...],
    grid_size: tuple[int, int] | None = None,
    merge: str = "sum",
    delta_proj_weight: Tensor | None = None,
) -> Tensor:
    """The ``multi_direction`` hook: the row and column directions scanned in place and merged.

    Semantics of ``multi_direction_selective_scan`` (canonical ``directions``).

    - When no gradient is needed (Vim's ``"row"`` / ``"row_reversed"``, VMamba's four), each direction is
      one call of the C++ forward on views of its block of the inputs (:func:`_scan_in_place`).
    - With gradients, float32 parameters, float32 or (CPU autocast's) half-precision activations and N = 1
      or 16 (Vim's and VMamba's), the same forward runs inside an autograd function whose backward is the
      channel-vectorised C++ backward on the same views (:class:`_FusedScanFunction`): no reordered,
      concatenated or contiguous copies either way (half-precision activations are converted to float32).
      Low-rank steps are projected in the forward's kernel too; only the backward projects them (a
      transient).

    Returns NotImplemented otherwise (gradients needed elsewhere, a column direction without a matching
    grid_size, other dtypes, empty or inconsistent inputs): the caller then runs its generic path, which
    does the checks.
    """
    if not _fusable(u, delta, A, B, C, D, z, delta_bias, directions, merge, delta_proj_weight, grid_size):
        return NotImplemented
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj_weight) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _scan_in_place(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus,
            directions,
            grid_size,
            merge,
            delta_proj_weight,
        )
    params, activations = (A, D, delta_bias, delta_proj_weight), (u, delta, B, C, z)
    if not (
        is_eager_cpu_activations(params, activations)
        and A.shape[1] in _BLOCK_STATES
        and _LIBRARY.get() is not None
    ):
        return NotImplemented
    return _FusedScanFunction.apply(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_proj_weight,
        bool(delta_softplus),
        directions,
        grid_size,
        merge,
    )


# The state sizes of the fused backward (ss_backward_views_f32).
_BLOCK_STATES = (1, 16)


def _block(t: Tensor | None, i: int, k: int, size: int, dim: int = 1) -> Tensor | None:
    """Direction i's block of ``size`` along ``dim`` of ``t`` (K blocks), or ``t`` itself when it is shared
    by the directions (not K blocks long) or None."""
    if t is None or t.shape[dim] != k * size:
        return t
    return t.narrow(dim, i * size, size)


def _scan_in_place(u, delta, A, B, C, D, z, delta_bias, softplus, directions, grid_size, merge, W) -> Tensor:
    """The fused forward: one C++ call per direction on views of its block of the inputs.

    A reversed direction is passed as views that start at the last token with negated token strides, so it
    reads u, delta, z, B, C and writes its output back to front without reversed copies, and a column
    direction walks the (H, W) grid column by column inside the kernel (reversed: the same walk over the
    negated strides). The first direction writes the output, later ones add into it (the last one scaling
    by 1/K for ``merge="mean"``); ``merge="none"`` writes each direction into its own slot. A gate z shared
    by the directions gates their sum, once, in the last direction's call. The output is
    token-major when u is (channels contiguous), like the inputs of Vim's mixer. With ``W`` (the low-rank
    ``delta_proj_weight``) the kernel computes each step from the low-rank input (dt_proj fused in). No
    autograd.
    """
    out, _ = _scan_views(u, delta, A, B, C, D, z, delta_bias, softplus, directions, grid_size, merge, W)
    return out if merge == "none" else out[:, 0]


def _scan_views(u, delta, A, B, C, D, z, delta_bias, softplus, directions, grid_size, merge, W):
    """:func:`_scan_in_place`'s calls; returns the output (batch, K or 1, C, L) in u's dtype and the last
    state of the last direction (batch, C, N).

    Each direction's blocks are passed as addresses and element strides computed here (a block of K along
    dim 1 of the activations and dim 0 of the parameters; an activation that is not K blocks long is
    shared), not as tensor views: this runs once per block of a model, where each view would cost more than
    the arithmetic.
    """
    k = len(directions)
    batch, steps, length = delta.shape
    total = A.shape[0]
    channels, dstate, groups = total // k, A.shape[1], B.shape[1] // k
    f = math_dtype(u)
    uf, df, Af, Bf, Cf, zf = (_as(t, f) for t in (u, delta, A, B, C, z))
    Df, bf, Wf = (None if t is None else _as(t, f).contiguous() for t in (D, delta_bias, W))
    slots = k if merge == "none" else 1
    if u.stride(1) == 1 and channels > 1:  # token-major, like u: (batch, L, slots, C) storage
        out = torch.empty((batch, length, slots, channels), dtype=f).permute(0, 2, 3, 1)
    else:
        out = torch.empty((batch, slots, channels, length), dtype=f)
    last = torch.empty((batch, channels, dstate), dtype=f)  # required by the kernel
    gate_sum = zf is not None and k > 1 and merge != "none" and zf.shape[1] == channels
    size = uf.element_size()
    # The activation views of direction 0, in the kernel's order, with the size of their block along dim 1
    # (0: shared by the directions): their start addresses and element strides in either scan order, and
    # the step from one direction's block to the next.
    views = [(uf, channels), (df, steps // k), (uf if zf is None else zf, channels), (out[:, 0], 0)]
    views += [(Bf, groups), (Cf, groups)]
    starts = [(_start(t, False), _start(t, True)) for t, _ in views]
    steps_of = [(block if t.shape[1] == k * block else 0) * t.stride(1) * size for t, block in views]
    steps_of[3] = out.stride(1) * size if merge == "none" else 0  # merge="none": a slot per direction
    strides_of = tuple(
        _int64s([s for t, _ in views for s in _scan_strides(t, reverse)] + list(Af.stride()))
        for reverse in (False, True)
    )
    sizes = _int64s([batch, channels, length, dstate, groups])
    forward = _entry("forward", f)
    rank = 0 if Wf is None else Wf.shape[1]
    threads = torch.get_num_threads()

    def param(t: Tensor | None, i: int) -> int | None:
        """Direction i's block of a parameter (K blocks along dim 0)."""
        return None if t is None else t.data_ptr() + i * channels * t.stride(0) * size

    with _named("vmamba::cpu_multi_direction_scan"):
        for i, name in enumerate(directions):
            reverse = _REVERSED[name]
            u_i, d_i, z_i, out_i, B_i, C_i = (
                start[reverse] + i * step for start, step in zip(starts, steps_of)
            )
            rc = forward(
                u_i,
                d_i,
                param(Af, i),
                B_i,
                C_i,
                param(Df, i),
                None if zf is None or (gate_sum and i < k - 1) else z_i,
                param(bf, i),
                param(Wf, i),
                rank,
                grid_size[0] if name in _COLUMN else 0,
                out_i,
                last.data_ptr(),
                sizes,
                strides_of[reverse],
                int(bool(softplus)),
                int(merge != "none" and i > 0),
                int(gate_sum),
                1.0 / k if merge == "mean" and i == k - 1 else 1.0,
                threads,
            )
            _check(rc, "forward")
    return _as(out, u.dtype), last


def _backward_in_place(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    softplus,
    dout,
    du,
    ddelta,
    dz,
    reverse,
    col_h,
    add_du,
    add_dz,
    dout_scale,
    dlast=None,
):
    """One direction's backward (ss_backward_views_f32) on views, float32 and N = 1 or 16: writes (or adds,
    for a u or z shared with other directions) du, ddelta and dz through their views and returns
    ``(dA, dB, dC, dD, ddelta_bias)`` for this direction (dB, dC in B's (batch, G, N, L) order). ``col_h``:
    the grid height of a column direction, else 0; ``dlast``: the contiguous gradient of the last state, or
    None."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    threads = torch.get_num_threads()
    slices = _slices(batch, groups, dim // groups, threads)
    dA_rows = torch.empty((batch, dim, dstate))
    dB_part = torch.empty((batch, groups, slices, length, dstate))  # every element is written
    dC_part = torch.empty_like(dB_part)
    dD_rows = torch.empty((batch, dim)) if D is not None else None
    dbias_rows = torch.empty((batch, dim)) if delta_bias is not None else None
    views = (u, delta, u if z is None else z, dout, du, ddelta, du if dz is None else dz, B, C)
    rc = _LIBRARY.get().ss_backward_views_f32(
        *(_start(t, reverse) for t in (u, delta)),
        A.data_ptr(),
        *(_start(t, reverse) for t in (B, C)),
        _ptr(D),
        None if z is None else _start(z, reverse),
        _ptr(delta_bias),
        _start(dout, reverse),
        _ptr(dlast),
        *(_start(t, reverse) for t in (du, ddelta)),
        None if dz is None else _start(dz, reverse),
        *(_ptr(t) for t in (dA_rows, dB_part, dC_part, dD_rows, dbias_rows)),
        _int64s([batch, dim, length, dstate, groups, slices]),
        _int64s([s for t in views for s in _scan_strides(t, reverse)]),
        col_h,
        int(softplus),
        int(add_du),
        int(add_dz),
        dout_scale,
        threads,
    )
    _check(rc, "multi-direction backward")

    def states_last(part: Tensor) -> Tensor:  # (batch, G, slices, L, N) in scan order -> (batch, G, N, L)
        summed = (part.sum(2) if slices > 1 else part[:, :, 0]).transpose(-1, -2)
        if col_h:  # step p visited token (p % H) * W + p // H: the (W, H) walk back to the (H, W) grid
            summed = summed.unflatten(-1, (length // col_h, col_h)).transpose(-1, -2).flatten(-2)
        return summed.flip(-1) if reverse else summed

    return (
        dA_rows.sum(0),
        states_last(dB_part),
        states_last(dC_part),
        None if D is None else dD_rows.sum(0),
        None if delta_bias is None else dbias_rows.sum(0),
    )


class _FusedScanFunction(torch.autograd.Function):
    """The row and column directions with autograd, N = 1 or 16, float32 parameters and float32 or
    half-precision activations (computed in float32): :func:`_scan_in_place`
    forward, and the channel-vectorised C++ backward per direction on the same views (a reversed direction
    through views with negated token strides, a column direction by the kernel's column walk, a shared u or
    z accumulated in place). The backward recomputes the states, so only the inputs are saved: with low-rank
    steps (``W``, the ``delta_proj_weight``) the low-rank input, not the (batch, K*C, L) steps, which the
    backward projects again for as long as it runs."""

    @staticmethod
    def forward(
        ctx, u, delta, A, B, C, D, z, delta_bias, W, softplus: bool, directions: tuple, grid_size, merge
    ):
        A, D, delta_bias, W = (None if t is None else t.contiguous() for t in (A, D, delta_bias, W))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, W)
        ctx.softplus, ctx.directions, ctx.grid_size, ctx.merge = softplus, directions, grid_size, merge
        return _scan_in_place(u, delta, A, B, C, D, z, delta_bias, softplus, directions, grid_size, merge, W)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        # Half-precision activations (autocast's) are converted here, as the forward did: the kernels run in
        # float32 (autograd casts each gradient to its input's dtype).
        u, low_rank, A, B, C, D, z, delta_bias, W = (
            None if t is None else t.float() for t in ctx.saved_tensors
        )
        dout = dout.float()
        delta = low_rank if W is None else project_steps(low_rank, W)
        directions, merge = ctx.directions, ctx.merge
        k = len(directions)
        channels, groups = A.shape[0] // k, B.shape[1] // k
        shared_u = u.shape[1] != k * channels
        shared_z = z is not None and z.shape[1] != k * channels
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        parts = []
        with _named("vmamba::cpu_multi_direction_scan_backward"):
            for i, name in enumerate(directions):
                parts.append(
                    _backward_in_place(
                        *(_block(t, i, k, channels) for t in (u, delta)),
                        _block(A, i, k, channels, 0),
                        *(_block(t, i, k, groups) for t in (B, C)),
                        _block(D, i, k, channels, 0),
                        _block(z, i, k, channels),
                        _block(delta_bias, i, k, channels, 0),
                        ctx.softplus,
                        dout[:, i] if merge == "none" else dout,
                        *(_block(t, i, k, channels) for t in (du, ddelta, dz)),
                        reverse=_REVERSED[name],
                        col_h=ctx.grid_size[0] if name in _COLUMN else 0,
                        add_du=shared_u and i > 0,
                        add_dz=shared_z and i > 0,
                        dout_scale=1.0 / k if merge == "mean" else 1.0,
                    )
                )
        dA, dB, dC, dD, dbias = (
            None if p[0] is None else torch.cat(p, dim=d) for p, d in zip(zip(*parts), (0, 1, 1, 0, 0))
        )
        dW = None
        if W is not None:
            ddelta, dW = project_steps_backward(ddelta, low_rank, W)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, dW, None, None, None, None


register_backend(
    ScanBackend(
        "cpu",
        cpu_scan_forward,
        cpu_scan_backward,
        _is_available,
        _unavailable_reason,
        multi_direction=cpu_multi_direction_scan,
        multi_direction_low_rank=True,
    )
)
