#!/usr/bin/env bash
# Session 31 on the lent GPU: the runtime-mode GPU tests, then block MST's whole run against dense (one process,
# compile and CUDA-graph recording counted), then the compile-mode GPU tests. Output under $OUT.
set -u
export TIKTOKEN_CACHE_DIR=/nonexistent WANDB_MODE=offline
mkdir -p "$OUT/bench"
timeout 120 python -m pytest -q -m gpu tests/kernels/test_hsa.py -k "causal_mode or auto_picks" 2>&1 | tail -5
timeout 400 python bench.py --config configs/gpt2.toml --methods dense,mst --whole-run --set mst.granularity=block \
  --set train.compile_mode=reduce-overhead --set train.batch_size=16 --set train.grad_accum=1 \
  --set train.steps="${STEPS:-3000}" --out "$OUT/bench" --tag "wholerun-s31-${STEPS:-3000}" 2>&1 | tail -25
timeout "${TEST_S:-150}" python -m pytest -q -m gpu tests/test_compile_modes.py -k "mst" 2>&1 | tail -8
