#!/usr/bin/env bash
# Rebuild one model of the zoo (zoo/<dataset>/) from the bundled dataset, on this machine:
#   tokenize -> the `narrow` target (24x128) on a time budget -> HASS and PAD-Rec(HASS) drafts (6 epochs each)
#   -> their acceptance tables -> `padrec zoo pack` (16-bit weights where no checked list changes, the test
#   evaluation of what ships, the manifest) -> `padrec bench` on the packed copy (100 test users, 2 threads)
#   -> `padrec zoo add-bench` (the speed recorded in the manifest).
#
#   bash benchmarks/build_zoo.sh DATASET [TARGET_BUDGET_MIN=75]
#
# Settings (environment, defaults = the shipped models'): PRESET=narrow DRAFT_EPOCHS=6 CHECK_USERS=1000
# BENCH_USERS=100 CHAINS=8,12,16 TREE="16,4,48,cal@0.1" THREADS=2 (tiny values check the script end to end).
#
# Steps already done in runs/zoo-build/DATASET are kept (rerun to resume after an interruption). Measured on the
# 2-core CPU for Beauty: see the manifest (training minutes) and README "Model zoo". Replace a shipped model only
# for a measured improvement: git keeps every version.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:?usage: build_zoo.sh DATASET [TARGET_BUDGET_MIN]}
BUDGET=${2:-75}
RUN=${BUILD_DIR:-runs/zoo-build}/$D
P=.venv/bin/padrec
PRESET=${PRESET:-narrow}; DRAFT_EPOCHS=${DRAFT_EPOCHS:-6}; CHECK_USERS=${CHECK_USERS:-1000}
BENCH_USERS=${BENCH_USERS:-100}; CHAINS=${CHAINS:-8,12,16}; TREE=${TREE:-16,4,48,cal@0.1}; THREADS=${THREADS:-2}
TARGET="train-target --run $RUN --preset $PRESET --epochs 40 --time-budget-min $BUDGET --threads $THREADS"
HASS="train-draft --run $RUN --kind hass --epochs $DRAFT_EPOCHS --threads $THREADS"
PADREC="train-draft --run $RUN --kind padrec --base hass --name padrec-hass --epochs $DRAFT_EPOCHS --threads $THREADS"

[ -f "$RUN/run.json" ] || $P tokenize --dataset "$D" --run "$RUN"
$P $TARGET
[ -f "$RUN/drafts/hass/model.safetensors" ] || $P $HASS
[ -f "$RUN/drafts/padrec-hass/model.safetensors" ] || $P $PADREC
for d in hass padrec-hass; do
  [ -f "$RUN/drafts/$d/acceptance.json" ] || $P calibrate --run "$RUN" --draft "$d" --threads "$THREADS"
done
$P zoo pack --run "$RUN" --name "$D" --threads "$THREADS" --check-users "$CHECK_USERS" \
  --description "$D: the $PRESET target with HASS and PAD-Rec(HASS) drafts" \
  --made-by "padrec tokenize --dataset $D --run $RUN" --made-by "padrec $TARGET" \
  --made-by "padrec $HASS" --made-by "padrec $PADREC"
BENCH=${BENCH:-benchmarks/results/zoo_${D}_bench.json}
$P bench --run "zoo:$D" --drafts hass,padrec-hass --users "$BENCH_USERS" --warmup 5 --no-naive \
  --chain "$CHAINS" --tree "$TREE" --threads "$THREADS" --out "$BENCH"
$P zoo add-bench "$D" "$BENCH"
$P zoo list
