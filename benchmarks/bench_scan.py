"""Selective-scan benchmark: backend x shape -> forward ms, forward+backward ms, peak memory, speed-up ratios.

Run ``python benchmarks/bench_scan.py`` (``--quick`` for the target shape only; ``--help`` for options). It
prints a Markdown table. Every number in one table comes from the same run: the backends are timed in
turn (interleaved, so that load from other processes hits them alike) and the medians are reported.

Rows ("backends"):

- ``reference``: the sequential float32 loop (``selective_scan_reference``: exp(dt A) and dt B u for all
  steps, then a Python loop); its forward+backward is autograd through that loop.
- ``torch``, ``cpu`` (and ``triton`` when CUDA is present): ``vmamba.kernels.selective_scan(backend=...)``.
- ``mambapy``: mambapy's ``pscan`` (if installed: ``pip install mambapy``) fed A = exp(dt A) and X = dt B u in
  its (batch, L, dim, N) layout, plus the C h readout, D skip and silu(z) gate, so it computes the same thing.
- ``yardstick``: the fused C++ scan in /work/shared/bench/cpu_scan_yardstick (if that folder exists), one
  call per group of B/C (it takes 3-D B/C only); ``yardstick-ld``: that folder's channel-vectorised
  forward, fed token-major contiguous (batch, L, channels) copies made before timing (forward only).
- ``cpu@REV`` (``--baseline REV``): the ``cpu`` backend's kernel as of git revision REV, built from that
  revision's ``kernels/`` and called directly (forward only), to measure a change in the same run.

``--layout token`` passes u, delta and z as ``.transpose(1, 2)`` views of token-major (batch, L, dim)
tensors (what the models' projections produce) instead of contiguous (batch, dim, L) ones. ``--cpu-time``
times with the process's CPU time instead of the wall clock: on a machine shared with other jobs that
measures the work done rather than the time slices received (use it with ``--threads 1``).

Every case runs float32 with z, delta_bias and softplus. Peak memory (CPU) is the rise of the process's
peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the resident size just before
one run, measured in a fresh subprocess per case after a warm-up on a tiny shape; it counts everything the
case allocates (inputs excluded, outputs and autograd buffers included). On CUDA it is
``torch.cuda.max_memory_allocated`` above the inputs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vmamba.kernels import available_backends, selective_scan

YARDSTICK_DIR = Path("/work/shared/bench/cpu_scan_yardstick")
BASELINES = ("reference", "mambapy", "yardstick", "yardstick-ld")
ALL_BACKENDS = ("reference", "torch", "cpu", "triton", "mambapy", "yardstick", "yardstick-ld")
FORWARD_ONLY = ("yardstick-ld",)  # plus cpu@REV


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: batch, channels, state size, length and B/C groups."""

    name: str
    batch: int
    dim: int
    dstate: int
    length: int
    groups: int = 1


SHAPES = {
    s.name: s
    for s in (
        Shape("vim_t_b1_L197", 1, 384, 16, 197),
        Shape("vim_t_b1_L1025", 1, 384, 16, 1025),
        Shape("vim_t_b1_L4097", 1, 384, 16, 4097),
        Shape("vim_t_b8_L197", 8, 384, 16, 197),
        Shape("vim_t_b8_L1025", 8, 384, 16, 1025),
        Shape("vim_t_b8_L4097", 8, 384, 16, 4097),
        Shape("vmamba_t_s1_b1", 1, 384, 1, 3136, groups=4),
        # Vim-Ti as the model calls it: both directions (384 channels each) as the 2 groups of one call.
        Shape("vim_t_2dir_b1_L197", 1, 768, 16, 197, groups=2),
        Shape("vim_t_2dir_b1_L1025", 1, 768, 16, 1025, groups=2),
        Shape("vim_t_2dir_b1_L4097", 1, 768, 16, 4097, groups=2),
        # VMamba-T stage 1 (56 x 56 tokens, 4 directions, N = 1), 4 x 192 channels as 4 groups.
        Shape("vmamba_t_4dir_b1_L3136", 1, 768, 1, 3136, groups=4),
    )
}
TARGET_SHAPE = "vim_t_b8_L1025"
QUICK_SHAPES = ("vim_t_2dir_b1_L197", "vim_t_2dir_b1_L1025", "vim_t_2dir_b1_L4097", "vmamba_t_4dir_b1_L3136")
SLOW_SHAPES = ("vim_t_b8_L4097",)  # --skip-slow drops the reference loop and mambapy here


def make_inputs(shape: Shape, device: str, seed: int = 0, layout: str = "channel") -> dict[str, torch.Tensor]:
    """float32 inputs like a freshly initialised Mamba layer (S4D-real A, dt in [1e-3, 1e-1]).

    ``layout="token"``: u, delta and z are transposed views of token-major (batch, L, dim) tensors."""
    g = torch.Generator().manual_seed(seed)
    b, d, n, length, groups = shape.batch, shape.dim, shape.dstate, shape.length, shape.groups
    dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = {
        "u": torch.randn(b, d, length, generator=g),
        "delta": torch.randn(b, d, length, generator=g) * 0.5,
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        "B": torch.randn(b, groups, n, length, generator=g),
        "C": torch.randn(b, groups, n, length, generator=g),
        "D": torch.ones(d),
        "z": torch.randn(b, d, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    }
    if layout == "token":
        for name in ("u", "delta", "z"):
            inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    return {k: v.to(device) for k, v in inputs.items()}


def _mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    from mambapy.pscan import pscan

    dim, groups = u.shape[1], B.shape[1]
    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (b, L, dim)
    per_group = dim // groups
    Bx = B.repeat_interleave(per_group, dim=1).permute(0, 3, 1, 2)  # (b, L, dim, N)
    Cx = C.repeat_interleave(per_group, dim=1).permute(0, 3, 1, 2)
    ut = u.transpose(1, 2)
    hs = pscan(torch.exp(dt[..., None] * A), (dt * ut)[..., None] * Bx)
    y = (hs * Cx).sum(-1) + D * ut
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def _yardstick_scan(u, delta, A, B, C, D, z, delta_bias):
    from cpu_ext import selective_scan_cpp  # on sys.path when the folder exists

    groups = B.shape[1]
    per = u.shape[1] // groups
    parts = [
        selective_scan_cpp(
            *(t[:, g * per : (g + 1) * per] for t in (u, delta)),
            A[g * per : (g + 1) * per],
            B[:, g],
            C[:, g],
            D[g * per : (g + 1) * per],
            z[:, g * per : (g + 1) * per],
            delta_bias[g * per : (g + 1) * per],
            True,
        )
        for g in range(groups)
    ]
    return parts[0] if groups == 1 else torch.cat(parts, dim=1)


def _yardstick_ld_case(inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The yardstick's token-major forward, one call per group on per-group copies made here, untimed."""
    from cpu_ext import selective_scan_cpp_ld

    groups = inputs["B"].shape[1]
    per = inputs["u"].shape[1] // groups
    calls = []
    for g in range(groups):
        ch = slice(g * per, (g + 1) * per)
        tok = {k: inputs[k][:, ch].transpose(1, 2).contiguous() for k in ("u", "delta", "z")}
        bc = {k: inputs[k][:, g].transpose(1, 2).contiguous() for k in ("B", "C")}
        per_ch = {k: inputs[k][ch].contiguous() for k in ("A", "D", "delta_bias")}
        calls.append({**tok, **bc, **per_ch})
    return lambda: [selective_scan_cpp_ld(**kw, delta_softplus=True) for kw in calls]


def load_baseline(rev: str) -> Callable:
    """The ``cpu`` backend's forward as of git revision ``rev``: that revision's ``kernels/`` is unpacked
    into a temporary package (its ``__init__`` not run, so nothing is registered twice) and its
    ``cpu_scan_forward`` called directly; the library builds into the usual cache on first use."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="vmamba_bench_"))
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "kernels"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    name = f"vmamba_kernels_{rev.replace('-', '_').replace('.', '_')}"
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
    package.__path__ = [str(tmp / "kernels")]
    sys.modules[name] = package
    forward = importlib.import_module(f"{name}.cpu").cpu_scan_forward
    return lambda u, delta, A, B, C, D, z, delta_bias: forward(u, delta, A, B, C, D, z, delta_bias, True)[0]


_BASELINES: dict[str, Callable] = {}  # "cpu@REV" -> forward, filled by main()


def scan_fn(backend: str) -> Callable:
    """The function that runs ``backend`` on the benchmark inputs and returns the (batch, dim, L) output."""
    if backend == "mambapy":
        return _mambapy_scan
    if backend == "yardstick":
        return _yardstick_scan
    if backend in _BASELINES:
        return _BASELINES[backend]
    return lambda **kw: selective_scan(**kw, delta_softplus=True, backend=backend)


def reference_backward_estimate_s(shape: Shape) -> float:
    """Rough time of the reference loop's autograd: every step's select-backward writes a zero-filled
    (batch, dim, L, N) gradient for the decay and drive tensors, about 2 L full-size memsets at ~1 GB/s."""
    return 2 * shape.length * shape.batch * shape.dim * shape.length * shape.dstate * 4 / 1e9


def unsupported(
    backend: str, shape: Shape, args: argparse.Namespace, with_backward: bool = False
) -> str | None:
    """Why ``backend`` does not run on ``shape`` (forward, or forward+backward) in this run, or None."""
    if with_backward and (backend in FORWARD_ONLY or backend in _BASELINES):
        return "forward only"
    if backend in ("reference", "mambapy") and args.skip_slow and shape.name in SLOW_SHAPES:
        return "skipped (--skip-slow)"
    if backend == "mambapy":
        padded = 2 ** math.ceil(math.log2(shape.length))
        gib = shape.batch * padded * shape.dim * shape.dstate * 4 / 2**30
        if gib * 8 > args.max_mambapy_gib:  # pscan keeps several (b, L_pad, dim, N) tensors alive
            return f"skipped (~{gib * 8:.0f} GiB)"
    if backend == "reference" and with_backward and shape.name != TARGET_SHAPE:
        estimate = reference_backward_estimate_s(shape)
        if estimate > args.max_reference_backward_s:
            return f"skipped (~{estimate:.0f} s a run)"
    return None


def backend_device(backend: str) -> str:
    return "cuda" if backend == "triton" else "cpu"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_case(backend: str, shape: Shape, with_backward: bool, layout: str = "channel") -> Callable[[], None]:
    """A closure running one forward (no autograd) or one forward+backward of ``backend`` on ``shape``."""
    device = backend_device(backend)
    inputs = make_inputs(shape, device, layout=layout)
    if backend == "yardstick-ld":
        return _yardstick_ld_case(inputs)
    fn = scan_fn(backend)
    if not with_backward:

        def forward() -> None:
            with torch.no_grad():
                fn(**inputs)
            _sync(device)

        return forward
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    grad = torch.randn(shape.batch, shape.dim, shape.length, device=device)

    def forward_backward() -> None:
        fn(**leaves).backward(grad)
        for v in leaves.values():
            v.grad = None
        _sync(device)

    return forward_backward


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_memory_here(backend: str, shape_name: str, with_backward: bool) -> float:
    """Peak memory (MiB) one run of the case adds, measured in this (fresh) process."""
    shape = SHAPES[shape_name]
    tiny = Shape("tiny", 1, shape.groups * 2, shape.dstate, 8, shape.groups)
    make_case(backend, tiny, with_backward)()  # loads libraries, builds nothing big
    case = make_case(backend, shape, with_backward)
    if backend_device(backend) == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        case()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak resident set size to the current one
    base = _rss_kib()
    case()
    return (_peak_rss_kib() - base) / 1024


def measure_memory(backend: str, shape: Shape, with_backward: bool) -> float | None:
    """Run :func:`measure_memory_here` in a subprocess; None when that fails (reported as n/a)."""
    cmd = [sys.executable, __file__, "--memory-case", backend, shape.name, str(int(with_backward))]
    cmd += ["--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory case {backend}/{shape.name} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def time_cases(
    cases: dict[str, Callable[[], None]],
    repeats: int,
    slow_repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms per case on ``clock`` (the wall clock by default), cases interleaved.

    A first run warms each case up; if it took over 1 s it also counts as a sample and the case gets
    ``slow_repeats`` samples in all (just the one when it took over 60 s), else ``repeats`` more.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    limit: dict[str, int] = {}
    for name, case in cases.items():
        start = clock()
        case()
        seconds = clock() - start
        limit[name] = repeats
        if seconds > 1.0:
            times[name].append(seconds * 1e3)
            limit[name] = 1 if seconds > 60.0 else slow_repeats
    for _ in range(max(limit.values(), default=0)):
        for name, case in cases.items():
            if len(times[name]) < limit[name]:
                start = clock()
                case()
                times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def pick_backends(requested: list[str]) -> list[str]:
    """The requested backends that can run in this environment (with a note on stderr for the others)."""
    chosen = []
    for name in requested:
        if name == "triton" and not (torch.cuda.is_available() and "triton" in available_backends("cuda")):
            print("triton: no CUDA device / backend here, left out", file=sys.stderr)
        elif name in ("cpu", "torch") and name not in available_backends("cpu"):
            print(f"{name}: not available on this machine, left out", file=sys.stderr)
        elif name == "mambapy" and not _importable("mambapy.pscan"):
            print("mambapy: not installed (pip install mambapy), left out", file=sys.stderr)
        elif name.startswith("yardstick") and not (YARDSTICK_DIR / "cpu_ext.py").is_file():
            print(f"yardstick: {YARDSTICK_DIR} not found, left out", file=sys.stderr)
        else:
            chosen.append(name)
    return chosen


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _ratio(base: float | None, x: float | None) -> str:
    return "" if base is None or x is None else f"{base / x:.1f}x"


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"batch-1 model shapes {QUICK_SHAPES}, forwards only, 1 thread unless --threads, 5 repeats, no memory",
    )
    parser.add_argument("--baseline", action="append", default=[], metavar="REV", help="also time cpu@REV")
    parser.add_argument("--layout", choices=("channel", "token"), default="channel", help="u/delta/z layout")
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time, not wall clock")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma-separated backends")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs for cases over 1 s a run")
    parser.add_argument("--skip-slow", action="store_true", help=f"no reference/mambapy on {SLOW_SHAPES}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--forward-only", action="store_true", help="time forwards only (fwd+bwd left blank)")
    parser.add_argument("--max-mambapy-gib", type=float, default=8.0, help="skip mambapy above this estimate")
    parser.add_argument(
        "--max-reference-backward-s",
        type=float,
        default=600.0,
        help="skip the reference loop's forward+backward where it is estimated slower (not on the target shape)",
    )
    parser.add_argument(
        "--max-memory-case-s", type=float, default=60.0, help="no memory run for slower cases"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--memory-case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if YARDSTICK_DIR.is_dir():
        sys.path.insert(0, str(YARDSTICK_DIR))
    if args.quick:
        if args.shapes == ",".join(SHAPES):
            args.shapes = ",".join(QUICK_SHAPES)
        args.no_memory, args.forward_only = True, True
        args.threads = args.threads or 1
        if args.backends == ",".join(ALL_BACKENDS):
            args.backends = "reference,cpu,yardstick,yardstick-ld"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        backend, shape_name, with_backward = args.memory_case
        print(json.dumps({"peak_mib": measure_memory_here(backend, shape_name, bool(int(with_backward)))}))
        return
    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    backends = pick_backends(args.backends.split(","))
    for rev in args.baseline:
        _BASELINES[f"cpu@{rev}"] = load_baseline(rev)
        backends.append(f"cpu@{rev}")
    clock = time.process_time if args.cpu_time else time.perf_counter

    header = ["shape", "backend", "fwd ms", "fwd+bwd ms"]
    if not args.no_memory:
        header += ["fwd peak MiB", "fwd+bwd peak MiB"]
    present_baselines = [b for b in (*BASELINES, *_BASELINES) if b in backends]
    header += [f"fwd vs {b}" for b in present_baselines] + [f"fwd+bwd vs {b}" for b in present_baselines]
    rows = []
    for shape in shapes:
        run_fwd = [b for b in backends if unsupported(b, shape, args) is None]
        run_both = [
            b for b in backends if unsupported(b, shape, args, True) is None and not args.forward_only
        ]
        print(f"# {shape.name}: timing {', '.join(run_fwd)}", file=sys.stderr, flush=True)
        fwd = time_cases(
            {b: make_case(b, shape, False, args.layout) for b in run_fwd},
            args.repeats,
            args.slow_repeats,
            clock,
        )
        both = time_cases(
            {b: make_case(b, shape, True, args.layout) for b in run_both},
            args.repeats,
            args.slow_repeats,
            clock,
        )
        for backend in backends:
            row = [shape.name, backend]
            for with_backward, times in ((False, fwd), (True, both)):
                if with_backward and args.forward_only:
                    row.append("")
                    continue
                row.append(unsupported(backend, shape, args, with_backward) or _fmt(times.get(backend)))
            if not args.no_memory:
                for with_backward, times in ((False, fwd), (True, both)):
                    ms = times.get(backend)
                    if ms is None:
                        row.append("")
                    elif ms > args.max_memory_case_s * 1e3:
                        row.append("not run (slow)")
                    else:
                        row.append(_fmt(measure_memory(backend, shape, with_backward), 0))
            row += [_ratio(fwd.get(b), fwd.get(backend)) for b in present_baselines]
            row += [_ratio(both.get(b), both.get(backend)) for b in present_baselines]
            rows.append(row)
            print("  " + " | ".join(row), file=sys.stderr, flush=True)

    print(f"Selective scan, float32, z + delta_bias + softplus; {machine_line()}; {datetime.date.today()}")
    clock_name = "process CPU time" if args.cpu_time else "wall clock"
    print(f"u/delta/z layout: {args.layout}-major; {clock_name}; command: {' '.join(sys.argv)}")
    print("Ratios: baseline time / row time (higher = row is faster). Medians of interleaved runs.\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
