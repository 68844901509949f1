#!/usr/bin/env bash
# Throughput on one and two GPUs in one call (kind nvidia-h200-x2), beside the transformers baseline: 8x7B shapes,
# 2 layers, 4096 tokens. One GPU with 1 and with 8 micro-batches per step; data parallel 2 with 8 micro-batches,
# without and with --overlap-grad-reduce (issue 11); expert parallel 2 (all-to-all, and all-gather). Each prints one JSON line into $OUT/bench.jsonl.
. .gpu/common.sh
B="--model 8x7b --layers 2 --seq 4096"
run() { echo "== $*" | tee -a $OUT/bench.log; timeout 300 "$@" 2>>$OUT/bench.log | tee -a $OUT/bench.jsonl; }
run $M bench $B --iters 10
run $M bench $B --micro-batches 8 --iters 4
run $M bench $B --gpus 2 --micro-batches 8 --iters 4
run $M bench $B --gpus 2 --micro-batches 8 --iters 4 --overlap-grad-reduce   # issue 11: against the line above
run $M bench $B --gpus 2 --ep 2 --iters 10
run $M bench $B --gpus 2 --ep 2 --micro-batches 8 --iters 4
run $M bench $B --gpus 2 --ep 2 --dispatcher allgather --iters 10
echo "== transformers baseline" | tee -a $OUT/bench.log
timeout 300 python3 .gpu/hf_mixtral_baseline.py --model 8x7b --layers 2 --seq 4096 2>>$OUT/bench.log | tee -a $OUT/bench.jsonl
