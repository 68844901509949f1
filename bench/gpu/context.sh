#!/usr/bin/env bash
# Two GPUs (kind nvidia-h200-x2): context parallel (issue 13 item 4) against one GPU. The Mixtral-8x7B-shaped
# bench/GpuRecipe (two layers, 1024-token packed samples with document masks) trains 5 steps in fp32 on one GPU,
# then at CP 2 and at CP 2 × EP 2 (MoE folding: the two cp ranks are also the two expert-parallel ranks); the
# losses must equal the one-GPU run's within 1e-5 relative (compare.py, "worst over all"). Then bf16 at CP 2 for
# 30 steps (the lm loss must fall) and `moe bench` beside one GPU: 8x7B shapes, 2 layers, 4096 and 8192 tokens.
# Every command has a deadline; logs and metrics land in $OUT.
. .gpu/common.sh
R=/tmp/gpu/GpuRecipe/run
A="--device cuda --precision fp32 --steps 5"
repo=$PWD; work=/tmp/work; mkdir -p $work; cd $work
run() { local name=$1; shift; echo "== $name: $*" | tee -a $OUT/context.log; "$@" >>$OUT/$name.log 2>&1; echo "exit $?" | tee -a $OUT/context.log; }

run one     timeout 420 $R train $A --metrics $OUT/one.jsonl --run-dir $work/one
run cp2     timeout 420 $R train $A --gpus 2 --cp 2 --metrics $OUT/cp2.jsonl --run-dir $work/cp2
run cp2-ep2 timeout 420 $R train $A --gpus 2 --cp 2 --ep 2 --metrics $OUT/cp2-ep2.jsonl --run-dir $work/cp2-ep2
python3 "$repo/bench/gpu/compare.py" $OUT/one.jsonl $OUT/cp2.jsonl $OUT/cp2-ep2.jsonl 2>&1 | tee -a $OUT/context.log
run bf16-cp2 timeout 420 $R train --device cuda --gpus 2 --cp 2 --steps 30 --lr 3e-4 --metrics $OUT/bf16-cp2.jsonl --run-dir $work/bf16
python3 -c "
import json; l=[json.loads(x)['lm_loss'] for x in open('$OUT/bf16-cp2.jsonl')]
print('bf16 cp2 lm_loss first 5 %.3f last 5 %.3f' % (sum(l[:5])/5, sum(l[-5:])/5))" 2>&1 | tee -a $OUT/context.log

cd "$repo"
B="--model 8x7b --layers 2"
bench() { echo "== bench $*" | tee -a $OUT/context.log; timeout 300 $M bench "$@" 2>>$OUT/bench.log | tee -a $OUT/bench.jsonl; }
bench $B --seq 4096 --iters 10
bench $B --seq 4096 --gpus 2 --cp 2 --iters 10
bench $B --seq 8192 --iters 10
bench $B --seq 8192 --gpus 2 --cp 2 --iters 10
bench $B --seq 8192 --gpus 2 --cp 2 --ep 2 --iters 10
