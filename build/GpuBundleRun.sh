#!/usr/bin/env bash
# @APP_NAME@: a Moe GPU bundle (self-contained .NET, no CPU libtorch). Starts @APP_HOST@ against the host's
# PyTorch: its CUDA libtorch (torch/lib) and pip's NCCL (nvidia/nccl/lib) go first on the loader path.
#   PYTHON          the Python whose torch to use (default: python3)
#   MOE_TORCH_LIB   a torch/lib folder to use instead of asking Python
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

torch_lib="${MOE_TORCH_LIB:-}"
if [ -z "$torch_lib" ]; then
  if ! torch_lib="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"; then
    echo "run: '$python -c \"import torch\"' failed, so there is no CUDA libtorch to load; install PyTorch with CUDA," >&2
    echo "     or set PYTHON to the Python that has it, or MOE_TORCH_LIB to its torch/lib folder" >&2
    exit 127
  fi
fi
if [ ! -e "$torch_lib/libtorch.so" ]; then
  echo "run: $torch_lib has no libtorch.so; set MOE_TORCH_LIB to PyTorch's torch/lib folder" >&2
  exit 127
fi
# pip's NCCL when PyTorch came from pip (nvidia-nccl-cu12); absent otherwise, and then torch/lib's own is used.
nccl_lib="$("$python" -c 'import os, nvidia.nccl; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)"

export LD_LIBRARY_PATH="$torch_lib${nccl_lib:+:$nccl_lib}:$here:$here/runtimes/linux-x64/native${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NVLink multicast (NVLS) stays off in NCCL, PyTorch and NVSHMEM: on shared GPU hosts it can take GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DOTNET_gcServer="${DOTNET_gcServer:-1}"
exec "$here/@APP_HOST@" "$@"
