"""SSD (Mamba-2) scan speed: reference vs torch vs triton, one direction and bidirectional.

Shapes are those of Mamba-2-style vision mixers (headdim 64, dstate 64, one group) at the token counts of
a 224 image's stages (3136, 784, 196) and two longer sequences (1024, 4096). For each it times, forward and
forward+backward:

- ``reference``: the float64-capable sequential loop (CPU only, forward only, small batch: it is slow);
- ``torch``: the chunked pure-PyTorch path (``backend="torch"``);
- ``triton``: the fused Triton forward (CUDA only; its backward is autograd through the torch path);
- ``bi/one``: ``bidirectional_ssd_scan`` over ``ssd_scan`` time with the same backend (target <= 1.4x);
- on CUDA, ``% roofline``: the time to move the bytes the forward must move (x, dt, B, C, z read, y
  written) at the measured device-to-device copy bandwidth, over the measured forward time (target
  >= 50% at L >= 1024).

On CPU the backends run interleaved and the median of ``--repeats`` runs is reported; compare ratios
within one run, not absolute times across runs.

Usage::

    python benchmarks/bench_ssd.py                     # CPU: reference/torch, bidirectional ratio
    python benchmarks/bench_ssd.py --device cuda --dtype bf16 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vmamba.kernels import bidirectional_ssd_scan, ssd_scan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (name, L, nheads); headdim 64, dstate 64, one group.
SHAPES = [
    ("stage1 56x56", 3136, 2),
    ("stage2 28x28", 784, 4),
    ("stage3 14x14", 196, 8),
    ("seq 1024", 1024, 8),
    ("seq 4096", 4096, 8),
]


def make_inputs(batch, length, nheads, dtype, device, headdim=64, dstate=64):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dt)

    return dict(
        x=rnd(batch, length, nheads, headdim),
        dt=rnd(batch, length, nheads, scale=0.5, shift=-2.0, dt=torch.float32),
        A=-(torch.rand(nheads, generator=gen) * 4 + 0.5).to(device),
        B=rnd(batch, length, 1, dstate),
        C=rnd(batch, length, 1, dstate),
        D=rnd(nheads, dt=torch.float32),
        z=rnd(batch, length, nheads, headdim),
        dt_bias=rnd(nheads, dt=torch.float32),
    )


def forward_bytes(inputs) -> int:
    """Bytes the forward must move: every activation read once, y written once (parameters ignored)."""
    read = sum(inputs[k].numel() * inputs[k].element_size() for k in ("x", "dt", "B", "C", "z"))
    return read + inputs["x"].numel() * inputs["x"].element_size()


def runner(fn, inputs, backward):
    leaves = {
        k: (v.detach().requires_grad_() if backward and v.is_floating_point() else v)
        for k, v in inputs.items()
    }

    def step():
        out = fn(**leaves, dt_softplus=True)
        if backward:
            out.float().sum().backward()

    return step


def cuda_time(step) -> float:
    from triton.testing import do_bench

    return do_bench(step, warmup=10, rep=50)


def cpu_times(steps: dict, repeats: int) -> dict:
    """Median ms of each step, the steps interleaved round by round."""
    for step in steps.values():
        step()
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read plus written)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() / (ms * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="bf16 on CUDA, fp32 on CPU by default")
    parser.add_argument("--batch", type=int, default=None, help="32 on CUDA, 2 on CPU by default")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing rounds")
    parser.add_argument("--only", default=None, help="substring of the shape names to run")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    batch = args.batch or (32 if cuda else 2)
    backends = ("torch", "triton") if cuda else ("reference", "torch")
    bandwidth = copy_bandwidth() if cuda else None
    print(f"device {args.device}, {dtype}, batch {batch}, chunk {args.chunk}, headdim 64, dstate 64")
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    header = "| shape | L | heads | backend | fwd ms | fwd+bwd ms | bi/one fwd | bi/one fwd+bwd |"
    print(header + (" fwd % roofline |" if cuda else ""))
    print("|---" * (header.count("|") - 1 + cuda) + "|")
    for name, length, nheads in SHAPES:
        if args.only and args.only not in name:
            continue
        inputs = make_inputs(batch, length, nheads, dtype, args.device)
        for backend in backends:

            def one(backend=backend, **kw):
                return ssd_scan(**kw, chunk_size=args.chunk, backend=backend)

            def bi(backend=backend, **kw):
                return bidirectional_ssd_scan(**kw, chunk_size=args.chunk, backend=backend)

            variants = {"one_fwd": runner(one, inputs, False), "bi_fwd": runner(bi, inputs, False)}
            if backend != "reference":
                variants |= {"one_both": runner(one, inputs, True), "bi_both": runner(bi, inputs, True)}
            if cuda:
                t = {k: cuda_time(step) for k, step in variants.items()}
            else:
                t = cpu_times(variants, 1 if backend == "reference" else args.repeats)
            both, bi_both = "-", "-"
            if "one_both" in t:
                both, bi_both = f"{t['one_both']:.2f}", f"{t['bi_both'] / t['one_both']:.2f}x"
            row = (
                f"| {name} | {length} | {nheads} | {backend} | {t['one_fwd']:.2f} | {both} | "
                f"{t['bi_fwd'] / t['one_fwd']:.2f}x | {bi_both} |"
            )
            if cuda:
                row += f" {100 * forward_bytes(inputs) / bandwidth * 1e3 / t['one_fwd']:.0f}% |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
