#!/usr/bin/env bash
# Session 34 on the lent GPU. PART=bench: block MST's whole run against dense (as in s32/s33: one process, empty
# Triton and inductor caches, everything counted), now with the GPU's clocks, power and temperature sampled per
# method (tools/gpu_monitor.py), to see whether dense's 33.3 ms whole-run steps against 31.3 ms in profile_step
# come from the clocks (run first before and then after BlockAdamW, TAG=wholerun-s34-blockadamw). PART=kernels: the
# block-sparse quick bench with each row's floor at copy speed, and the GPU tests of BlockAdamW, MST, the bench,
# block-sparse and HSA kernels. Output under $OUT.
set -u
export TIKTOKEN_CACHE_DIR=/nonexistent WANDB_MODE=offline
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,power.limit,power.max_limit,clocks.max.sm,clocks.sm --format=csv > "$OUT/gpu.csv" 2>&1
if [ "${PART:-bench}" = kernels ]; then
  timeout 200 python -m kernels.bench_block_sparse --quick --modes graph --out "$OUT/block-sparse-quick.json" \
    2>&1 | grep -E "target|wrote|Error|error" | head -20
  timeout 330 python -m pytest -q -m gpu tests/kernels/test_block_adamw.py tests/sparsity/test_mst.py \
    tests/kernels/test_bench_block_sparse.py tests/kernels/test_block_sparse.py tests/kernels/test_hsa.py \
    tests/kernels/test_autotune.py 2>&1 | tail -5
else
  export TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
  timeout 570 python bench.py --config configs/gpt2.toml --methods dense,mst --whole-run --set mst.granularity=block \
    --set train.compile_mode=reduce-overhead --set train.batch_size=16 --set train.grad_accum=1 \
    --set train.steps="${STEPS:-6000}" --out "$OUT/bench" --tag "${TAG:-wholerun-s34}-${STEPS:-6000}" 2>&1 | tail -12
  cat "$OUT"/bench/*.md
fi
cat "$OUT/gpu.csv"
