#!/usr/bin/env bash
# The one prepared GPU check: every `gpu`-marked test and the GPU benchmarks, in one call.
#
#   bash benchmarks/gpu_check.sh prepare   # here (CPU machine with PyPI): wheels into .whl/
#   bash benchmarks/gpu_check.sh run       # there (bare GPU machine, no registry), e.g. through the
#                                          # device tool with carry [".whl"]; results under $OUT
#
# `prepare` downloads the packages the GPU machine lacks (../shared/GPU.md lists them) as CPython 3.12
# manylinux wheels and builds this project's wheel, all into .whl/ (git-ignored, about 15 MB). `run`
# installs them with --no-index into /tmp/site, then runs each stage with its own time bound and writes
# its output as it goes, so a stage cut short still reports. At most 8 files come back from $OUT, so each
# stage writes one log (and the benchmarks one JSON each). Budget: under 8 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
wheels="$repo/.whl"

prepare() {
    rm -rf "$wheels" && mkdir -p "$wheels"
    # Pinned to the versions seen to work there (../shared/GPU.md).
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$wheels" \
        timm==1.0.31 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 stringzilla==5.3.2 \
        simsimd==6.5.16 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
    python3 -m pip wheel -q --no-deps -w "$wheels" "$repo"
    du -sh "$wheels"
}

run() {
    local out="${OUT:-$repo/gpu_check_out}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    local t0=$SECONDS
    stage() {  # stage NAME SECONDS COMMAND...: one log per stage, bounded, never aborts the script
        local name=$1 limit=$2
        shift 2
        echo "== $name (limit ${limit}s, t=$((SECONDS - t0))s)" | tee -a "$out/summary.txt"
        (cd /tmp && timeout "$limit" "$@") >"$out/$name.log" 2>&1
        local rc=$?
        echo "   $name: exit $rc after $((SECONDS - t0))s" | tee -a "$out/summary.txt"
        tail -n 3 "$out/$name.log" | sed 's/^/   | /' >>"$out/summary.txt"
    }
    {
        date -u
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    } >"$out/summary.txt" 2>&1
    [ -d "$wheels" ] || { echo "no .whl/: run 'prepare' here and carry .whl" | tee -a "$out/summary.txt"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/*.whl >>"$out/summary.txt" 2>&1 || { echo "wheel install failed" >>"$out/summary.txt"; exit 2; }
    export PYTHONPATH=/tmp/site
    # Run from /tmp so the installed package, not the source tree, is imported.
    stage gpu_tests 240 python3 -m pytest "$repo/tests" -m gpu -q -p no:cacheprovider -rs
    stage bench_scan 90 python3 "$repo/benchmarks/bench_scan_cuda.py" --json "$out/bench_scan.json"
    stage bench_models 120 python3 "$repo/benchmarks/bench_models.py" --device cuda --json "$out/bench_models.json"
    if [ -f "$repo/benchmarks/bench_ssd.py" ]; then
        stage bench_ssd 45 python3 "$repo/benchmarks/bench_ssd.py" --device cuda
    fi
    echo "done in $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
