# Sourced by the scripts here: multicast off, the bundles unpacked under /tmp/gpu, $M = the bundled `moe`.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/gpu
# The GPU bundles (dotnet publish ... -p:MoeGpuBundle=true writes artifacts/gpu/<Project>.tar.xz); .gpu/ for older ones.
for b in artifacts/gpu/*.tar.xz .gpu/*.tar.xz; do [ -e "$b" ] && tar -xJf "$b" -C /tmp/gpu; done
M=/tmp/gpu/Moe.Cli/run
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/gpu.txt
