#!/usr/bin/env bash
# `make demo`: the whole path a cluster user takes, on the shipped tiny model and chat data.
#   tokenize (prompts negative, replies positive) -> check/stats/show -> copy-cfg tiny_demo
#   -> accuracy before -> tokentrain train (packing, checkpoints, samples) -> accuracy after
# Fails (exit 1) unless the model visibly learned: accuracy up by >= 30 points, loss halved.
set -euo pipefail
cd "$(dirname "$0")/.."
TT=.venv/bin/tokentrain
PY=.venv/bin/python
OUT=demo_out
export TOKENTRAIN_CACHE="$PWD/$OUT/cache" TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1/5 tokenize demo/data/chat.jsonl into InternLM format ($OUT/data)"
$TT tokenize demo/data/chat.jsonl --tokenizer demo/tiny-llama --out "$OUT/data" --workers 1
$TT data check "$OUT/data"
$TT data stats "$OUT/data"
echo "-- sample 0 as training sees it ([MASKED ...] = not trained):"
$TT data show "$OUT/data" --max-length 512 --index 0 --tokenizer demo/tiny-llama 2>/dev/null | head -4

echo "== 2/5 copy the tiny_demo config (its PART 1 points at demo/tiny-llama and $OUT/data)"
$TT copy-cfg tiny_demo "$OUT"

echo "== 3/5 accuracy of the untrained model"
$PY demo/evaluate.py --init demo/tiny-llama --seed 1024 --label "before training" --json "$OUT/before.json"

echo "== 4/5 train"
$TT train "$OUT/tiny_demo_copy.py" --work-dir "$OUT/work"

echo "== 5/5 accuracy of the trained model"
$PY demo/evaluate.py "$OUT/work/hf" --label "after training" --json "$OUT/after.json"

$PY - "$OUT" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
out, wall = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(f"{out}/work/metrics.jsonl") if l.strip()]
first, last = rows[0]["loss"], rows[-1]["loss"]
before = json.load(open(f"{out}/before.json"))["accuracy"]
after = json.load(open(f"{out}/after.json"))["accuracy"]
print(f"\ndemo done in {wall} s: loss {first:.3f} -> {last:.3f}; accuracy {before:.0%} -> {after:.0%}")
print(f"  data         {out}/data  (tokentrain data stats {out}/data)")
print(f"  config       {out}/tiny_demo_copy.py")
print(f"  checkpoints  {out}/work/checkpoints   metrics {out}/work/metrics.jsonl   samples {out}/work/generations.jsonl")
print(f"  HF model     {out}/work/hf  (AutoModelForCausalLM.from_pretrained)")
print(f"  plot         tokentrain plot {out}/work")
if not (after >= before + 0.30 and last <= 0.5 * first):
    sys.exit("demo FAILED: the model did not learn enough (see above)")
PY
