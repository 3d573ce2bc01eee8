#!/usr/bin/env bash
# `make demo`: the data path end to end on synthetic data (the trainer demo replaces this).
set -euo pipefail
cd "$(dirname "$0")/.."
TT=.venv/bin/tokentrain
OUT=demo_out
export TOKENTRAIN_CACHE="$PWD/$OUT/cache"
rm -rf "$OUT"; mkdir -p "$OUT"
$TT data synth "$OUT/data" --files 4 --documents 2000 --seed 0 --vocab-size 1000
$TT data check "$OUT/data"
$TT data stats "$OUT/data"
$TT data order --data-folder "$OUT/data" --save-folder "$OUT"
$TT data show "$OUT/data" --max-length 256 --index 0 --data-order "$OUT/data_order.txt" --json | head -c 400; echo
echo "demo data in $OUT/data"
