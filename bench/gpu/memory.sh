#!/usr/bin/env bash
# Issue 17 on one H200, under 9 minutes: (1) a 32,768-token sequence of two 8x7B layers trained with full recompute
# (and without, to show whether it needs it); (2) what each recompute setting costs and saves at 4 layers × 8192
# tokens of 8x7B; (3) the table of shapes — 2 and 4 layers × 4096, 8192, 16,384 tokens × 8x7B and 8x22B — `moe bench`
# beside the transformers baseline (through hf_mem.py: its device memory in use, the measure `moe bench` reports as
# max_mem_gb). Every command runs under `timeout`; once 8.5 minutes have passed the rest is skipped and says so.
# Results: $OUT/memory.jsonl (one JSON line per run; ours carry "recompute"), the log in $OUT/memory.log.
. .gpu/common.sh
LIMIT=510
. .gpu/memory_common.sh
# The baseline's protocol: gradients stay in bf16 .grad as transformers keeps them (--main-grads false), like for like.
ours() { run 75 "moe $*" $M bench --iters 3 --main-grads false "$@"; }
hf()   { run 75 "hf $*" python3 .gpu/hf_mem.py --iters 3 "$@"; }

# MEMORY_PART=table skips (1) and (2) and the shapes named in MEMORY_DONE ("8x7b:2:4096 ..."): a second call's share.
if [ "${MEMORY_PART:-all}" != table ]; then
# (1) 32k tokens, two 8x7B layers.
ours --model 8x7b --layers 2 --seq 32768 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
ours --model 8x7b --layers 2 --seq 32768 --recompute-granularity selective --recompute-modules moe
ours --model 8x7b --layers 2 --seq 32768

# (2) recompute's cost and saving at 4 × 8192 of 8x7B.
for r in "" "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1" \
         "--recompute-granularity full --recompute-method block --recompute-num-layers 2" \
         "--recompute-granularity selective --recompute-modules moe" \
         "--recompute-granularity selective --recompute-modules core_attn"; do
  ours --model 8x7b --layers 4 --seq 8192 $r
done

fi

# (3) the table, both systems at every shape (ours without recompute).
for model in 8x7b 8x22b; do
  for layers in 2 4; do
    for seq in 4096 8192 16384; do
      case " ${MEMORY_DONE:-} " in *" $model:$layers:$seq "*) continue ;; esac
      ours --model $model --layers $layers --seq $seq
      hf --model $model --layers $layers --seq $seq
    done
  done
done
log "done in $SECONDS s"
