#!/bin/bash
# Variants of the small recipe cut to what one hour of 2 CPU cores trains (2,800 steps of the
# small-v2 shape under bf16, about 1.25 s a step with its evaluations), run side by side on one
# GPU to find which levers move bracket counting within that budget.
#   scripts/hour_recipe_sweep.sh SHARDS OUT [DEADLINE_S] [NAME ...]
# SHARDS: the small profile's corpus tokenized here (its cspkit cache directory, copied), so that
# every machine reads the same tokens. OUT gets runs/NAME and NAME.json (cspkit eval, all tasks,
# test split). Runs still going at DEADLINE_S are stopped and left unscored.
set -u
SHARDS=$1; OUT=$2; DEADLINE=${3:-420}; shift 3 2>/dev/null || shift $#
PY=${PY:-python3}
STEPS=${STEPS:-2800}
declare -A V=(
  [base]="lr=0.006"
  [lr010]="lr=0.01"
  [lr015]="lr=0.015"
  [lr025]="lr=0.025"
  [lr010-a15]="lr=0.01 anneal_end=0.15"
  [lr010-a50]="lr=0.01 anneal_end=0.5"
  [lr010-tests]="lr=0.01 corpus_weights=[0.1,0.35,0.45,0.1]"
  [lr010-idioms]="lr=0.01 corpus_weights=[0.15,0.3,0.35,0.2]"
  [lr015-b32]="lr=0.015 batch_size=32 max_steps=$((STEPS / 2))"
  [lr010-s1]="lr=0.01 --seed 1"
  [base-s1]="lr=0.006 --seed 1"
  [lr010-a15-tests]="lr=0.01 anneal_end=0.15 corpus_weights=[0.1,0.35,0.45,0.1]"
)
NAMES=("$@"); [ ${#NAMES[@]} -eq 0 ] && NAMES=("${!V[@]}")
mkdir -p "$OUT/runs"
for n in "${NAMES[@]}"; do
  # shellcheck disable=SC2086  # each variant is a list of words
  $PY -m cspkit.cli train --profile small-v2 --out "$OUT/runs/$n" max_steps=$STEPS threads=1 \
      "corpus=[\"$SHARDS\"]" ${V[$n]} > "$OUT/runs/$n.log" 2>&1 &
done
end=$((SECONDS + DEADLINE))
while [ -n "$(jobs -rp)" ] && [ $SECONDS -lt $end ]; do sleep 5; done
kill $(jobs -rp) 2>/dev/null; wait
for n in "${NAMES[@]}"; do
  grep -q '"val_loss"' "$OUT/runs/$n/log.jsonl" 2>/dev/null || continue
  steps=$(grep -o '"max_steps": [0-9]*' "$OUT/runs/$n/config.json" | head -1 | grep -o '[0-9]*$')
  last=$(grep -o '"step": [0-9]*' "$OUT/runs/$n/log.jsonl" | tail -1 | grep -o '[0-9]*$')
  [ "$last" = "$steps" ] && $PY -m cspkit.cli eval --model "$OUT/runs/$n" --task all --split test --json \
      > "$OUT/$n.json" 2>"$OUT/$n.eval.log" &
done
wait
