#!/usr/bin/env bash
# Correctness on the GPU: `moe forward` with gradients against the transformers fixture, in fp32 (per-expert
# loop) and bf16 (grouped experts, our autograd node), and a 60-step bf16 TinyMixtral training run.
. .gpu/common.sh
python3 -c "from safetensors.torch import load_file, save_file; save_file({'input_ids': load_file('.gpu/fixture/expected.safetensors')['input_ids']}, '/tmp/in.safetensors')"
for dtype in float32 bfloat16; do
  echo "== forward parity $dtype cuda" | tee -a $OUT/parity.log
  $M forward --checkpoint .gpu/fixture --input /tmp/in.safetensors --output /tmp/out_$dtype.safetensors --grads --device cuda --dtype $dtype 2>&1 | tee -a $OUT/parity.log
  python3 .gpu/parity.py /tmp/out_$dtype.safetensors .gpu/fixture/expected.safetensors > /tmp/parity_$dtype.txt 2>&1
  grep -v "e-0[5-9]" /tmp/parity_$dtype.txt | tee -a $OUT/parity.log
done
# The fused SwiGLU kernels against ATen's ops (MOE_FUSED_KERNELS=0): bf16 logits and every gradient, bit for bit.
echo "== fused kernels against ATen, bf16" | tee -a $OUT/parity.log
MOE_FUSED_KERNELS=0 $M forward --checkpoint .gpu/fixture --input /tmp/in.safetensors --output /tmp/out_aten.safetensors --grads --device cuda --dtype bfloat16 2>&1 | tee -a $OUT/parity.log
python3 .gpu/same.py /tmp/out_bfloat16.safetensors /tmp/out_aten.safetensors 2>&1 | tee -a $OUT/parity.log
if [ -d /tmp/gpu/TinyMixtral ]; then
  echo "== tiny bf16 train on cuda" | tee $OUT/train.log
  /tmp/gpu/TinyMixtral/run train --steps 60 --device cuda --metrics $OUT/tiny_cuda.jsonl 2>&1 | tail -4 | tee -a $OUT/train.log
fi
