#!/usr/bin/env bash
# One H200, second call of the session: the three Megatron oracle cases the first call's script bug skipped; throughput
# with 1 and 8 micro-batches beside the transformers baseline (after the bf16 gradient-sink change); checkpoint part 1
# (exact fp32 resume on one GPU, export loaded by transformers); Moe's TCPStore client against torch's TCPStore and torchrun.
. .gpu/common.sh
repo=$PWD
echo "== megatron oracle (3 cases)" | tee -a $OUT/run.log
mkdir -p /tmp/mlm && xz -dc .gpu/megatron.tar.xz > /tmp/mlm.tar && tar -xf /tmp/mlm.tar -C /tmp/mlm
export MEGATRON_COMMIT=$(git get-tar-commit-id < /tmp/mlm.tar 2>/dev/null || echo d98e8a64ddf34856e74b24714e3bedb2f5a39553)
MEGATRON_PATH=/tmp/mlm timeout 200 torchrun --standalone --nproc_per_node 1 .gpu/megatron_moe_oracle.py --out /tmp/oracle \
  --cases sigmoid_expert_bias group_limited group_limited_sigmoid_bias >$OUT/oracle.log 2>&1
echo "oracle exit $?" | tee -a $OUT/run.log; grep -E "^(ok|FAIL)" $OUT/oracle.log | tee -a $OUT/run.log
tar -C /tmp/oracle -czf $OUT/megatron-moe.tar.gz . 2>/dev/null
B="--model 8x7b --layers 2 --seq 4096"
for extra in "--iters 10" "--micro-batches 8 --iters 4"; do
  echo "== bench $extra" | tee -a $OUT/run.log
  timeout 200 $M bench $B $extra 2>>$OUT/run.log | tee -a $OUT/bench.jsonl
done
echo "== transformers baseline" | tee -a $OUT/run.log
timeout 200 python3 .gpu/hf_mixtral_baseline.py --model 8x7b --layers 2 --seq 4096 2>>$OUT/run.log | tee -a $OUT/bench.jsonl
echo "== checkpoint part 1" | tee -a $OUT/run.log
CKPT_PARTS=1 timeout 200 bash .gpu/checkpoint.sh >>$OUT/run.log 2>&1; echo "checkpoint exit $?" | tee -a $OUT/run.log
echo "== tcpstore" | tee -a $OUT/run.log
timeout 120 python3 .gpu/tcpstore_check.py /tmp/gpu/TcpStoreCheck/run >>$OUT/run.log 2>&1; echo "tcpstore exit $?" | tee -a $OUT/run.log
