export TIKTOKEN_CACHE_DIR=/nonexistent WANDB_MODE=offline
timeout 200 python -m tools.profile_step --config configs/gpt2.toml --methods dense,mst --at 2000 --rows 20 \
  --set mst.granularity=block --set train.compile_mode=reduce-overhead --set train.batch_size=16 \
  --set train.grad_accum=1 --set train.steps=6000 > "$OUT/profile-detach.txt" 2>&1
grep -v Warning "$OUT/profile-detach.txt" | grep -A14 "=====.*step wall"
timeout 300 python results/raw/h200-transition-probe-s33.py > "$OUT/transition.txt" 2>&1; echo rc=$?
grep -v Warn "$OUT/transition.txt" | tail -45 | cut -c1-200
