#!/usr/bin/env bash
# (Session 33 ran PART=bench again with TAG=wholerun-s33, after the training forward returned detached logits.)
# Session 32 on the lent GPU. PART=tests: the GPU tests of the shared autotune picks and the kernels they tune.
# PART=bench: block MST's whole run against dense (one process, everything counted) with empty Triton and inductor
# caches, as on a fresh machine. Output under $OUT.
set -u
export TIKTOKEN_CACHE_DIR=/nonexistent WANDB_MODE=offline
mkdir -p "$OUT/bench"
if [ "${PART:-bench}" = tests ]; then
  timeout 400 python -m pytest -q -m gpu tests/kernels/test_prewarm.py tests/kernels/test_autotune.py \
    tests/kernels/test_block_sparse.py tests/kernels/test_hsa.py -k "picks or autocast or dense or programmatic or causal_mode" \
    2>&1 | tail -8
else
  export TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
  timeout 560 python bench.py --config configs/gpt2.toml --methods dense,mst --whole-run --set mst.granularity=block \
    --set train.compile_mode=reduce-overhead --set train.batch_size=16 --set train.grad_accum=1 \
    --set train.steps="${STEPS:-6000}" --out "$OUT/bench" --tag "${TAG:-wholerun-s32}-${STEPS:-6000}" 2>&1 | tail -12
fi
