#!/usr/bin/env bash
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/gpu && tar -xJf .gpu/Moe.Cli.tar.xz -C /tmp/gpu
sed -i 's#exec "$here/[^"]*"#exec "$here/moe"#' /tmp/gpu/Moe.Cli/run
M=/tmp/gpu/Moe.Cli/run
for model in 8x7b 8x22b; do
  echo "== $model" | tee -a $OUT/bench.log
  $M bench --model $model --layers 2 --seq 4096 2>&1 | tee -a $OUT/bench.log
  python3 .gpu/hf_mixtral_baseline.py --model $model --layers 2 --seq 4096 2>&1 | tail -1 | tee -a $OUT/bench.log
  $M bench --model $model --layers 2 --seq 4096 2>&1 | sed 's/^/again: /' | tee -a $OUT/bench.log
done
