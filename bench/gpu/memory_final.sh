#!/usr/bin/env bash
# Issue 17's table in one call on one H200 (about 8 minutes): at 2 and 4 layers × 4096, 8192, 16,384 tokens × 8x7B and
# 8x22B, `moe bench` (the baseline's protocol: --main-grads false, with the allocator's peaks) beside the transformers
# baseline (hf_mem.py: its tokens/s and device memory in use, the same measure); then the plan's estimate against a whole
# training step (--optimizer true) at the shapes that fit; then 32,768 tokens of two 8x7B layers with full recompute.
# One labelled JSON line per run in $OUT/memory.jsonl (memory_stats.sh's format), the log in $OUT/memory.log.
. .gpu/common.sh
LIMIT=${LIMIT:-570}
. .gpu/memory_common.sh
for model in 8x7b 8x22b; do
  for layers in 2 4; do
    for seq in 4096 8192 16384; do
      run 90 "moe $model $layers $seq" $M bench --iters 3 --main-grads false $STATS --model $model --layers $layers --seq $seq
      run 90 "hf $model $layers $seq" python3 .gpu/hf_mem.py --iters 3 --model $model --layers $layers --seq $seq
    done
  done
done
for shape in "8x7b 2 4096" "8x7b 2 8192" "8x7b 2 16384" "8x7b 4 4096" "8x7b 4 8192" "8x22b 2 4096" "8x22b 2 8192" "8x22b 2 16384" "8x7b 4 16384"; do
  set -- $shape
  run 90 "moe training step $shape" $M bench --iters 2 --optimizer true $STATS --model $1 --layers $2 --seq $3
done
run 90 "moe 8x7b 2 32768 full recompute" $M bench --iters 2 --main-grads false $STATS --model 8x7b --layers 2 --seq 32768 \
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
log "done in $SECONDS s"
