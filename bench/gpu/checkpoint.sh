#!/usr/bin/env bash
# Checkpoints on GPUs (issue 14), on an nvidia-h200-x2 machine:
#  1. exact resume in fp32 on one GPU: 10 TinyMixtral steps, saved at 5 and resumed: steps 6–10 against the uninterrupted run;
#  2. EP 2 on two GPUs (needs train's multi-process launcher): saved at EP 2, resumed at EP 2 and on one GPU;
#  3. save and load GB/s of a Mixtral-shaped checkpoint (8x7B shapes, 2 layers, bf16: ~3.2 B parameters, ~45 GB on disk),
#     on one GPU and at EP 2 (each rank writes its own file; the `saved`/`resumed` lines give the rates).
# Needs the CheckpointCheck bundle: ../shared/tools/gpu-bundle.sh bench/CheckpointCheck/CheckpointCheck.csproj
. .gpu/common.sh
sed -i 's#exec "$here/[^"]*"#exec "$here/CheckpointCheck"#' /tmp/gpu/CheckpointCheck/run
C=/tmp/gpu/CheckpointCheck/run
D=${CKPT_DIR:-/tmp/ckpt}
rm -rf "$D"; mkdir -p "$D"
compare() {   # compare.py FULL RESUMED TOLERANCE: steps of RESUMED against the same steps of FULL
  python3 - "$@" <<'PY'
import json, sys
full = {j["step"]: j for j in map(json.loads, open(sys.argv[1]))}
resumed = [json.loads(l) for l in open(sys.argv[2])]
tol = float(sys.argv[3])
worst = max(abs(r["loss"] - full[r["step"]]["loss"]) / abs(full[r["step"]]["loss"]) for r in resumed)
print(f"{sys.argv[2]}: steps {[r['step'] for r in resumed]}, max relative loss difference {worst:.3e} "
      f"({'bit-identical' if worst == 0 else 'within' if worst <= tol else 'ABOVE'} {tol:g})")
PY
}

echo "== 1. fp32, one GPU: save at 5, resume" | tee $OUT/checkpoint.log
$C tiny-fp32 train --device cuda --steps 10 --save $D/one --save-interval 5 --log-every 1 --metrics $OUT/one_full.jsonl 2>&1 | tee -a $OUT/checkpoint.log
$C tiny-fp32 train --device cuda --steps 10 --load $D/one/iter_0000005 --log-every 1 --metrics $OUT/one_resumed.jsonl 2>&1 | tee -a $OUT/checkpoint.log
compare $OUT/one_full.jsonl $OUT/one_resumed.jsonl 1e-5 | tee -a $OUT/checkpoint.log
# The export must load in transformers (when the host has it) with the same weights.
$C tiny-fp32 checkpoint export $D/one --hf $D/one_hf 2>&1 | tee -a $OUT/checkpoint.log
python3 - $D/one_hf <<'PY' 2>&1 | tee -a $OUT/checkpoint.log
import sys
try:
    import transformers, torch
    from safetensors.torch import load_file
except ImportError as e:
    print(f"transformers check skipped: {e}"); sys.exit(0)
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
ours = load_file(f"{sys.argv[1]}/model.safetensors")
sd = m.state_dict()
same = all(torch.equal(sd[k], v) for k, v in ours.items() if k in sd)
print(f"transformers {transformers.__version__} loaded {sys.argv[1]}: {sum(p.numel() for p in m.parameters())} parameters; per-expert tensors equal where names match: {same}")
PY

# CKPT_PARTS=1 stops after part 1 (a one-GPU machine).
[ "${CKPT_PARTS:-all}" = 1 ] && exit 0

echo "== 2. fp32, EP 2 on two GPUs: save at 5; resume at EP 2 and on one GPU" | tee -a $OUT/checkpoint.log
$C tiny-fp32 train --device cuda --gpus 2 --ep 2 --steps 10 --save $D/ep2 --save-interval 5 --log-every 1 --metrics $OUT/ep2_full.jsonl 2>&1 | tee -a $OUT/checkpoint.log
$C tiny-fp32 train --device cuda --gpus 2 --ep 2 --steps 10 --load $D/ep2/iter_0000005 --log-every 1 --metrics $OUT/ep2_resumed.jsonl 2>&1 | tee -a $OUT/checkpoint.log
$C tiny-fp32 train --device cuda --gpus 1 --steps 10 --load $D/ep2/iter_0000005 --log-every 1 --metrics $OUT/ep2_to_one.jsonl 2>&1 | tee -a $OUT/checkpoint.log
compare $OUT/ep2_full.jsonl $OUT/ep2_resumed.jsonl 1e-5 | tee -a $OUT/checkpoint.log
compare $OUT/one_full.jsonl $OUT/ep2_to_one.jsonl 1e-5 | tee -a $OUT/checkpoint.log
$C checkpoint inspect $D/ep2 2>&1 | tee -a $OUT/checkpoint.log

echo "== 3. Mixtral-shaped checkpoint: save and load rates" | tee -a $OUT/checkpoint.log
drop() { sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo "(page cache dropped)" || echo "(page cache NOT dropped: load rates include cached reads)"; }
$C mixtral-2l train --device cuda --save $D/mix 2>&1 | grep -E "^(saving|saved|training|done)" | tee -a $OUT/checkpoint.log
du -sh $D/mix/iter_0000002 | tee -a $OUT/checkpoint.log
drop | tee -a $OUT/checkpoint.log
$C mixtral-2l train --device cuda --load $D/mix 2>&1 | grep -E "^(resumed|done)" | tee -a $OUT/checkpoint.log
rm -rf $D/mix
$C mixtral-2l train --device cuda --gpus 2 --ep 2 --save $D/mix2 2>&1 | grep -E "^(saving|saved|done)" | tee -a $OUT/checkpoint.log
drop | tee -a $OUT/checkpoint.log
$C mixtral-2l train --device cuda --gpus 2 --ep 2 --load $D/mix2 2>&1 | grep -E "^(resumed|done)" | tee -a $OUT/checkpoint.log
drop | tee -a $OUT/checkpoint.log
$C mixtral-2l train --device cuda --gpus 1 --load $D/mix2 2>&1 | grep -E "^(resumed|done)" | tee -a $OUT/checkpoint.log
rm -rf "$D"
