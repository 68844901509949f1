#!/usr/bin/env bash
# A short run for the last minutes of a device budget: bf16 and fp32 parity, fused kernels against ATen,
# then 8x7B twice and 8x22B once, each beside the transformers baseline.
. .gpu/common.sh
python3 -c "from safetensors.torch import load_file, save_file; save_file({'input_ids': load_file('.gpu/fixture/expected.safetensors')['input_ids']}, '/tmp/in.safetensors')"
for v in 1 0; do
  MOE_FUSED_KERNELS=$v $M forward --checkpoint .gpu/fixture --input /tmp/in.safetensors --output /tmp/out_$v.safetensors --grads --device cuda --dtype bfloat16 2>&1 | tail -2
done
python3 .gpu/parity.py /tmp/out_1.safetensors .gpu/fixture/expected.safetensors | tail -1
python3 .gpu/same.py /tmp/out_1.safetensors /tmp/out_0.safetensors | cut -c1-600
$M bench --model 8x7b --layers 2 --seq 4096
python3 .gpu/hf_mem.py --model 8x7b --layers 2 --seq 4096 2>&1 | tail -2
$M bench --model 8x7b --layers 2 --seq 4096
$M bench --model 8x22b --layers 2 --seq 4096
python3 .gpu/hf_mixtral_baseline.py --model 8x22b --layers 2 --seq 4096 2>&1 | tail -1
