"""benchmarks/bench_models.py as a user runs it: one small setting, the table and the JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_models_runs_and_reports_kept_memory(tmp_path):
    """A training row has every column, the kept memory included (what the forward leaves for the
    backward, positive); an inference row leaves it empty."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--device", "cpu", "--threads", "1"]
    cmd += ["--resolutions", "224", "--groups", "vim", "--modes", "infer,train", "--repeats", "1"]
    cmd += ["--min-repeats", "1", "--warmup", "0", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| kept MiB |" in run.stdout
    rows = {(r["mode"], r["model"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {
        (mode, model)
        for mode in ("infer", "train")
        for model in ("deit_tiny_patch16_224", "vim_tiny_patch16_224")
    }
    for (mode, _), row in rows.items():
        assert row["ms"] > 0 and row["img_s"] > 0
        kept = row["kept_mib"]
        assert kept > 1 if mode == "train" else kept != kept  # NaN in inference
