#!/usr/bin/env bash
# The one prepared script for a lent GPU (device minutes are few: one call runs everything a
# change to attention, loss, kernels, precision or engines must be checked with on CUDA).
# Prepare here:   bash ../shared/gpu/prepare.sh --deepspeed && pip download --no-deps -d .gpu/whl liger-kernel
# Device call:    carry [".gpu"], command `bash .gpu/run.sh bash bench/gpu_session.sh`, timeout_s 590
# Each part has its own time limit (seconds, overridable) and its log goes to $OUT (when set):
#   1. the CUDA-only tests (Liger's kernels equal the plain path)          GPU_TESTS_S   (default  70)
#   2. bench/gpu_check.sh: attention probes, paths' speed, engines,
#      the same start from scratch on every engine                          GPU_CHECK_S   (default 230)
#   3. bench/gpu_speed.sh: the 1.1B peer vs tokentrain, 8B under FSDP2      GPU_SPEED_S   (default 250)
# A part that fails or runs out of time is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
PY=${PYTHON:-python3}
status=0
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    ((rc)) && status=1
    echo "== $name: exit $rc in $((SECONDS - t0)) s (limit $limit s; log $out/$name.log)"
    tail -n 40 "$out/$name.log"
}
part cuda-tests "${GPU_TESTS_S:-70}" "$PY" -m pytest -q -p no:cacheprovider tests/model/test_kernels.py
part gpu-check "${GPU_CHECK_S:-230}" env GPU_CHECK_TIMEOUT="${GPU_CHECK_S:-230}" bash bench/gpu_check.sh
speed=${GPU_SPEED_S:-250}
part gpu-speed "$speed" env GPU_SPEED_TIMEOUT="$speed" bash bench/gpu_speed.sh --budget $((speed - 15))
echo "gpu session: $([ $status = 0 ] && echo 'every part passed' || echo 'some part FAILED (see above)')"
exit $status
