#!/usr/bin/env bash
# Is PAD-Rec(HASS)'s τ difference from HASS larger than run-to-run spread, does the module help a trained head, and
# does training on the target's own lists change either?
#
#   [PARTS=seed,warm,lists] [SEED=1] [WARM_EPOCHS=2] [WARM_LR=3e-4] [LIST_USERS=10000] [CHAINS=6,8,10,16] \
#       bash benchmarks/seed_warm_padrec.sh [RUN]
#
# On one run (default runs/quality/games, the dataset where full-data PAD-Rec lost τ to HASS) that already holds
# the full-data pair hass / padrec-hass (benchmarks/full_data_padrec.sh), this trains
#   hass-seed<SEED>, padrec-hass-seed<SEED>  the same recipe (6 epochs, 3 unrolled steps) with another seed:
#                                           initialisation, batch order and validation sample change
#   hass-warm, padrec-hass-warm             both start from the trained hass and train WARM_EPOCHS more at
#                                           WARM_LR; PAD-Rec's module starts as the identity, so the pair
#                                           differs only by the module
#   hass-lists, padrec-hass-lists           the same warm start, with the target's greedy lists for LIST_USERS
#                                           training users added to the training windows (--list-train-users)
# (PARTS picks which of the three pairs to train; PARTS=seed only measures run-to-run spread), then benches the
# base pair and the trained pairs in one process (100 users, chains and the calibrated tree) and prints each
# comparison with benchmarks/draft_gain.py; benchmarks/seed_spread.py pools τ over seeds across such files. Drafts already trained are reused. Training runs one draft at a time
# on THREADS threads (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PADREC=.venv/bin/padrec
RUN=${1:-runs/quality/games}
SEED=${SEED:-1}
WARM_EPOCHS=${WARM_EPOCHS:-2}
WARM_LR=${WARM_LR:-3e-4}
LIST_USERS=${LIST_USERS:-10000}
THREADS=${THREADS:-2}
CHAINS=${CHAINS:-6,8,10,16}
PARTS=${PARTS:-seed,warm,lists}
for name in hass padrec-hass; do
  [ -f "$RUN/drafts/$name/model.safetensors" ] || { echo "$RUN has no $name draft: run benchmarks/full_data_padrec.sh $RUN first" >&2; exit 2; }
done
train() {  # name, then train-draft arguments
  local name=$1; shift
  [ -f "$RUN/drafts/$name/model.safetensors" ] || \
    $PADREC train-draft --run "$RUN" --steps 3 --name "$name" --threads "$THREADS" "$@"
}
has_part() { [[ ",$PARTS," == *",$1,"* ]]; }
drafts=(hass padrec-hass)
pairs=("padrec-hass hass")
if has_part seed; then
  train "hass-seed$SEED" --kind hass --epochs 6 --seed "$SEED"
  train "padrec-hass-seed$SEED" --kind padrec --base hass --epochs 6 --seed "$SEED"
  drafts+=("hass-seed$SEED" "padrec-hass-seed$SEED")
  pairs+=("padrec-hass-seed$SEED hass-seed$SEED" "hass-seed$SEED hass" "padrec-hass-seed$SEED padrec-hass")
fi
if has_part warm; then
  train hass-warm --kind hass --init-from hass --epochs "$WARM_EPOCHS" --lr "$WARM_LR"
  train padrec-hass-warm --kind padrec --base hass --init-from hass --epochs "$WARM_EPOCHS" --lr "$WARM_LR"
  drafts+=(hass-warm padrec-hass-warm)
  pairs+=("padrec-hass-warm hass-warm" "hass-warm hass")
fi
if has_part lists; then
  train hass-lists --kind hass --init-from hass --epochs "$WARM_EPOCHS" --lr "$WARM_LR" --list-train-users "$LIST_USERS"
  train padrec-hass-lists --kind padrec --base hass --init-from hass --epochs "$WARM_EPOCHS" --lr "$WARM_LR" \
    --list-train-users "$LIST_USERS"
  drafts+=(hass-lists padrec-hass-lists)
  pairs+=("padrec-hass-lists hass-lists")
  ! has_part warm || pairs+=("hass-lists hass-warm")
fi
preset=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['train_config']['preset'])" "$RUN/target/padrec.json")
out=benchmarks/results/seed_warm_$(basename "$RUN")_${preset}.json
if [ "$PARTS" != seed,warm,lists ]; then  # e.g. PARTS=seed SEED=2: seed_warm_<dataset>_<preset>_seed2.json
  tag=${PARTS//,/_}
  out=${out%.json}_${tag/seed/seed$SEED}.json
fi
$PADREC bench --run "$RUN" --drafts "$(IFS=,; echo "${drafts[*]}")" \
  --users 100 --warmup 5 --no-naive --no-hf --chain "$CHAINS" --tree "16,4,48,cal@0.1" --threads 2 --out "$out"
for pair in "${pairs[@]}"; do
  set -- $pair
  echo "== $1 against $2"
  $PY benchmarks/draft_gain.py "$out" --draft "$1" --base "$2"
done
