#!/usr/bin/env bash
# Two GPUs (kind nvidia-h200-x2): tensor parallel 2 + sequence parallel (issue 13) against one GPU. The Mixtral-8x7B-
# shaped recipe (two layers, bench/GpuRecipe) trains 5 steps in fp32 on one GPU, then at TP 2 + SP (experts split
# with ETP = TP) and at TP 2 + SP with EP 2 × ETP 1 (MoE parallel folding); the losses must equal the one-GPU run's
# (compare.py: worst relative difference ≲ 1e-5 expected on the GPU's fp32, reduction order aside). Then bf16 at
# TP 2 + SP for 30 steps (the loss must fall), and `moe bench` per-GPU tokens/s at one GPU and TP 2 in the same call.
# Every command has a deadline; logs and metrics land in $OUT.
. .gpu/common.sh
export CUDA_DEVICE_MAX_CONNECTIONS=1   # rule MOE0904 (Megatron R035): TP on a pre-Blackwell GPU
R=/tmp/gpu/GpuRecipe/run
A="--device cuda --precision fp32 --steps 5"
repo=$PWD; work=/tmp/work; mkdir -p $work; cd $work
run() { local name=$1; shift; echo "== $name: $*" | tee -a $OUT/tensor.log; "$@" >>$OUT/$name.log 2>&1; echo "exit $?" | tee -a $OUT/tensor.log; }

run one      timeout 420 $R train $A --metrics $OUT/one.jsonl --run-dir $work/one
run tp2      timeout 420 $R train $A --gpus 2 --tp 2 --sequence-parallel true --metrics $OUT/tp2.jsonl --run-dir $work/tp2
run tp2-ep2  timeout 420 $R train $A --gpus 2 --tp 2 --sequence-parallel true --ep 2 --etp 1 --metrics $OUT/tp2-ep2.jsonl --run-dir $work/tp2-ep2
run bf16-tp2 timeout 420 $R train --device cuda --gpus 2 --tp 2 --sequence-parallel true --steps 30 --lr 3e-4 --metrics $OUT/bf16-tp2.jsonl --run-dir $work/bf16
python3 "$repo/bench/gpu/compare.py" $OUT/one.jsonl $OUT/tp2.jsonl $OUT/tp2-ep2.jsonl 2>&1 | tee -a $OUT/tensor.log
python3 -c "
import json; l=[json.loads(x)['lm_loss'] for x in open('$OUT/bf16-tp2.jsonl')]
print('bf16 tp2+sp lm_loss first 5 %.3f last 5 %.3f' % (sum(l[:5])/5, sum(l[-5:])/5))" 2>&1 | tee -a $OUT/tensor.log

# Throughput (bf16, 8x7B shapes, 2 layers, 4096 tokens): one GPU, then TP 2 + SP; one JSON line each in $OUT/bench.jsonl.
B="--model 8x7b --layers 2 --seq 4096"
brun() { echo "== $*" | tee -a $OUT/bench.log; timeout 300 "$@" 2>>$OUT/bench.log | tee -a $OUT/bench.jsonl; }
brun $M bench $B --iters 10
brun $M bench $B --gpus 2 --tp 2 --iters 10
brun $M bench $B --gpus 2 --tp 2 --micro-batches 8 --iters 4
