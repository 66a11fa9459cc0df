"""Selective-scan speed on a CUDA GPU: the Triton kernels against the pure-PyTorch path and the roofline.

For the Vim-Tiny/Small and VMamba-Tiny scan shapes it times, forward and forward+backward:

- ``fused``: the K directions in one launch (:func:`vmamba.kernels.triton.triton_multi_direction_scan`);
- ``single``: one single-direction ``selective_scan(backend="triton")`` call on tensors of the same size
  (K*C channels, K groups), the cost the fused call is held to (target: fused <= 1.3x single);
- ``unfused``: ``multi_direction_selective_scan(backend="triton")`` (torch reorders, then one scan);
- ``torch``: ``multi_direction_selective_scan(backend="torch")``, the pure-PyTorch path.

The roofline is the time to move the bytes the forward must move (u, delta, z read; y written; B and C
read once per group) at the copy bandwidth measured on this GPU (a device-to-device copy; bytes read +
written per second). Target: the single-direction forward at >= 60% of its roofline for L >= 1024.

``--registers`` needs no GPU: it compiles the kernels for sm_90 with Triton's bundled ptxas, for the
block sizes the autotuner would try on each shape, and prints registers and spill (stack) bytes per
thread, which is how the candidate tile sizes were chosen.

Usage::

    python benchmarks/bench_scan_cuda.py                 # all shapes, bf16 activations, fp32 weights
    python benchmarks/bench_scan_cuda.py --batch 64 --dtype fp32 --only vim --json results.json
    python benchmarks/bench_scan_cuda.py --registers --only vmamba
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1]


VIM = ("forward", "backward")
SS2D = ("row", "col", "row_reversed", "col_reversed")
# Vim: d_inner = 2 * embed_dim, N = 16, z shared by both directions, directions averaged (if_divide_out).
# VMamba-T (vmamba_tiny_s1l8): d_inner = stage width, N = 1, four directions, no gate, summed.
SHAPES = [
    Shape("Vim-Ti 224 (L=197)", "vim", VIM, 384, 16, (1, 197), False, True, "mean", 128),
    Shape("Vim-Ti+ stride 8 (L=730)", "vim", VIM, 384, 16, (1, 730), False, True, "mean", 64),
    Shape("Vim-S 224 (L=197)", "vim", VIM, 768, 16, (1, 197), False, True, "mean", 128),
    Shape("Vim-S+ stride 8 (L=730)", "vim", VIM, 768, 16, (1, 730), False, True, "mean", 64),
    Shape("Vim-Ti long (L=2048)", "vim", VIM, 384, 16, (1, 2048), False, True, "mean", 64),
    Shape("Vim-S long (L=4096)", "vim", VIM, 768, 16, (1, 4096), False, True, "mean", 64),
    Shape("VMamba-T stage 1 (56x56)", "vmamba", SS2D, 96, 1, (56, 56), True, False, "sum", 128),
    Shape("VMamba-T stage 2 (28x28)", "vmamba", SS2D, 192, 1, (28, 28), True, False, "sum", 128),
    Shape("VMamba-T stage 3 (14x14)", "vmamba", SS2D, 384, 1, (14, 14), True, False, "sum", 128),
    Shape("VMamba-T stage 4 (7x7)", "vmamba", SS2D, 768, 1, (7, 7), True, False, "sum", 128),
]


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def make_inputs(shape: Shape, batch: int, dtype: torch.dtype, dev: str = "cuda") -> dict:
    """Model-like inputs: activations in ``dtype``, A, D, delta_bias in float32 (as under AMP)."""
    k, c, n, length = len(shape.directions), shape.channels, shape.dstate, shape.length
    return dict(
        u=torch.randn(batch, c if shape.shared_u else k * c, length, device=dev, dtype=dtype),
        delta=(torch.randn(batch, k * c, length, device=dev) * 0.5 - 2.0).to(dtype),
        A=-torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(k * c, 1),
        B=torch.randn(batch, k, n, length, device=dev, dtype=dtype),
        C=torch.randn(batch, k, n, length, device=dev, dtype=dtype),
        D=torch.ones(k * c, device=dev),
        z=torch.randn(batch, c, length, device=dev, dtype=dtype) if shape.gate else None,
        delta_bias=torch.rand(k * c, device=dev) * 0.1,
    )


def single_inputs(inputs: dict, shape: Shape) -> dict:
    """The same sizes as one single-direction scan over all K*C channels (u and z per channel)."""
    k = len(shape.directions)
    out = dict(inputs)
    if shape.shared_u:
        out["u"] = inputs["u"].repeat(1, k, 1)
    if inputs["z"] is not None:
        out["z"] = inputs["z"].repeat(1, k, 1)
    return out


def forward_bytes(inputs: dict, out_numel: int) -> int:
    """Bytes the forward must move: u, delta, z read, B and C read once per group, y written."""
    read = sum(
        inputs[k].numel() * inputs[k].element_size()
        for k in ("u", "delta", "B", "C", "z")
        if inputs[k] is not None
    )
    return read + out_numel * inputs["u"].element_size()


def timed(do_bench, fn, inputs: dict, backward: bool) -> float | None:
    """Milliseconds per call of ``fn(**inputs)`` (and its backward), or None when it runs out of memory."""
    try:
        if not backward:
            with torch.no_grad():
                return do_bench(lambda: fn(**inputs))
        leaves = {k: None if v is None else v.detach().requires_grad_(True) for k, v in inputs.items()}
        probe = fn(**leaves)
        grad = torch.randn_like(probe)
        del probe

        def step():
            fn(**leaves).backward(grad)

        return do_bench(step, grad_to_none=[v for v in leaves.values() if v is not None])
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def bench_shape(shape: Shape, batch: int, dtype: torch.dtype, bandwidth: float, do_bench, dev="cuda") -> dict:
    """Times of every variant for one shape, with the roofline fractions and the fused/single ratios."""
    from vmamba.kernels import multi_direction_selective_scan, selective_scan
    from vmamba.kernels.triton import triton_multi_direction_scan

    inputs = make_inputs(shape, batch, dtype, dev)
    single = single_inputs(inputs, shape)
    grid = shape.grid if shape.grid[0] > 1 else None
    kw = dict(directions=shape.directions, grid_size=grid, merge=shape.merge)

    def fused(**x):
        return triton_multi_direction_scan(**x, delta_softplus=True, **kw)

    def unfused(**x):
        return multi_direction_selective_scan(**x, delta_softplus=True, backend="triton", **kw)

    def torch_path(**x):
        return multi_direction_selective_scan(**x, delta_softplus=True, backend="torch", **kw)

    def one_call(**x):
        return selective_scan(**x, delta_softplus=True, backend="triton")

    row = {"shape": shape.name, "batch": batch, "L": shape.length, "K": len(shape.directions)}
    for name, fn, x in (
        ("single", one_call, single),
        ("fused", fused, inputs),
        ("unfused", unfused, inputs),
        ("torch", torch_path, inputs),
    ):
        row[f"{name}_fwd_ms"] = timed(do_bench, fn, x, backward=False)
        row[f"{name}_fwdbwd_ms"] = timed(do_bench, fn, x, backward=True)
    k, c = len(shape.directions), shape.channels
    merged_numel = batch * c * shape.length
    row["single_roofline_ms"] = forward_bytes(single, batch * k * c * shape.length) / bandwidth * 1e3
    row["fused_roofline_ms"] = forward_bytes(inputs, merged_numel) / bandwidth * 1e3
    row["single_fwd_roofline_frac"] = row["single_roofline_ms"] / row["single_fwd_ms"]
    row["fused_fwd_roofline_frac"] = row["fused_roofline_ms"] / row["fused_fwd_ms"]
    row["fused_over_single_fwd"] = row["fused_fwd_ms"] / row["single_fwd_ms"]
    row["fused_over_single_fwdbwd"] = row["fused_fwdbwd_ms"] / row["single_fwdbwd_ms"]
    return row


def fmt(value, spec=".2f") -> str:
    """A number for the table, or OOM for a run that did not fit."""
    return "OOM" if value is None else format(value, spec)


def print_table(rows: list[dict], bandwidth: float, device: str, dtype: str) -> None:
    """The Markdown table of ``rows`` and whether the two targets are met."""
    print(f"\n{device}, activations {dtype}, copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print(
        "| shape | batch | K | fwd ms: fused / single / unfused / torch | fwd+bwd ms: fused / single / unfused / torch "
        "| single fwd % roofline | fused fwd % roofline | fused/single fwd, fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fwd = " / ".join(fmt(r[f"{n}_fwd_ms"]) for n in ("fused", "single", "unfused", "torch"))
        both = " / ".join(fmt(r[f"{n}_fwdbwd_ms"]) for n in ("fused", "single", "unfused", "torch"))
        print(
            f"| {r['shape']} | {r['batch']} | {r['K']} | {fwd} | {both} | {100 * r['single_fwd_roofline_frac']:.0f}% "
            f"| {100 * r['fused_fwd_roofline_frac']:.0f}% | {r['fused_over_single_fwd']:.2f}x, "
            f"{fmt(r['fused_over_single_fwdbwd'])}x |"
        )
    long = [r for r in rows if r["L"] >= 1024]
    if long:
        worst = min(r["single_fwd_roofline_frac"] for r in long)
        print(
            f"\nforward at L >= 1024: worst {100 * worst:.0f}% of roofline (target >= 60%): "
            f"{'met' if worst >= 0.6 else 'NOT met'}"
        )
    ratio = max(r["fused_over_single_fwd"] for r in rows)
    print(
        f"fused K-direction forward vs one single-direction call: worst {ratio:.2f}x (target <= 1.3x): "
        f"{'met' if ratio <= 1.3 else 'NOT met'}"
    )


def _resource_usage(kernel, constexprs: dict, num_warps: int, io: str, arch: int) -> tuple[int, int]:
    """(registers, stack bytes) per thread of ``kernel`` compiled for sm_``arch`` (no GPU needed)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    from vmamba.kernels.triton._common import compile_for_arch

    compiled = compile_for_arch(kernel, constexprs, io, arch=arch, num_warps=num_warps)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        listing = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", listing)
    return (int(found[1]), int(found[2])) if found else (-1, -1)


def register_report(shapes: list[Shape], dtype: str, arch: int) -> None:
    """Registers and spills of the autotuner's candidate configs for each shape's forward and backward."""
    import triton
    import triton.language as tl

    from vmamba.kernels.triton._common import backward_configs, config_pruner, forward_configs, state_chunk
    from vmamba.kernels.triton.scan_bwd import _scan_bwd_kernel
    from vmamba.kernels.triton.scan_fwd import _scan_fwd_kernel

    io = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[dtype]
    print(
        f"sm_{arch}, activations {dtype}: registers / stack bytes per thread of each autotuning candidate\n"
    )
    print("| shape | kernel | BLOCK_D | CHUNK | warps | registers | stack |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        block_n = triton.next_power_of_2(shape.dstate)
        flags = dict(
            BLOCK_N=block_n,
            MATH=tl.float32,
            HAS_D=True,
            HAS_Z=shape.gate,
            HAS_BIAS=True,
            SOFTPLUS=True,
            HAS_DIRS=True,
        )
        chunk = state_chunk(shape.length)
        runs = [
            ("forward", _scan_fwd_kernel, c, dict(STORE_OUT=True, STORE_LAST=False, STORE_STATES=False))
            for c in config_pruner(8)(forward_configs(True), {"dpg": shape.channels}, BLOCK_N=block_n)
        ]
        runs += [
            ("backward", _scan_bwd_kernel, c, dict(HAS_DLAST=False, CHUNK=chunk))
            for c in config_pruner(4)(
                backward_configs(), {"dpg": shape.channels}, BLOCK_N=block_n, CHUNK=chunk
            )
        ]
        for kind, kernel, config, extra in runs:
            consts = dict(flags, **extra, **config.kwargs)
            regs, stack = _resource_usage(kernel, consts, config.num_warps, io, arch)
            print(
                f"| {shape.name} | {kind} | {consts['BLOCK_D']} | {consts['CHUNK']} | {config.num_warps} | {regs} "
                f"| {stack} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="override every shape's batch size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    parser.add_argument("--only", choices=("vim", "vmamba"), default=None, help="one model family")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--registers", action="store_true", help="compile-only resource report (no GPU needed)"
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --registers (90 = H100)")
    args = parser.parse_args(argv)
    if args.registers:
        seen, shapes = set(), []
        for shape in SHAPES:  # one row group per (family, N): the other sizes leave the candidates alike here
            key = (shape.family, shape.dstate)
            if (args.only is None or shape.family == args.only) and key not in seen:
                seen.add(key)
                shapes.append(shape)
        register_report(shapes, args.dtype, args.arch)
        return 0
    if not torch.cuda.is_available():
        print(
            "bench_scan_cuda.py needs a CUDA GPU (the CPU backends have their own benchmark)", file=sys.stderr
        )
        return 2
    from triton.testing import do_bench

    torch.manual_seed(0)
    bandwidth = copy_bandwidth(do_bench)
    rows = []
    for shape in SHAPES:
        if args.only and shape.family != args.only:
            continue
        batch = args.batch or shape.batch
        rows.append(bench_shape(shape, batch, DTYPES[args.dtype], bandwidth, do_bench))
        print(f"done: {shape.name}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    print_table(rows, bandwidth, device, args.dtype)
    if args.json:
        with open(args.json, "w") as f:
            meta = {"device": device, "dtype": args.dtype, "copy_bandwidth_Bps": bandwidth}
            json.dump({"meta": meta, "shapes": [asdict(s) for s in SHAPES], "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
