#!/usr/bin/env bash
# Issue 16's GPU checks as one script, for a session that is lent the GPU machine (15 minutes of device
# time in all: this runs in about 8, leaving room for one re-run).
#
# From this machine, with the device tool:
#   bash bench/gpu_session.sh --vendor          # here: copies typer/rich/click... into build/gpu-vendor
#   run(command="bash bench/gpu_session.sh", carry=["build/gpu-vendor"], timeout_s=590)
# On the GPU machine nothing can be installed: the three import names point at the folders through a
# directory of links, and the pure-Python CLI libraries the device's python3 may lack come from
# build/gpu-vendor, last on the path so that the device's own versions win. The C extension is not
# built there (it is the CPU path). Results go to $OUT (the device tool brings them back).
# DEVICE=cpu bash bench/gpu_session.sh: a dry run of the script here (test_cuda on the CPU, bench_gpu --small).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [[ "${1:-}" == "--vendor" ]]; then
    site=$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -rf "$ROOT/build/gpu-vendor" && mkdir -p "$ROOT/build/gpu-vendor"
    for pkg in typer click rich pygments markdown_it mdurl shellingham; do
        cp -r "$site/$pkg" "$ROOT/build/gpu-vendor/"
    done
    du -sh "$ROOT/build/gpu-vendor"
    exit 0
fi

OUT=${OUT:-$ROOT/out/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
shim=$(mktemp -d)
ln -s "$ROOT/moge_cli" "$shim/moge_cli"
ln -s "$ROOT/kernels" "$shim/moge_kernels"
ln -s "$ROOT/converters" "$shim/moge_converters"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}:$ROOT/build/gpu-vendor"
cd "$ROOT"

step() { echo; echo "=== $* ($(date +%T))"; }
step "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1 | tee -a "$OUT/gpu.txt"
"$PY" -c 'import moge_cli, moge_kernels.ops, moge_converters.convert, typer; print("imports ok")' 2>&1 | tee -a "$OUT/gpu.txt"

step "CUDA tests"  # every test that runs on CUDA; the rest of the suite is the CPU's (CI)
tests="tests/test_cuda.py tests/test_qlinear_cuda.py tests/test_sync_free.py tests/test_kernels.py tests/test_ops.py tests/test_model.py"
MOGE_CUDA_TEST_DEVICE=$DEVICE timeout 300 "$PY" -m pytest -q -rs -p no:cacheprovider $tests -k "cuda or sync or device" 2>&1 | tee "$OUT/pytest.txt" | tail -60

step "bench_gpu"
small=$([[ $DEVICE == cpu ]] && echo --small)
timeout 240 "$PY" bench/bench_gpu.py --device "$DEVICE" $small --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt" | tail -60
step "done"
