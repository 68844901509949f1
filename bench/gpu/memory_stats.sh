#!/usr/bin/env bash
# Issue 17, where the memory goes (one H200, under 9.5 minutes): (0) allocator_abi.sh checks, from the host's PyTorch
# headers, the allocator layout `moe bench --allocator-stats` reads; (1) at the shapes where Moe held more than transformers
# and around them, both systems' allocator peaks per phase (ours `--allocator-stats`, theirs `hf_phases.py`), the
# baseline's protocol; (2) with MEMORY_STATS_PART=calibrate instead, the plan's estimate against a whole training step
# (`--optimizer true`, fp32 main gradients) at the benchmark shapes that fit; (3) the 8x22B 4-layer shapes of the table.
# One labelled JSON line per run in $OUT/memory.jsonl, the log in $OUT/memory.log.
. .gpu/common.sh
LIMIT=${LIMIT:-560}
. .gpu/memory_common.sh
ours() { run 90 "moe $*" $M bench --iters 3 $STATS "$@"; }
part=${MEMORY_STATS_PART:-phases}
# MEMORY_STATS_PART=both runs ours of (1) and (3) (OURS_ONLY=1: transformers' were measured in an earlier call), then (2).
if [ "$part" = phases ] || [ "$part" = both ]; then
  for shape in "8x7b 4 8192" "8x7b 2 8192" "8x22b 2 8192" "8x7b 4 4096" "8x7b 4 16384"; do
    set -- $shape
    ours --main-grads false --model $1 --layers $2 --seq $3
    [ -z "${OURS_ONLY:-}" ] && run 90 "hf-phases $shape" python3 .gpu/hf_phases.py --model $1 --layers $2 --seq $3
  done
  for seq in 4096 8192 16384; do
    ours --main-grads false --model 8x22b --layers 4 --seq $seq
    [ -z "${OURS_ONLY:-}" ] && run 120 "hf 8x22b 4 $seq" python3 .gpu/hf_mem.py --iters 3 --model 8x22b --layers 4 --seq $seq
  done
fi
if [ "$part" = trace ] || [ "$part" = calibrate ]; then
  # Where the step's peak falls: allocated now / peak since the previous point, at every point of the last step.
  MOE_MEMORY_TRACE=1 run 90 "moe trace 8x7b 4 8192" $M bench --iters 1 --main-grads false --model 8x7b --layers 4 --seq 8192
  MOE_MEMORY_TRACE=1 run 90 "moe trace optimizer 8x7b 2 4096" $M bench --iters 1 --optimizer true --model 8x7b --layers 2 --seq 4096
  grep "memory trace" $OUT/memory.log > $OUT/trace.txt
fi
if [ "$part" = trace ]; then
  for shape in "8x7b 2 8192" "8x7b 4 8192" "8x22b 2 8192" "8x7b 2 4096" "8x7b 4 4096" "8x22b 2 4096" "8x7b 2 16384" "8x7b 4 16384" "8x22b 2 16384" "8x22b 4 4096" "8x22b 4 8192" "8x22b 4 16384"; do
    set -- $shape
    ours --main-grads false --model $1 --layers $2 --seq $3
  done
fi
if [ "$part" = calibrate ] || [ "$part" = both ]; then
  for shape in "8x7b 2 4096" "8x7b 2 8192" "8x7b 2 16384" "8x7b 4 4096" "8x7b 4 8192" "8x22b 2 4096" "8x22b 2 8192" "8x22b 2 16384" "8x7b 4 16384"; do
    set -- $shape
    ours --optimizer true --model $1 --layers $2 --seq $3
  done
fi
log "done in $SECONDS s"
