# Compiles and runs allocator_abi.cpp against the host's PyTorch: prints what CudaAllocatorStats assumes (one JSON line),
# or the compiler's complaint (with the header lines it needs) when the layout moved.
T=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__))")
g++ -std=c++17 -O0 -I$T/include -I/usr/local/cuda/include .gpu/allocator_abi.cpp -L$T/lib -lc10_cuda -lc10 -Wl,-rpath,$T/lib -o /tmp/allocator_abi 2>&1 | head -30 \
  || true
if [ -x /tmp/allocator_abi ]; then /tmp/allocator_abi; else
  grep -n "namespace\|class\|struct" $T/include/c10/core/CachingDeviceAllocator.h | head -40; fi
