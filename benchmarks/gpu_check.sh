#!/usr/bin/env bash
# GPU checks in one call, for a machine with CUDA: the device-aware tests on the GPU, benchmarks/speed.py
# at the default setting (fp32, TF32, bf16) and at the small setting, then, where a clone of the original is in
# benchmarks/original/deepvoxels, the whole training loop and test mode against it (benchmarks/vs_original.py).
#
#     PYTHON=python3 RESULTS=/tmp/gpu benchmarks/gpu_check.sh
#
# The reference fixtures are found as the tests find them (../shared/reference or DEEPVOXELS_REFERENCE).
# Each part has its own time limit and the script goes on after a failure; the exit status is the number of
# failed parts. Logs and one JSON file per benchmark go to $RESULTS (default benchmarks/results/gpu).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-benchmarks/results/gpu}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-3}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script
mkdir -p "$RESULTS"
failed=0

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $RESULTS/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    if PYTHONUNBUFFERED=1 timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1; then
        echo "[gpu_check] $name: ok ($((SECONDS - start)) s)"
    else
        echo "[gpu_check] $name: FAILED, exit $? ($((SECONDS - start)) s); last lines:"
        tail -n 15 "$RESULTS/$name.log"
        failed=$((failed + 1))
    fi
}

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                                  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

# Parity with the original's arrays, bit-identical memory savers, fused optimizer step and the command line
# (train, validation, test) on the GPU.
part tests_cuda 240 env DEEPVOXELS_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider -rfE \
    tests/test_reference.py tests/test_performance.py tests/test_evaluation.py tests/test_geometry.py \
    tests/test_precision.py

bench() {  # bench NAME FLAGS...
    local name=$1
    shift
    part "speed_$name" 240 "$PYTHON" benchmarks/speed.py --device "$DEVICE" --iters "$ITERS" --warmup "$WARMUP" \
        --save "$RESULTS/speed_$name.json" "$@"
}
bench default_fp32
bench default_bf16 --amp bf16
bench default_tf32 --tf32
bench small_fp32 --img_sidelength 128 --grid_dim 16 --num_grid_feats 8 --nf0 8

if [ -d benchmarks/original/deepvoxels ]; then
    part vs_original 420 "$PYTHON" benchmarks/vs_original.py --device "$DEVICE" --settings ${VS_SETTINGS:-small paper} \
        --markdown --save "$RESULTS/vs_original.json"
    grep '^|' "$RESULTS/vs_original.log"
fi

for f in "$RESULTS"/speed_*.json; do
    [ -e "$f" ] && echo "$(basename "$f" .json): $(cat "$f")"
done
exit $failed
