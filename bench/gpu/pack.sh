#!/usr/bin/env bash
# Packs the GPU bundles of artifacts/gpu (made by `dotnet publish <project> -c Release -r linux-x64 -p:MoeGpuBundle=true`)
# into one archive, .gpu/bundles.tar.xz, for the device tool's 64 MiB carry limit: a file that several bundles hold
# with the same bytes (the .NET runtime, TorchSharp) is stored once, as hard links. common.sh unpacks it.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
for d in "$root"/artifacts/gpu/*/; do cp -a "$d" "$stage/"; done
python3 - "$stage" <<'PY'
import filecmp, os, sys
stage = sys.argv[1]
dirs = sorted(d for d in os.listdir(stage) if os.path.isdir(os.path.join(stage, d)))
first = os.path.join(stage, dirs[0])
linked = 0
for other in dirs[1:]:
    for base, _, files in os.walk(os.path.join(stage, other)):
        for f in files:
            path = os.path.join(base, f)
            twin = os.path.join(first, os.path.relpath(path, os.path.join(stage, other)))
            if f != "run" and os.path.isfile(twin) and filecmp.cmp(path, twin, shallow=False):
                os.remove(path); os.link(twin, path); linked += 1
print(f"pack: {', '.join(dirs)}; {linked} files stored once")
PY
mkdir -p "$root/.gpu"
XZ_OPT="-6 -T0" tar -C "$stage" -cJf "$root/.gpu/bundles.tar.xz.tmp" .
mv -f "$root/.gpu/bundles.tar.xz.tmp" "$root/.gpu/bundles.tar.xz"
du -h "$root/.gpu/bundles.tar.xz"
