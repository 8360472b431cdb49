#!/usr/bin/env bash
# Issue 10's device checks as one script (docs/benchmarks.md, "Wan2.1-1.3B geometry on a GPU"): run on the
# GPU machine after scripts/gpu_wheels.sh here, e.g. device run `bash scripts/gpu_check.sh` with carry
# [".whl"] and timeout_s 570. Each step has its own time limit, so the script ends inside one call, and
# writes its JSON and log to $OUT (default: gpu-out/) as it goes; the cheap, most wanted steps come first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DIAGVID=(python3 -c "from diagvid.cli import main; main()")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS command...: one check, its output in $OUT/NAME.log, never longer than SECONDS
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - t0))s"
    tail -n 25 "$OUT/$name.log"
}

SUITE=${SUITE:-wan-1.3b}  # SUITE=tiny tries the script itself on a CPU in seconds
BENCH=(bench --suite "$SUITE" --random-weights --decoder tiny --repeats 3 --teacher-timed-steps 5)
step bench 110 "${DIAGVID[@]}" "${BENCH[@]}" --json "$OUT/gpu.json"
step overlap 90 "${DIAGVID[@]}" "${BENCH[@]}" --overlap-decode --json "$OUT/gpu-overlap.json"
step stream 80 "${DIAGVID[@]}" bench --suite "$SUITE" --random-weights --stream-seconds 60 \
    --json "$OUT/gpu-stream.json"
step fp8 90 "${DIAGVID[@]}" "${BENCH[@]}" --overlap-decode --fp8 --json "$OUT/gpu-fp8.json"
step tests 50 python3 -m pytest -q -p no:cacheprovider tests/test_decode_worker.py tests/test_bench.py \
    tests/model/test_fp8.py -k "cuda or gpu"
step compile 110 "${DIAGVID[@]}" "${BENCH[@]}" --overlap-decode --compile max-autotune-no-cudagraphs \
    --json "$OUT/gpu-compile.json"
ls -la "$OUT"
