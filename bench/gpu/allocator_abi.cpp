// Prints the facts CudaAllocatorStats (src/Runtime/Devices) relies on, from the host's PyTorch headers and library:
// the vtable slots of DeviceAllocator::getDeviceStats and resetPeakStats, the live allocator's dynamic type, and the
// layout of DeviceStats. Built and run on the GPU host by bench/gpu/allocator_abi.sh; one JSON line.
#include <c10/cuda/CUDACachingAllocator.h>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <typeinfo>
#include <utility>

template <typename F> long slot(F f) {  // Itanium ABI: a pointer to a virtual member is 1 + its vtable offset in bytes
  long v; std::memcpy(&v, &f, sizeof v); return (v - 1) / (long)sizeof(void*);
}

int main() {
  using c10::CachingDeviceAllocator::DeviceStats;
  using Stat = std::remove_reference_t<decltype(std::declval<DeviceStats>().allocated_bytes[0])>;
  auto* a = c10::cuda::CUDACachingAllocator::allocator.load();
  std::printf("{\"get_device_stats_slot\":%ld,\"reset_peak_stats_slot\":%ld,\"type\":\"%s\",\"sizeof_stats\":%zu,"
              "\"sizeof_stat\":%zu,\"off_current\":%zu,\"off_peak\":%zu,\"off_allocated_bytes\":%zu,\"off_reserved_bytes\":%zu,"
              "\"off_active_bytes\":%zu,\"off_requested_bytes\":%zu,\"off_num_alloc_retries\":%zu}\n",
              slot(&c10::DeviceAllocator::getDeviceStats),
              slot(&c10::DeviceAllocator::resetPeakStats),
              a ? typeid(*a).name() : "null", sizeof(DeviceStats), sizeof(Stat), offsetof(Stat, current), offsetof(Stat, peak),
              offsetof(DeviceStats, allocated_bytes), offsetof(DeviceStats, reserved_bytes), offsetof(DeviceStats, active_bytes),
              offsetof(DeviceStats, requested_bytes), offsetof(DeviceStats, num_alloc_retries));
}
