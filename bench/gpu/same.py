"""Compares two safetensors files tensor by tensor: bit-equal or the largest |a - b|.  python3 same.py a b"""
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
unequal = []
for k in sorted(a):
    if not a[k].equal(b[k]):
        unequal.append(f"{k}: max |diff| {(a[k].float() - b[k].float()).abs().max().item():.3e}")
print(f"{len(a) - len(unequal)} of {len(a)} tensors bit-equal" + ("" if not unequal else "; " + "; ".join(unequal)))
