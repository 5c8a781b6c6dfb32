#!/usr/bin/env bash
# Session 36 on the lent GPU: the Triton training loss (kernels/cross_entropy.py, train.loss_kernel).
# PART=kernel: its GPU tests, `bench_cross_entropy --sweep` at 16k x 50304, a profile of dense's step with it
#   (tools/profile_step.py, the kernels of the s33 profile to compare against), then the compiled GPT-2 124M step
#   (dense and block MST, reduce-overhead, B=16, one micro-batch a step) with train.loss_kernel=ref and =triton,
#   one bench process each, on one machine.
# PART=whole: block MST's whole run against dense (`make bench-wholerun`'s command, STEPS x ACCUM, empty Triton and
#   inductor caches, everything counted) with train.loss_kernel=LOSS (default triton).
# Output under $OUT.
set -u
export TIKTOKEN_CACHE_DIR=/nonexistent WANDB_MODE=offline
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
STEP=(--config configs/gpt2.toml --methods dense,mst --set mst.granularity=block
      --set train.compile_mode=reduce-overhead --set train.batch_size=16 --set train.grad_accum=1)
if [ "${PART:-kernel}" = kernel ]; then
  timeout 150 python -m pytest -q -m gpu -p no:logging tests/kernels/test_cross_entropy.py 2>&1 \
    | grep -E "^(E  |FAILED|PASSED)|passed|failed|Error" | head -30 | tee "$OUT/tests.log"
  timeout 120 python -m kernels.bench_cross_entropy --sweep --out "$OUT/ce.json" 2>&1 | tail -12
  timeout 100 python -m tools.profile_step --config configs/gpt2.toml --methods dense --rows 25 \
    --set train.compile_mode=reduce-overhead --set train.batch_size=16 --set train.grad_accum=1 \
    --set train.loss_kernel=triton > "$OUT/profile-dense-triton-loss.txt" 2>&1
  grep -v Warning "$OUT/profile-dense-triton-loss.txt" | grep -A28 "=====.*step wall"
  for loss in ref triton; do
    timeout 170 python bench.py "${STEP[@]}" --set train.loss_kernel=$loss --steps 40 --warmup 10 \
      --out "$OUT/bench" --tag "step-s36-loss-$loss" 2>&1 | tail -6
  done
else
  TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout "${BENCH_S:-480}" python bench.py \
    --config configs/gpt2.toml --methods dense,mst --whole-run --set mst.granularity=block \
    --set train.compile_mode=reduce-overhead --set train.batch_size=16 --set train.grad_accum="${ACCUM:-8}" \
    --set train.steps="${STEPS:-750}" --set train.loss_kernel="${LOSS:-triton}" \
    --out "$OUT/bench" --tag "wholerun-s36-${STEPS:-750}x${ACCUM:-8}-${LOSS:-triton}" 2>&1 \
    | grep -vE "^  step " | tail -8
fi
cat "$OUT"/bench/*.md
cat "$OUT/gpu.csv"
