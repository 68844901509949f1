#!/usr/bin/env bash
# The throughput protocol side by side: ours twice, transformers once (through hf_mem.py, which also reads
# its device memory in use, our measure), for 8x7B and 8x22B shapes. Extra arguments go to `moe bench`.
. .gpu/common.sh
for model in 8x7b 8x22b; do
  echo "== $model" | tee -a $OUT/bench.log
  $M bench --model $model --layers 2 --seq 4096 "$@" 2>&1 | tee -a $OUT/bench.log
  python3 .gpu/hf_mem.py --model $model --layers 2 --seq 4096 2>&1 | tail -2 | tee -a $OUT/bench.log
  $M bench --model $model --layers 2 --seq 4096 "$@" 2>&1 | sed 's/^/again: /' | tee -a $OUT/bench.log
done
