#!/usr/bin/env bash
# Two GPUs (kind nvidia-h200-x2): pipeline parallel (issue 13). The Mixtral-8x7B-shaped two-layer recipe
# (bench/GpuRecipe: global batch 8 of micro-batches of 1, so 8 micro-batches per step) trains 5 steps in fp32 on one
# GPU and with PP 2 (one layer per stage, Megatron's 1F1B schedule, activations and gradients over NCCL send/recv);
# the losses must equal the one-GPU run's (compare.py; CPU tests hold them within 1e-5). Then bf16 PP 2 for 30 steps
# (the loss must fall), and `moe bench` per-GPU tokens/s of one GPU and of PP 2, both with 8 micro-batches, in one
# call. Every command has a deadline; logs and metrics land in $OUT.
. .gpu/common.sh
R=/tmp/gpu/GpuRecipe/run
A="--device cuda --precision fp32 --steps 5"
repo=$PWD; work=/tmp/work; mkdir -p $work; cd $work
run() { local name=$1; shift; echo "== $name: $*" | tee -a $OUT/pipeline.log; "$@" >>$OUT/$name.log 2>&1; echo "exit $?" | tee -a $OUT/pipeline.log; }

run one      timeout 420 $R train $A --metrics $OUT/one.jsonl --run-dir $work/one
run pp2      timeout 420 $R train $A --gpus 2 --pp 2 --metrics $OUT/pp2.jsonl --run-dir $work/pp2
run bf16-pp2 timeout 420 $R train --device cuda --gpus 2 --pp 2 --steps 30 --lr 3e-4 --metrics $OUT/bf16-pp2.jsonl --run-dir $work/bf16
python3 "$repo/bench/gpu/compare.py" $OUT/one.jsonl $OUT/pp2.jsonl 2>&1 | tee -a $OUT/pipeline.log
python3 -c "
import json; l=[json.loads(x)['lm_loss'] for x in open('$OUT/bf16-pp2.jsonl')]
print('bf16 pp2 lm_loss first 5 %.3f last 5 %.3f' % (sum(l[:5])/5, sum(l[-5:])/5))" 2>&1 | tee -a $OUT/pipeline.log

B="--model 8x7b --layers 2 --seq 4096 --micro-batches 8 --iters 4"
bench() { echo "== bench $*" | tee -a $OUT/pipeline.log; timeout 300 $M bench $B "$@" 2>>$OUT/bench.log | tee -a $OUT/bench.jsonl; }
bench
bench --gpus 2 --pp 2
