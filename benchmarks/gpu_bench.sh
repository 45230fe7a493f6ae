#!/bin/bash
# The prepared GPU check: batch-1 list-wise SD (chains, draft-scored and calibrated trees), PAD-Rec vs its base,
# and (BEAM=1) speculative beam search of a trained run on one CUDA device.
#   bash benchmarks/gpu_bench.sh RUN_DIR OUT_DIR [USERS]
# Runs with whatever python3 holds a CUDA torch (the package from src/, no install). Each step is independent, so
# a failure in one still leaves the others' JSON in OUT_DIR. Calibrated trees use the drafts' acceptance.json
# (fit them beforehand with `padrec calibrate`, or bench fits them first on the GPU).
RUN=${1:?run dir}; OUT_DIR=${2:?out dir}; USERS=${3:-100}
export PYTHONPATH="$(dirname "$0")/../src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
TREES="5,4,24;8,2,12,cal;12,2,16,cal;12,3,24,cal;12,4,32,cal;16,4,48,cal;16,4,48,cal@0.1"
echo "== list-wise greedy, 10 items: AR vs HF generate vs SD chains, draft-scored and calibrated trees (cuda)"
python3 -m padrec bench --run "$RUN" --drafts eagle --device cuda --users "$USERS" --warmup 10 --no-naive \
    --chain 6,8,10 --tree "$TREES" --out "$OUT_DIR/bench_list_cuda.json" 2>&1 | tr '\r' '\n' | grep -v "bench users"
if [ -n "$PADREC_DRAFTS" ]; then
  echo "== PAD-Rec vs its base draft ($PADREC_DRAFTS), chain and calibrated tree (cuda)"
  python3 -m padrec bench --run "$RUN" --drafts "$PADREC_DRAFTS" --device cuda --users "$USERS" --warmup 10 --no-naive \
      --no-hf --chain 8 --tree "16,4,48,cal" --out "$OUT_DIR/bench_padrec_cuda.json" 2>&1 | tr '\r' '\n' | grep -v "bench users"
fi
if [ -n "$BEAM" ]; then
  echo "== top-10 beam search: plain vs speculative (strict, relaxed) (cuda)"
  python3 -m padrec bench --mode beam --run "$RUN" --drafts eagle --device cuda --users $((USERS / 2)) --warmup 5 \
      --beam-k 10 --draft-beams 40 --gamma 3 --out "$OUT_DIR/bench_beam_cuda.json" 2>&1 | tr '\r' '\n' | grep -v "bench users\|users:"
fi
