# Sourced by the scripts here: multicast off, the bundles unpacked under /tmp/gpu, $M = the bundled `moe`.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/gpu
for b in .gpu/*.tar.xz; do tar -xJf "$b" -C /tmp/gpu; done
# gpu-bundle's `run` starts the first DLL it finds; point each at its own executable.
sed -i 's#exec "$here/[^"]*"#exec "$here/moe"#' /tmp/gpu/Moe.Cli/run
[ -d /tmp/gpu/TinyMixtral ] && sed -i 's#exec "$here/[^"]*"#exec "$here/TinyMixtral"#' /tmp/gpu/TinyMixtral/run
M=/tmp/gpu/Moe.Cli/run
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/gpu.txt
