#!/usr/bin/env bash
# Kernel time of one training step (8x7B shapes, 2 layers, sequence 4096) with Nsight Compute: `moe bench
# --iters 1` runs 4 steps; ncu records each kernel's duration (one pass, clocks left alone) and ncu_table.py
# sums the last step's kernels by name.
. .gpu/common.sh
model=${1:-8x7b}
timeout 400 ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file $OUT/ncu.csv --target-processes all \
  $M bench --model $model --layers 2 --seq 4096 --iters 1 > $OUT/ncu_run.log 2>&1
echo "ncu exit $?"; tail -3 $OUT/ncu_run.log
python3 .gpu/ncu_table.py $OUT/ncu.csv 4 | tee $OUT/profile.txt
