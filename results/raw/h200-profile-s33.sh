#!/usr/bin/env bash
# Session 33 on the lent GPU: where the time of a block-MST sparse-phase step goes now, against dense's
# (tools/profile_step.py at step 2000 of the 6000-step whole run's schedule, reduce-overhead). Output under $OUT.
set -u
export TIKTOKEN_CACHE_DIR=/nonexistent WANDB_MODE=offline
timeout 500 python -m tools.profile_step --config configs/gpt2.toml --methods dense,mst --at 2000 --rows 45 \
  --set mst.granularity=block --set train.compile_mode=reduce-overhead --set train.batch_size=16 \
  --set train.grad_accum=1 --set train.steps=6000 > "$OUT/profile.txt" 2>&1
echo rc=$?
grep -v Warning "$OUT/profile.txt" | grep -A48 "=====.*step wall"
