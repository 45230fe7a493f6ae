#!/usr/bin/env bash
# Rebuild one model of the zoo (zoo/<dataset>/) from the bundled dataset, on this machine:
#   tokenize -> the `narrow` target (24x128) on a time budget -> HASS and PAD-Rec(HASS) drafts (6 epochs each)
#   -> their acceptance tables -> `padrec zoo pack` (16-bit weights where no checked list changes, the test
#   evaluation of what ships, the manifest) -> `padrec bench` on the packed copy (100 test users, 2 threads)
#   -> `padrec zoo add-bench` (the speed recorded in the manifest).
#
#   bash benchmarks/build_zoo.sh DATASET [TARGET_BUDGET_MIN=75]
#
# Steps already done in runs/zoo-build/DATASET are kept (rerun to resume after an interruption). Measured on the
# 2-core CPU for Beauty: see the manifest (training minutes) and README "Model zoo". Replace a shipped model only
# for a measured improvement: git keeps every version.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:?usage: build_zoo.sh DATASET [TARGET_BUDGET_MIN]}
BUDGET=${2:-75}
RUN=runs/zoo-build/$D
P=.venv/bin/padrec
TARGET="train-target --run $RUN --preset narrow --epochs 40 --time-budget-min $BUDGET --threads 2"
HASS="train-draft --run $RUN --kind hass --epochs 6 --threads 2"
PADREC="train-draft --run $RUN --kind padrec --base hass --name padrec-hass --epochs 6 --threads 2"

[ -f "$RUN/run.json" ] || $P tokenize --dataset "$D" --run "$RUN"
$P $TARGET
[ -f "$RUN/drafts/hass/model.safetensors" ] || $P $HASS
[ -f "$RUN/drafts/padrec-hass/model.safetensors" ] || $P $PADREC
for d in hass padrec-hass; do
  [ -f "$RUN/drafts/$d/acceptance.json" ] || $P calibrate --run "$RUN" --draft "$d" --threads 2
done
$P zoo pack --run "$RUN" --name "$D" --threads 2 \
  --description "$D: the narrow 24x128 target with HASS and PAD-Rec(HASS) drafts" \
  --made-by "padrec tokenize --dataset $D --run $RUN" --made-by "padrec $TARGET" \
  --made-by "padrec $HASS" --made-by "padrec $PADREC"
BENCH=benchmarks/results/zoo_${D}_bench.json
$P bench --run "zoo:$D" --drafts hass,padrec-hass --users 100 --warmup 5 --no-naive \
  --chain 8,12,16 --tree "16,4,48,cal@0.1" --threads 2 --out "$BENCH"
$P zoo add-bench "$D" "$BENCH"
$P zoo list
