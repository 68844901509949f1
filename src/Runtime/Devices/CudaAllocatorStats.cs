using System.Runtime.InteropServices;

namespace Moe.Runtime.Devices;

/// <summary>
/// The CUDA caching allocator's own statistics (what PyTorch's <c>torch.cuda.memory_stats()</c> reads): bytes allocated
/// to live tensors and bytes reserved from the device, current and peak since the last <see cref="ResetPeaks"/>.
/// TorchSharp binds none of them and libc10_cuda exports no function for them, only the allocator object
/// (<c>c10::cuda::CUDACachingAllocator::allocator</c>); its <c>getDeviceStats</c> and <c>resetPeakStats</c> are virtual.
/// So this reads them through the object's virtual table, at the slots and offsets of PyTorch 2.11's headers, which
/// <c>bench/gpu/allocator_abi.sh</c> prints from the host's headers with a C++ compiler. It is opt-in
/// (<c>moe bench --allocator-stats</c>) and checks the object's dynamic type through its RTTI first, so a libtorch
/// whose allocator is of another class gets a reason instead of a call through an unknown slot.
/// </summary>
public static unsafe class CudaAllocatorStats
{
    private const string AllocatorSymbol = "_ZN3c104cuda20CUDACachingAllocator9allocatorE";
    /// <summary>typeid(*allocator).name() of PyTorch's native caching allocator.</summary>
    public const string NativeType = "N3c104cuda20CUDACachingAllocator6Native22NativeCachingAllocatorE";
    // Itanium C++ ABI vtable slots of c10::DeviceAllocator (c10::Allocator's 6 first:
    // two destructors, allocate, is_simple_data_ptr, raw_deleter, copy_data; then initialized, emptyCache, recordStream).
    private const int GetDeviceStatsSlot = 9, ResetPeakStatsSlot = 11;
    // DeviceStats: nine StatArrays (3 Stats of current, peak, allocated, freed: 96 bytes each), then counters; 976 bytes.
    private const int StatsBytes = 976, StatArrayLongs = 12;
    private const int AllocatedBytes = 4, ReservedBytes = 5, ActiveBytes = 6, RequestedBytes = 8, NumAllocRetries = 108, NumOoms = 109;

    /// <summary>Statistics of one device, in bytes (aggregate pool).</summary>
    public sealed record Stats(long AllocatedCurrent, long AllocatedPeak, long ReservedCurrent, long ReservedPeak,
        long ActivePeak, long RequestedPeak, long AllocRetries, long OutOfMemory);

    /// <summary>The statistics of the current CUDA device, or null with the reason.</summary>
    public static Stats? Read(out string why)
    {
        if (Allocator(out why) is not IntPtr allocator || CurrentDevice(out why) is not int device) return null;
        var buffer = new long[StatsBytes / sizeof(long) + 64];   // room to spare beyond the struct
        var fn = (delegate* unmanaged<long*, IntPtr, sbyte, long*>)Slot(allocator, GetDeviceStatsSlot);
        fixed (long* p = buffer) fn(p, allocator, (sbyte)device);   // returned by hidden pointer (first), then this
        long Current(int array) => buffer[array * StatArrayLongs];
        long Peak(int array) => buffer[array * StatArrayLongs + 1];
        var stats = new Stats(Current(AllocatedBytes), Peak(AllocatedBytes), Current(ReservedBytes), Peak(ReservedBytes),
            Peak(ActiveBytes), Peak(RequestedBytes), buffer[NumAllocRetries], buffer[NumOoms]);
        // A layout that moved would show as nonsense; say so rather than report it.
        if (stats.AllocatedCurrent < 0 || stats.AllocatedCurrent > stats.AllocatedPeak || stats.ReservedCurrent > stats.ReservedPeak
            || stats.AllocatedCurrent > stats.ReservedCurrent || stats.AllocatedPeak > stats.ReservedPeak || stats.AllocRetries < 0)
        {
            why = $"the allocator's statistics do not add up ({stats}): this libtorch's DeviceStats layout differs from PyTorch 2.11's";
            return null;
        }
        return stats;
    }

    /// <summary>Resets the peaks of the current device (torch.cuda.reset_peak_memory_stats); false with the reason when unavailable.</summary>
    public static bool ResetPeaks(out string why)
    {
        if (Allocator(out why) is not IntPtr allocator || CurrentDevice(out why) is not int device) return false;
        var fn = (delegate* unmanaged<IntPtr, sbyte, void>)Slot(allocator, ResetPeakStatsSlot);
        fn(allocator, (sbyte)device);
        return true;
    }

    private static IntPtr Slot(IntPtr allocator, int slot) => ((IntPtr*)*(IntPtr*)allocator)[slot];

    private static IntPtr? Allocator(out string why)
    {
        if (!NativeLibrary.TryLoad("libc10_cuda.so", out var lib))
        {
            why = "libc10_cuda.so is not loaded (no CUDA libtorch)";
            return null;
        }
        if (!NativeLibrary.TryGetExport(lib, AllocatorSymbol, out var symbol))
        {
            why = "libc10_cuda.so exports no c10::cuda::CUDACachingAllocator::allocator";
            return null;
        }
        var allocator = *(IntPtr*)symbol;   // std::atomic<CUDAAllocator*>: the pointer itself
        if (allocator == IntPtr.Zero)
        {
            why = "the CUDA caching allocator is not created yet";
            return null;
        }
        // RTTI: the vtable's word before the first slot points at the type_info, whose second word is the mangled name.
        var typeInfo = ((IntPtr*)*(IntPtr*)allocator)[-1];
        string? name = typeInfo == IntPtr.Zero ? null : Marshal.PtrToStringAnsi(((IntPtr*)typeInfo)[1])?.TrimStart('*');   // GCC marks local types with a leading *
        if (name != NativeType)
        {
            why = $"the CUDA allocator is {name ?? "of an unknown type"}, not PyTorch's native caching allocator (a custom allocator, or PYTORCH_NO_CUDA_MEMORY_CACHING)";
            return null;
        }
        why = "";
        return allocator;
    }

    private static int? CurrentDevice(out string why)
    {
        foreach (var name in new[] { "libcudart.so.13", "libcudart.so.12", "libcudart.so" })
        {
            if (!NativeLibrary.TryLoad(name, out var lib) || !NativeLibrary.TryGetExport(lib, "cudaGetDevice", out var fn)) continue;
            int device;
            int status = ((delegate* unmanaged<int*, int>)fn)(&device);
            why = status == 0 ? "" : $"cudaGetDevice failed with CUDA error {status}";
            return status == 0 ? device : null;
        }
        why = "no CUDA runtime library is loaded";
        return null;
    }
}
