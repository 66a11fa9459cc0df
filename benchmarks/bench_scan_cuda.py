"""Selective-scan speed on a CUDA GPU: the Triton kernels against the bytes-moved roofline.

For Vim and VMamba scan shapes at L = 197 (batch 64-128) and L >= 1024, with bf16 activations in the
token-major layout the projections produce ((batch, L, channels) tensors viewed as (batch, channels, L);
B and C as (batch, L, groups, N) viewed as (batch, groups, N, L)) and fp32 weights, it times forward and
forward+backward of:

- ``fused``: the K directions in one call (:func:`vmamba.kernels.triton.triton_multi_direction_scan`);
- ``one``: one direction over the same K*C channels (the same call with ``directions=("row",)``; u and z
  given per channel), the cost the fused call is held to (target: fused <= 1.3x one);
- ``low-rank``: the fused call as the mixers make it, with ``delta_proj_weight`` (the models' dt_rank):
  the kernels project each token's steps from the (batch, K*R, L) low-rank input, so the (batch, K*C, L)
  steps are neither written by a GEMM nor read by the scan (reported as a ratio to ``fused``; Vim-Ti's
  rank only, since every rank is one more compile of the kernels).

Each shape's row is printed (JSON, stderr) and the JSON file rewritten as soon as it is measured, so a
run cut short by a time limit keeps what it measured.

The roofline is the time to move the bytes a pass must move at the copy bandwidth measured on this GPU
(a device-to-device copy; bytes read + written per second): forward, u, delta, z, B, C read and y
written; backward, those read again with dy, and du, ddelta, dz, dB, dC written. Targets (issue 11):
forward >= 60% of its roofline at L >= 1024 and >= 30% at L = 197; forward+backward <= 3x forward.

``--sass`` needs no GPU: it compiles the kernels for sm_90 with Triton's bundled ptxas at the Vim-Ti
shape (bf16, N = 16, token-major) and prints registers, spills and the instruction mix per token.

Usage::

    python benchmarks/bench_scan_cuda.py                      # every shape, table on stdout
    python benchmarks/bench_scan_cuda.py --json scan.json     # also write the rows as JSON
    python benchmarks/bench_scan_cuda.py --only vim --batch 64
    python benchmarks/bench_scan_cuda.py --sass               # compiled-code proxy, no GPU needed
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

DEVICE = "cuda"  # where the benchmark tensors live (a module attribute so a dry run can use the CPU)


@dataclass(frozen=True)
class Shape:
    """One scan as a model calls it: K directions of C channels over L tokens."""

    name: str
    family: str
    directions: tuple[str, ...]
    channels: int
    dstate: int
    grid: tuple[int, int]  # (H, W); (1, L) for a 1-D token sequence
    shared_u: bool  # one u for all directions (VMamba) or one per direction (Vim's separate conv)
    gate: bool  # silu(z) gate (Vim) or none (VMamba v2 "_noz")
    merge: str
    batch: int
    rank: int  # the model's dt_rank (ceil(embed_dim / 16) for Vim, ceil(d_inner / 16) for SS2D)

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1]


# The dt_rank whose low-rank calls are timed (Vim-Ti's): each rank compiles the kernels once more.
LOW_RANK_TIMED = 12

VIM = ("forward", "backward")
SS2D = ("row", "col", "row_reversed", "col_reversed")
# Vim: d_inner = 2 * embed_dim, N = 16, z shared by both directions, directions averaged.
# VMamba-T (vmamba_tiny_s1l8): d_inner = stage width, N = 1, four directions, no gate, summed.
SHAPES = [
    Shape("Vim-Ti 224", "vim", VIM, 384, 16, (1, 197), False, True, "mean", 128, 12),
    Shape("Vim-Ti 224", "vim", VIM, 384, 16, (1, 197), False, True, "mean", 64, 12),
    Shape("Vim-S 224", "vim", VIM, 768, 16, (1, 197), False, True, "mean", 128, 24),
    Shape("Vim-Ti 512", "vim", VIM, 384, 16, (1, 1025), False, True, "mean", 16, 12),
    Shape("Vim-Ti 1248", "vim", VIM, 384, 16, (1, 6085), False, True, "mean", 4, 12),
    Shape("Vim-Ti long", "vim", VIM, 384, 16, (1, 2048), False, True, "mean", 64, 12),
    Shape("VMamba-T stage 1", "vmamba", SS2D, 96, 1, (56, 56), True, False, "sum", 128, 6),
    Shape("VMamba-T stage 3", "vmamba", SS2D, 384, 1, (14, 14), True, False, "sum", 128, 24),
]


def token_major(batch: int, channels: int, length: int, dtype, dev: str | None = None) -> torch.Tensor:
    """A random (batch, channels, L) view of a (batch, L, channels)-contiguous tensor."""
    return torch.randn(batch, length, channels, device=dev or DEVICE, dtype=dtype).transpose(1, 2)


def make_inputs(shape: Shape, batch: int, dtype: torch.dtype, one_direction: bool = False) -> dict:
    """Model-like inputs, activations token-major; ``one_direction``: the K*C channels as one direction."""
    k, c, n, length = len(shape.directions), shape.channels, shape.dstate, shape.length
    per_channel_u = one_direction or not shape.shared_u
    groups = k
    bc = torch.randn(batch, length, groups, n, device=DEVICE, dtype=dtype).permute(0, 2, 3, 1)
    return dict(
        u=token_major(batch, k * c if per_channel_u else c, length, dtype),
        delta=token_major(batch, k * c, length, dtype) * 0.5 - 2.0,
        A=-torch.arange(1, n + 1, device=DEVICE, dtype=torch.float32).repeat(k * c, 1),
        B=bc,
        C=torch.randn_like(bc),
        D=torch.ones(k * c, device=DEVICE),
        z=token_major(batch, k * c if one_direction else c, length, dtype) if shape.gate else None,
        delta_bias=torch.rand(k * c, device=DEVICE) * 0.1,
    )


def low_rank_inputs(shape: Shape, batch: int, dtype: torch.dtype) -> dict:
    """:func:`make_inputs` with delta replaced by the low-rank step input (token-major (batch, L, K*R), as
    x_proj's output slices are) and an fp32 ``delta_proj_weight`` (K*C, R)."""
    x = make_inputs(shape, batch, dtype)
    k, c, r = len(shape.directions), shape.channels, shape.rank
    x["delta"] = token_major(batch, k * r, shape.length, dtype)
    x["delta_proj_weight"] = torch.randn(k * c, r, device=DEVICE) * r**-0.5
    return x


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def roofline_bytes(x: dict, out_numel: int) -> tuple[int, int]:
    """(forward, backward) bytes a pass must move: inputs read, outputs written (dB, dC in fp32)."""
    acts = nbytes(x["u"], x["delta"], x["z"], x["B"], x["C"])
    out = out_numel * x["u"].element_size()
    forward = acts + out
    backward = (
        acts + out + nbytes(x["u"], x["delta"], x["z"]) + 2 * nbytes(x["B"]) * 4 // x["B"].element_size()
    )
    return forward, backward


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=DEVICE)  # 256 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def timed(do_bench, fn, inputs: dict, backward: bool) -> float | None:
    """Milliseconds per call of ``fn(**inputs)`` (and its backward), or None when it runs out of memory."""
    try:
        if not backward:
            with torch.no_grad():
                return do_bench(lambda: fn(**inputs))
        leaves = {k: None if v is None else v.detach().requires_grad_(True) for k, v in inputs.items()}
        grad = torch.randn_like(fn(**leaves))

        def step():
            fn(**leaves).backward(grad)

        return do_bench(step, grad_to_none=[v for v in leaves.values() if v is not None])
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def bench_shape(shape: Shape, batch: int, dtype: torch.dtype, bandwidth: float, do_bench) -> dict:
    """Times of the fused and one-direction calls for one shape, with roofline fractions and ratios."""
    from vmamba.kernels.triton import triton_multi_direction_scan

    grid = shape.grid if shape.grid[0] > 1 else None
    k, c, length = len(shape.directions), shape.channels, shape.length

    def fused(**x):
        return triton_multi_direction_scan(
            **x, delta_softplus=True, directions=shape.directions, grid_size=grid, merge=shape.merge
        )

    def one(**x):
        return triton_multi_direction_scan(**x, delta_softplus=True, directions=("row",), merge="none")

    row = {"shape": shape.name, "batch": batch, "L": length, "K": k, "C": c, "N": shape.dstate}
    for name, fn, one_direction, out_numel in (
        ("fused", fused, False, batch * c * length),
        ("one", one, True, batch * k * c * length),
    ):
        x = make_inputs(shape, batch, dtype, one_direction)
        fwd_bytes, bwd_bytes = roofline_bytes(x, out_numel)
        fwd = timed(do_bench, fn, x, backward=False)
        both = timed(do_bench, fn, x, backward=True)
        row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fwd, both
        row[f"{name}_fwd_roofline"] = fwd_bytes / bandwidth * 1e3 / fwd if fwd else None
        row[f"{name}_fwdbwd_roofline"] = (fwd_bytes + bwd_bytes) / bandwidth * 1e3 / both if both else None
        row[f"{name}_fwdbwd_over_fwd"] = both / fwd if fwd and both else None
        del x
        torch.cuda.empty_cache()
    row["lowrank_fwd_ms"] = row["lowrank_fwdbwd_ms"] = None
    if shape.rank == LOW_RANK_TIMED:
        x = low_rank_inputs(shape, batch, dtype)
        row["lowrank_fwd_ms"] = timed(do_bench, fused, x, backward=False)
        row["lowrank_fwdbwd_ms"] = timed(do_bench, fused, x, backward=True)
        del x
        torch.cuda.empty_cache()
    for key in ("fwd", "fwdbwd"):
        low, full = row[f"lowrank_{key}_ms"], row[f"fused_{key}_ms"]
        row[f"lowrank_over_fused_{key}"] = low / full if low and full else None
    if row["fused_fwd_ms"] and row["one_fwd_ms"]:
        row["fused_over_one_fwd"] = row["fused_fwd_ms"] / row["one_fwd_ms"]
    if row["fused_fwdbwd_ms"] and row["one_fwdbwd_ms"]:
        row["fused_over_one_fwdbwd"] = row["fused_fwdbwd_ms"] / row["one_fwdbwd_ms"]
    return row


def fmt(value, spec=".2f", scale=1.0, suffix="") -> str:
    return "-" if value is None else format(value * scale, spec) + suffix


def print_table(rows: list[dict], bandwidth: float, device: str) -> None:
    """The Markdown table of ``rows`` and whether the targets are met."""
    print(f"\n{device}, bf16 token-major activations, copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print(
        "| shape | batch | L | K | fused fwd ms (% roofline) | fused fwd+bwd ms (% roofline) | fwd+bwd / fwd "
        "| one-direction fwd ms (%) | fused / one: fwd, fwd+bwd | low-rank fwd, fwd+bwd ms (/ fused) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['batch']} | {r['L']} | {r['K']} "
            f"| {fmt(r['fused_fwd_ms'], '.3f')} ({fmt(r['fused_fwd_roofline'], '.0f', 100, '%')}) "
            f"| {fmt(r['fused_fwdbwd_ms'], '.3f')} ({fmt(r['fused_fwdbwd_roofline'], '.0f', 100, '%')}) "
            f"| {fmt(r['fused_fwdbwd_over_fwd'])}x "
            f"| {fmt(r['one_fwd_ms'], '.3f')} ({fmt(r['one_fwd_roofline'], '.0f', 100, '%')}) "
            f"| {fmt(r.get('fused_over_one_fwd'))}x, {fmt(r.get('fused_over_one_fwdbwd'))}x "
            f"| {fmt(r['lowrank_fwd_ms'], '.3f')}, {fmt(r['lowrank_fwdbwd_ms'], '.3f')} "
            f"({fmt(r['lowrank_over_fused_fwd'])}x, {fmt(r['lowrank_over_fused_fwdbwd'])}x) |"
        )
    checks = [
        (
            "forward at L >= 1024 >= 60% of roofline",
            [r["one_fwd_roofline"] for r in rows if r["L"] >= 1024],
            0.6,
        ),
        (
            "forward at L < 1024 >= 30% of roofline",
            [r["one_fwd_roofline"] for r in rows if r["L"] < 1024],
            0.3,
        ),
    ]
    for what, values, target in checks:
        values = [v for v in values if v is not None]
        if values:
            print(f"{what}: worst {100 * min(values):.0f}%: {'met' if min(values) >= target else 'NOT met'}")
    for what, key, limit in (
        ("forward+backward <= 3x forward", "one_fwdbwd_over_fwd", 3.0),
        ("fused <= 1.3x one direction", "fused_over_one_fwd", 1.3),
    ):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            print(f"{what}: worst {max(values):.2f}x: {'met' if max(values) <= limit else 'NOT met'}")


# --- the compiled-code proxy (no GPU) --------------------------------------------------------------------

# Token-major activations and (batch, L, G, N) B/C: these strides are 1 at run time, and Triton's launcher
# specialises them; the others are multiples of 16 at the Vim-Ti shape.
_UNIT_STRIDES = ("su_c", "sd_c", "sz_c", "so_c", "sg_c", "sdu_c", "sdd_c", "sdz_c", "sB_n", "sC_n")


def sass_counts(kernel, constexprs: dict, num_warps: int, io: str = "bf16", arch: int = 90) -> dict:
    """Registers, spill bytes and instruction counts of ``kernel`` compiled for sm_``arch``."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    import triton

    from vmamba.kernels.triton._common import compile_for_arch

    names = kernel.arg_names
    unit = [n for n in _UNIT_STRIDES if n in names]
    divisible = [n for n in names if n.startswith("s") and n not in unit and n not in constexprs]
    compiled = compile_for_arch(kernel, constexprs, io, arch, num_warps, unit, divisible)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {
        "instructions": sum(ops.values()),
        **{op: ops[op] for op in ("SHFL", "MUFU", "BAR", "LDG", "STG", "RED", "ATOM")},
        "registers": int(found[1]),
        "stack": int(found[2]),
    }


def sass_report(arch: int) -> list[dict]:
    """The proxy table for the Vim-Ti shape (bf16, N = 16, per channel per token processed)."""
    import triton.language as tl

    from vmamba.kernels.triton._common import GPU_BWD_SUB, GPU_SUB, MAX_BLOCK_D, MAX_BWD_BLOCK_D
    from vmamba.kernels.triton.scan_bwd import _bwd_kernel, _bwd_local_kernel
    from vmamba.kernels.triton.scan_fwd import _fwd_kernel

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
    )
    fwd = dict(flags, HAS_D=True, BLOCK_D=MAX_BLOCK_D, SUB=GPU_SUB)
    bwd = dict(flags, BLOCK_D=MAX_BWD_BLOCK_D, SUB=GPU_BWD_SUB)
    runs = [
        (
            "forward",
            _fwd_kernel,
            dict(fwd, LOAD_ENTRY=False, STORE_OUT=True, STORE_END=False, STORE_DTSUM=False),
        ),
        ("backward: checkpoints", _bwd_local_kernel, dict(bwd, LOAD_ENTRY=False, LOCAL_CARRY=False)),
        ("backward: gradients", _bwd_kernel, dict(bwd, HAS_D=True, HAS_DLAST=False, LOAD_CARRY=False)),
        (
            "forward, low-rank steps (R = 12)",
            _fwd_kernel,
            dict(
                fwd, RANK=12, BLOCK_R=16, LOAD_ENTRY=False, STORE_OUT=True, STORE_END=False, STORE_DTSUM=False
            ),
        ),
    ]
    rows = []
    print(
        f"sm_{arch}, bf16 token-major, N = 16, one channel per thread; counts per token of the unrolled loop\n"
    )
    print(
        "| kernel | BLOCK_D | warps | tokens per loop step | registers | spill bytes | instructions / token "
        "| SHFL / token | MUFU / token | BAR / token |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, kernel, consts in runs:
        warps = max(1, consts["BLOCK_D"] // 32)
        counts = sass_counts(kernel, consts, warps, arch=arch)
        # One thread per channel: a loop iteration covers SUB tokens (forward) or a checkpoint's 2 * SUB.
        per = consts["SUB"] * (1 if kernel is _fwd_kernel else 2)
        row = {"kernel": name, "block_d": consts["BLOCK_D"], "warps": warps, "tokens": per, **counts}
        rows.append(row)
        print(
            f"| {name} | {consts['BLOCK_D']} | {warps} | {per} | {counts['registers']} | {counts['stack']} "
            f"| {counts['instructions'] / per:.0f} | {counts['SHFL'] / per:.0f} | {counts['MUFU'] / per:.1f} "
            f"| {counts['BAR'] / per:.1f} |",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="override every shape's batch size")
    parser.add_argument("--only", choices=("vim", "vmamba"), default=None, help="one model family")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--sass", action="store_true", help="compiled-code proxy for sm_90 (no GPU needed)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --sass (90 = H100/H200)")
    args = parser.parse_args(argv)
    if args.sass:
        rows = sass_report(args.arch)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"arch": args.arch, "rows": rows}, f, indent=2)
        return 0
    if not torch.cuda.is_available():
        print(
            "bench_scan_cuda.py needs a CUDA GPU (or --sass; the CPU backends have bench_scan.py)",
            file=sys.stderr,
        )
        return 2
    from triton.testing import do_bench

    torch.manual_seed(0)
    bandwidth = copy_bandwidth(do_bench)
    shapes = [s for s in SHAPES if args.only is None or s.family == args.only]
    device = torch.cuda.get_device_name()
    meta = {"device": device, "dtype": "bf16", "layout": "token-major", "copy_bandwidth_Bps": bandwidth}
    rows = []
    for shape in shapes:
        batch = args.batch or shape.batch
        rows.append(bench_shape(shape, batch, torch.bfloat16, bandwidth, do_bench))
        print(f"done: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        if args.json:  # rewritten after every shape, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "shapes": [asdict(s) for s in shapes], "rows": rows}, f, indent=2)
    print_table(rows, bandwidth, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
