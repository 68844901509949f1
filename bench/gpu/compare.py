"""Compares the losses of metrics files (one JSON line per step) with the first one's: relative difference per step."""
import json
import sys

def losses(path):
    try:
        return [json.loads(line)["loss"] for line in open(path)]
    except OSError as e:
        return str(e)

reference = losses(sys.argv[1])
print(f"reference {sys.argv[1]}: " + " ".join(f"{x:.6f}" for x in reference))
worst_all = 0.0
for path in sys.argv[2:]:
    other = losses(path)
    if isinstance(other, str) or len(other) != len(reference):
        print(f"{path}: MISSING or wrong length ({other if isinstance(other, str) else len(other)})")
        worst_all = float("inf")
        continue
    worst = max(abs(a - b) / abs(a) for a, b in zip(reference, other))
    worst_all = max(worst_all, worst)
    print(f"{path}: worst relative difference {worst:.2e}: " + " ".join(f"{x:.6f}" for x in other))
print(f"worst over all: {worst_all:.2e}")
