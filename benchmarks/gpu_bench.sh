#!/bin/bash
# The prepared GPU check: batch-1 list-wise SD and speculative beam search of a trained run on one CUDA device.
#   bash benchmarks/gpu_bench.sh RUN_DIR OUT_DIR [USERS]
# Runs with whatever python3 holds a CUDA torch (the package from src/, no install). Each step is independent, so
# a failure in one still leaves the others' JSON in OUT_DIR.
RUN=${1:?run dir}; OUT_DIR=${2:?out dir}; USERS=${3:-100}
export PYTHONPATH="$(dirname "$0")/../src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
echo "== list-wise greedy, 10 items: AR vs HF generate vs SD chains and trees (cuda)"
python3 -m padrec bench --run "$RUN" --drafts eagle --device cuda --users "$USERS" --warmup 10 --no-naive \
    --chain 4,6,8,10 --tree "5,4,24;6,8,48" --out "$OUT_DIR/bench_list_cuda.json" 2>&1 | tr '\r' '\n' | grep -v "bench users"
echo "== top-10 beam search: plain vs speculative (strict, relaxed) (cuda)"
python3 -m padrec bench --mode beam --run "$RUN" --drafts eagle --device cuda --users $((USERS / 2)) --warmup 5 \
    --beam-k 10 --draft-beams 40 --gamma 3 --out "$OUT_DIR/bench_beam_cuda.json" 2>&1 | tr '\r' '\n' | grep -v "bench users\|users:"
echo "== the same list-wise bench on this machine's CPU, for scale"
python3 -m padrec bench --run "$RUN" --drafts eagle --device cpu --threads 4 --users 30 --warmup 5 --no-naive --no-hf \
    --chain 8 --tree "5,4,24" --out "$OUT_DIR/bench_list_cpu.json" 2>&1 | tr '\r' '\n' | grep -v "bench users"
