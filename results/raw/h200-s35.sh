#!/usr/bin/env bash
# Session 35 on the lent GPU: train.compile_scope=nested (one graph whose blocks call one compiled subgraph).
# Runs the GPU tests matching TEST_K (the nested scope must train what the whole-model compile trains), then block
# MST's whole run against dense as in s32-s34 (one process per scope, empty Triton and inductor caches each,
# everything counted) for each scope in SCOPES, train.steps=STEPS of ACCUM micro-batches. Output under $OUT.
set -u
export TIKTOKEN_CACHE_DIR=/nonexistent WANDB_MODE=offline
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
if [ -n "${TEST_K:-}" ]; then
  timeout "${TEST_S:-150}" python -m pytest -q -m gpu -p no:logging tests/test_compile_modes.py -k "$TEST_K" \
    2>&1 | grep -E "^(E  |FAILED|PASSED)|passed|failed" | head -30 | tee "$OUT/tests.log"
fi
for scope in ${SCOPES:-nested}; do
  TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout "${BENCH_S:-420}" python bench.py \
    --config configs/gpt2.toml --methods dense,mst --whole-run --set mst.granularity=block \
    --set train.compile_mode=reduce-overhead --set train.batch_size=16 --set train.grad_accum="${ACCUM:-1}" \
    --set train.steps="${STEPS:-6000}" --set train.compile_scope="$scope" \
    --out "$OUT/bench" --tag "wholerun-s35-$scope-${STEPS:-6000}x${ACCUM:-1}" 2>&1 | grep -vE "^  step " | tail -8
done
cat "$OUT"/bench/*.md
cat "$OUT/gpu.csv"
