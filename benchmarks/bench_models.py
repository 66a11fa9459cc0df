"""Model benchmark: throughput (img/s) and peak memory of vmamba's models against timm's peers.

One command measures inference and a training step (forward, cross-entropy, backward, SGD step) for

- ``vim_tiny_patch16_224`` against ``deit_tiny_patch16_224`` at 224/512/1024/1248 (both built with
  ``img_size`` set to the resolution, so the position embeddings fit without resampling);
- ``vmamba_tiny_s1l8`` against ``swin_tiny_patch4_window7_224`` and ``convnext_tiny`` at 224 (plus
  ``vssd_tiny`` when that model is registered),

all in the same process, interleaved: every round times one step of each model of a group in turn, and the
medians are reported, so load from other processes hits them alike. On CUDA it runs under bf16 autocast;
on CPU in float32, once per thread count (``--threads 1,2``).

    python benchmarks/bench_models.py                       # default device, full table
    python benchmarks/bench_models.py --quick --threads 1    # CPU smoke run: 224 and 512, inference
    python benchmarks/bench_models.py --json out.json --plot docs/bench_models_cpu.png

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it
(model, optimizer state and input excluded); on CPU the rise of the process's peak resident set size
(VmHWM, reset through ``/proc/self/clear_refs``) over the resident size before one step, which moves with
the allocator's state. Kept memory (training): what one forward leaves allocated for the backward (the
graph's saved tensors and the loss), by ``torch.cuda.memory_allocated`` on CUDA and by the profiler's
memory accounting on CPU: the same on every run. Random weights,
random inputs: the numbers are about speed, not accuracy. ``vs peer`` is img/s over the first model of the
group (deit_tiny, swin_tiny) at the same setting.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import vmamba  # noqa: F401  (registers the vmamba models with timm)

VIM_GROUP = ("deit_tiny_patch16_224", "vim_tiny_patch16_224")
VMAMBA_GROUP = ("swin_tiny_patch4_window7_224", "convnext_tiny", "vmamba_tiny_s1l8", "vssd_tiny")
RESOLUTIONS = (224, 512, 1024, 1248)
CUDA_BATCH = {224: 128, 512: 32, 1024: 8, 1248: 4}


@dataclass
class Result:
    """One measured case: a model at one setting."""

    device: str
    threads: int
    mode: str
    resolution: int
    batch: int
    model: str
    ms: float
    img_s: float
    peak_mib: float
    kept_mib: float = float("nan")
    vs_peer: float = float("nan")


def _peak_rss_reset() -> int:
    """Give freed heap back to the system, reset the peak resident set size and return the current one, in
    bytes (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Case:
    """A model, its input, an optimizer and a step function for one mode."""

    def __init__(self, name: str, resolution: int, batch: int, mode: str, device: torch.device) -> None:
        kwargs = {"img_size": resolution} if name.startswith(("vim_", "deit_")) else {}
        self.name, self.mode, self.device = name, mode, device
        self.model = timm.create_model(name, pretrained=False, **kwargs).to(device)
        self.model.train(mode == "train")
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, resolution, resolution, generator=g).to(device)
        self.y = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4) if mode == "train" else None

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda")

    def step(self) -> None:
        if self.mode == "infer":
            with torch.inference_mode(), self._autocast():
                self.model(self.x)
        else:
            with self._autocast():
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    def kept_mib(self) -> float:
        """MiB one training forward leaves allocated for its backward (NaN in inference); then the backward
        runs and the gradients are dropped, without an optimizer step."""
        if self.mode != "train":
            return float("nan")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            with self._autocast():
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
            kept = torch.cuda.memory_allocated() - before
        else:
            cpu = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=cpu, profile_memory=True) as prof, self._autocast():
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
            kept = sum(event.self_cpu_memory_usage for event in prof.key_averages())
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return kept / 2**20

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.step()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        if not Path("/proc/self/clear_refs").exists():
            return float("nan")
        before = _peak_rss_reset()
        self.step()
        return max(0, _status_kib("VmHWM") * 1024 - before) / 2**20


def run_group(
    names: list[str], resolution: int, batch: int, mode: str, device: torch.device, threads: int, args
) -> list[Result]:
    """Time the models of one group at one setting, interleaved, and measure each one's peak memory."""
    cases = [Case(n, resolution, batch, mode, device) for n in names]
    for case in cases:  # warm-up (and the peak memory, measured after it)
        for _ in range(args.warmup):
            case.step()
    peaks = [case.peak_mib() for case in cases]
    kept = [case.kept_mib() for case in cases]
    times: list[list[float]] = [[] for _ in cases]
    deadline = time.perf_counter() + args.max_seconds
    for r in range(args.repeats):
        for i, case in enumerate(cases):
            times[i].append(case.timed())
        if r + 1 >= args.min_repeats and time.perf_counter() > deadline:
            break
    results = []
    for case, t, peak, k in zip(cases, times, peaks, kept):
        sec = statistics.median(t)
        results.append(
            Result(device.type, threads, mode, resolution, batch, case.name, sec * 1e3, batch / sec, peak, k)
        )
    peer = results[0].img_s
    for res in results:
        res.vs_peer = res.img_s / peer
    del cases
    return results


def machine_info(device: torch.device) -> dict[str, str]:
    """Date, CPU/GPU model, versions and git commit, for the record."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


def print_table(results: list[Result]) -> None:
    print(
        "| device | threads | mode | res | batch | model | ms/batch | img/s | peak MiB | kept MiB | vs peer |"
    )
    print("|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        kept = "-" if r.kept_mib != r.kept_mib else f"{r.kept_mib:,.1f}"  # NaN in inference
        print(
            f"| {r.device} | {r.threads} | {r.mode} | {r.resolution} | {r.batch} | {r.model} | {r.ms:,.1f} "
            f"| {r.img_s:,.3g} | {r.peak_mib:,.0f} | {kept} | {r.vs_peer:.2f}x |"
        )


def plot(results: list[Result], path: Path, title: str) -> None:
    """img/s against resolution for the Vim group, one line per model, mode and thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = sorted({(r.model, r.mode, r.threads) for r in results if r.model in VIM_GROUP})
    for model, mode, threads in lines:
        pts = sorted(
            (r.resolution, r.img_s) for r in results if (r.model, r.mode, r.threads) == (model, mode, threads)
        )
        label = f"{model.split('_patch')[0]} {mode}" + (
            f" {threads} thr" if results[0].device == "cpu" else ""
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xlabel="resolution (pixels)", ylabel="img/s", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def profile(name: str, resolution: int, device: torch.device, rows: int = 15) -> str:
    """One inference forward of ``name`` at ``resolution`` under torch.profiler: ops by self time."""
    case = Case(name, resolution, 1, "infer", device)
    case.step()  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        case.step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", default="1,2", help="CPU thread counts, comma-separated (ignored on CUDA)")
    p.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)), help="for vim_tiny vs deit_tiny")
    p.add_argument(
        "--batch", type=int, default=None, help="batch size (default: 1 on CPU, by resolution on CUDA)"
    )
    p.add_argument("--modes", default="infer,train", help="infer, train or both")
    p.add_argument("--groups", default="vim,vmamba", help="vim (vs deit) and/or vmamba (vs swin, convnext)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (fewer when --max-seconds runs out)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument(
        "--max-seconds", type=float, default=60.0, help="time budget for the rounds of one setting"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="224 and 512, inference only, 3 rounds")
    p.add_argument(
        "--profile",
        default=None,
        metavar="MODEL@RES",
        help="instead of the benchmark, profile one inference forward, e.g. vim_tiny_patch16_224@512",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results and machine info here")
    p.add_argument(
        "--plot", type=Path, default=None, help="PNG of img/s against resolution (needs matplotlib)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.modes, args.repeats, args.min_repeats = "infer", 3, 3
        if args.resolutions == p.get_default("resolutions"):
            args.resolutions = "224,512"
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here; use --device cpu")
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    if args.profile:
        name, _, res = args.profile.partition("@")
        if device.type == "cpu":
            torch.set_num_threads(threads[0])
        print(profile(name, int(res or 224), device))
        return []
    resolutions = [int(r) for r in args.resolutions.split(",")]
    modes = args.modes.split(",")
    groups = args.groups.split(",")
    registered = set(timm.list_models())
    info = machine_info(device)
    print(
        f"# {info['date']}  {info['gpu'] or info['cpu']}  torch {info['torch']}  timm {info['timm']}",
        flush=True,
    )

    settings = []
    if "vim" in groups:
        settings += [(list(VIM_GROUP), res) for res in resolutions]
    if "vmamba" in groups:
        settings.append(([n for n in VMAMBA_GROUP if n in registered], 224))
    results: list[Result] = []
    for nthreads in threads:
        if device.type == "cpu":
            torch.set_num_threads(nthreads)
        for mode in modes:
            for names, res in settings:
                batch = args.batch or (CUDA_BATCH.get(res, 8) if device.type == "cuda" else 1)
                rows = run_group(names, res, batch, mode, device, nthreads, args)
                for r in rows:
                    print(
                        f"{r.model:32s} {mode:5s} {res:5d} thr={nthreads} {r.ms:10.1f} ms {r.img_s:9.2f} img/s "
                        f"{r.peak_mib:7.0f} MiB (kept {r.kept_mib:6.1f}) {r.vs_peer:5.2f}x",
                        flush=True,
                    )
                results += rows
    print()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": [asdict(r) for r in results]}, indent=1))
    if args.plot:
        plot(results, args.plot, f"{info['gpu'] or info['cpu']}, {info['date'][:10]}")
    return results


if __name__ == "__main__":
    main()
