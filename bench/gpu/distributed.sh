#!/usr/bin/env bash
# Two GPUs (kind nvidia-h200-x2): the distributed runtime against one GPU. A Mixtral-8x7B-shaped model (two layers,
# bench/GpuRecipe) trains 5 steps in fp32 on one GPU, then on two GPUs launched three ways — by `train` itself,
# by torchrun --no-python, and as two one-GPU "nodes" started with Slurm's variables by hand — in data parallel,
# then in expert parallel 2; the losses must equal the one-GPU run's (compare.py). Then bf16 with EP 2 for 30 steps
# (the loss must fall). Every command has a deadline; logs and metrics land in $OUT.
. .gpu/common.sh
R=/tmp/gpu/GpuRecipe/run
A="--device cuda --precision fp32 --steps 5"
repo=$PWD; work=/tmp/work; mkdir -p $work; cd $work
run() { local name=$1; shift; echo "== $name: $*" | tee -a $OUT/distributed.log; "$@" >>$OUT/$name.log 2>&1; echo "exit $?" | tee -a $OUT/distributed.log; }

run one   timeout 420 $R train $A --metrics $OUT/one.jsonl --run-dir $work/one
run dp2   timeout 420 $R train $A --gpus 2 --metrics $OUT/dp2.jsonl --run-dir $work/dp2
export MOE_RENDEZVOUS_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
run torchrun timeout 420 torchrun --no-python --standalone --nproc_per_node 2 $R train $A --gpus 2 --metrics $OUT/torchrun.jsonl --run-dir $work/torchrun
echo "== slurm-by-hand: two one-GPU nodes" | tee -a $OUT/distributed.log
for r in 0 1; do
  SLURM_PROCID=$r SLURM_NTASKS=2 SLURM_LOCALID=0 SLURM_JOB_NODELIST=localhost MASTER_ADDR=127.0.0.1 MASTER_PORT=29617 CUDA_VISIBLE_DEVICES=$r \
    timeout 420 $R train $A --gpus 2 --metrics $OUT/slurm.jsonl --run-dir $work/slurm >$OUT/slurm-$r.log 2>&1 &
done
wait; echo "slurm exits done" | tee -a $OUT/distributed.log
unset MOE_RENDEZVOUS_SECRET
run ep2   timeout 420 $R train $A --gpus 2 --ep 2 --metrics $OUT/ep2.jsonl --run-dir $work/ep2
run bf16-ep2 timeout 420 $R train --device cuda --gpus 2 --ep 2 --steps 30 --lr 3e-4 --metrics $OUT/bf16-ep2.jsonl --run-dir $work/bf16
python3 "$repo/bench/gpu/compare.py" $OUT/one.jsonl $OUT/dp2.jsonl $OUT/torchrun.jsonl $OUT/slurm.jsonl $OUT/ep2.jsonl 2>&1 | tee -a $OUT/distributed.log
python3 -c "
import json; l=[json.loads(x)['lm_loss'] for x in open('$OUT/bf16-ep2.jsonl')]
print('bf16 ep2 lm_loss first 5 %.3f last 5 %.3f' % (sum(l[:5])/5, sum(l[-5:])/5))" 2>&1 | tee -a $OUT/distributed.log
