#!/usr/bin/env bash
# PAD-Rec(HASS) against HASS with both drafts trained on every training window (6 epochs), per dataset, on the
# targets the README names; then the per-configuration comparison table. The study script
# (benchmarks/padrec_study.py) trains its drafts on a 4000-window sample so that 40+ drafts fit in a session;
# this one is the full-training check of its conclusion.
#
#   [STEPS=6] [CHAINS=6,8,10,16] bash benchmarks/full_data_padrec.sh [RUN ...]
#
# STEPS: unrolled training steps of both drafts (default 3; other values name the drafts hass-s<STEPS> and
# padrec-hass-s<STEPS> and the JSON full_data_<dataset>_<preset>_s<STEPS>.json, which also times the three-step
# drafts when the run has them). CHAINS: chain lengths to bench
# (default 6,8,10 on the small preset, 8,10,12,14,16 on deeper ones).
#
# RUN defaults to the runs this script added to the README's table (its deep Beauty and Toys rows come from the
# commands recorded in benchmarks/results/deep_{beauty,toys}_hass_padrec*.json). Each RUN must hold a trained target (`padrec train-target`);
# drafts already trained under RUN/drafts/{hass,padrec-hass} are reused. Writes
# benchmarks/results/full_data_<dataset>_<preset>.json (+ .png) per run and prints the table of
# benchmarks/draft_gain.py. Per draft on 2 cores (measured): 13-14 min on the 24-layer Beauty target, 20-25 min
# on the small Games and Yelp targets (more training windows).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PADREC=.venv/bin/padrec
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(runs/deeper/beauty runs/quality/games runs/quality/yelp)
STEPS=${STEPS:-3}
suffix=""
[ "$STEPS" = 3 ] || suffix="-s$STEPS"
outs=()
for run in "${RUNS[@]}"; do
  [ -f "$run/target/model.safetensors" ] || { echo "no trained target in $run" >&2; exit 2; }
  for spec in "hass:--kind hass" "padrec-hass:--kind padrec --base hass"; do
    name=${spec%%:*}$suffix
    [ -f "$run/drafts/$name/model.safetensors" ] || \
      $PADREC train-draft --run "$run" ${spec#*:} --steps "$STEPS" --name "$name" --epochs 6 --threads 2
  done
  preset=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['train_config']['preset'])" "$run/target/padrec.json")
  out=benchmarks/results/full_data_$(basename "$run")_${preset}${suffix/-/_}.json
  chains=6,8,10
  [ "$preset" = small ] || chains=8,10,12,14,16
  chains=${CHAINS:-$chains}
  drafts="hass$suffix,padrec-hass$suffix"
  # with other STEPS, the three-step pair (when trained) is timed in the same process, so both pairs compare
  if [ -n "$suffix" ] && [ -f "$run/drafts/hass/model.safetensors" ] && [ -f "$run/drafts/padrec-hass/model.safetensors" ]; then
    drafts="hass,padrec-hass,$drafts"
  fi
  $PADREC bench --run "$run" --drafts "$drafts" --users 100 --warmup 5 --no-naive --no-hf \
    --chain "$chains" --tree "16,4,48,cal@0.1" --threads 2 --out "$out"
  outs+=("$out")
done
$PY benchmarks/draft_gain.py "${outs[@]}" --draft "padrec-hass$suffix" --base "hass$suffix"
