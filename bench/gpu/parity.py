import sys, torch
from safetensors.torch import load_file
ours, ref = load_file(sys.argv[1]), load_file(sys.argv[2])
worst = {}
for k, e in ref.items():
    if k == "input_ids": continue
    o = ours[k].float(); e = e.float()
    if k == "logits" or k.startswith("router_logits"):
        d = (o - e).abs().max().item(); kind = "abs"
    elif k.startswith("grad."):
        d = ((o - e).norm() / e.norm().clamp_min(1e-12)).item(); kind = "relnorm"
    else:
        d = abs(o.item() - e.item()) / abs(e.item()); kind = "rel"
    worst[kind] = max(worst.get(kind, 0), d)
    print(f"{k}: {kind} {d:.3e}")
print("WORST", worst)
