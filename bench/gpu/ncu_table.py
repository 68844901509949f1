"""Sums Nsight Compute's per-kernel durations (--metrics gpu__time_duration.sum --csv) for the last of
`steps` equal steps, by kernel name, largest first.  python3 ncu_table.py ncu.csv 4"""
import csv, sys
from collections import defaultdict

rows = []
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        ns = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        ns *= {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
        rows.append((r["Kernel Name"], ns))
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1
n = len(rows) // steps
print(f"{len(rows)} kernels in all; per step {n}; per-step totals (ms):",
      [round(sum(ns for _, ns in rows[i * n:(i + 1) * n]) / 1e6, 2) for i in range(steps)])
last = rows[-n:]
by = defaultdict(lambda: [0, 0.0])
for name, ns in last:
    by[name][0] += 1
    by[name][1] += ns
total = sum(v[1] for v in by.values())
print(f"last step: {len(last)} kernels, {total / 1e6:.2f} ms of kernel time")
for name, (count, ns) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    print(f"{ns / 1e6:8.3f} ms {100 * ns / total:5.1f}% x{count:<4d} {name[:150]}")
