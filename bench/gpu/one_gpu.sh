#!/usr/bin/env bash
# One H200: Megatron-Core's MoE layer as the oracle (fixture into $OUT/megatron-moe.tar.gz), transformers parity
# and the fused kernels against ATen (checks.sh), the Mixtral-shaped recipe on one GPU (fp32 5 steps, bf16 30 steps),
# and moe bench with 1 and 8 micro-batches beside the transformers baseline.
. .gpu/common.sh
repo=$PWD
echo "== megatron oracle" | tee -a $OUT/one_gpu.log
mkdir -p /tmp/mlm && xz -dc .gpu/megatron.tar.xz > /tmp/mlm.tar && tar -xf /tmp/mlm.tar -C /tmp/mlm
export MEGATRON_COMMIT=$(git get-tar-commit-id < /tmp/mlm.tar 2>/dev/null || echo d98e8a64ddf34856e74b24714e3bedb2f5a39553)
MEGATRON_PATH=/tmp/mlm timeout 300 torchrun --standalone --nproc_per_node 1 bench/gpu/megatron_moe_oracle.py --out /tmp/oracle >$OUT/oracle.log 2>&1
echo "oracle exit $?" | tee -a $OUT/one_gpu.log; grep -E "^(ok|FAIL)" $OUT/oracle.log | tee -a $OUT/one_gpu.log
tar -C /tmp/oracle -czf $OUT/megatron-moe.tar.gz . 2>/dev/null
echo "== checks" | tee -a $OUT/one_gpu.log
timeout 240 bash .gpu/checks.sh >>$OUT/one_gpu.log 2>&1; echo "checks exit $?" | tee -a $OUT/one_gpu.log
R=/tmp/gpu/GpuRecipe/run
cd /tmp
echo "== recipe fp32 one gpu" | tee -a $OUT/one_gpu.log
timeout 240 $R train --device cuda --precision fp32 --steps 5 --metrics $OUT/recipe_fp32.jsonl --run-dir /tmp/r1 >>$OUT/one_gpu.log 2>&1; echo "exit $?" | tee -a $OUT/one_gpu.log
echo "== recipe bf16 one gpu" | tee -a $OUT/one_gpu.log
timeout 240 $R train --device cuda --steps 30 --lr 3e-4 --metrics $OUT/recipe_bf16.jsonl --run-dir /tmp/r2 >>$OUT/one_gpu.log 2>&1; echo "exit $?" | tee -a $OUT/one_gpu.log
cd $repo
B="--model 8x7b --layers 2 --seq 4096"
for extra in "--iters 10" "--micro-batches 8 --iters 4"; do
  echo "== bench $extra" | tee -a $OUT/one_gpu.log
  timeout 240 $M bench $B $extra 2>>$OUT/one_gpu.log | tee -a $OUT/bench.jsonl
done
echo "== transformers baseline" | tee -a $OUT/one_gpu.log
timeout 240 python3 .gpu/hf_mixtral_baseline.py --model 8x7b --layers 2 --seq 4096 2>>$OUT/one_gpu.log | tee -a $OUT/bench.jsonl
