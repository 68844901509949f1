#!/usr/bin/env bash
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/gpu && tar -xJf .gpu/Moe.Cli.tar.xz -C /tmp/gpu && tar -xJf .gpu/TinyMixtral.tar.xz -C /tmp/gpu
sed -i 's#exec "$here/[^"]*"#exec "$here/moe"#' /tmp/gpu/Moe.Cli/run
M=/tmp/gpu/Moe.Cli/run
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "from safetensors.torch import load_file, save_file; save_file({'input_ids': load_file('.gpu/fixture/expected.safetensors')['input_ids']}, '/tmp/in.safetensors')"
echo "== forward parity fp32 cuda" | tee $OUT/parity.log
$M forward --checkpoint .gpu/fixture --input /tmp/in.safetensors --output /tmp/out.safetensors --grads --device cuda --dtype float32 2>&1 | tee -a $OUT/parity.log
python3 .gpu/parity.py /tmp/out.safetensors .gpu/fixture/expected.safetensors 2>&1 | tail -4 | tee -a $OUT/parity.log
echo "== bench 8x7b" | tee $OUT/bench.log
$M bench --model 8x7b --layers 2 --seq 4096 2>&1 | tee -a $OUT/bench.log
python3 .gpu/hf_mixtral_baseline.py --model 8x7b --layers 2 --seq 4096 2>&1 | tail -1 | tee -a $OUT/bench.log
echo "== bench 8x22b" | tee -a $OUT/bench.log
$M bench --model 8x22b --layers 2 --seq 4096 2>&1 | tee -a $OUT/bench.log
python3 .gpu/hf_mixtral_baseline.py --model 8x22b --layers 2 --seq 4096 2>&1 | tail -1 | tee -a $OUT/bench.log
echo "== tiny bf16 train on cuda" | tee $OUT/train.log
sed -i "s%exec \"\$here/[^\"]*\"%exec \"\$here/TinyMixtral\"%" /tmp/gpu/TinyMixtral/run; /tmp/gpu/TinyMixtral/run train --steps 60 --device cuda --metrics $OUT/tiny_cuda.jsonl 2>&1 | tail -4 | tee -a $OUT/train.log
