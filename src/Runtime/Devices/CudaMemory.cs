using System.Runtime.InteropServices;

namespace Moe.Runtime.Devices;

/// <summary>
/// Device memory in use, from the CUDA runtime (cudaMemGetInfo). TorchSharp binds no allocator statistics,
/// and a TorchScript call to torch.cuda.* does not compile in libtorch (a compile error aborts the process),
/// so after the timed steps we read total − free: the caching allocator keeps its peak reservation, so this
/// is the peak reserved memory plus the CUDA context — an upper bound of PyTorch's max_memory_allocated.
/// </summary>
public static class CudaMemory
{
    private static readonly string[] Names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    private delegate int MemGetInfo(out nuint free, out nuint total);

    /// <summary>GiB in use on the current device, or null when no CUDA runtime library is loaded.</summary>
    public static double? InUseGiB() => Info() is (long used, _) ? used / (double)(1L << 30) : null;

    /// <summary>Bytes in use (total − free) and in total on the current device, or null when no CUDA runtime library is loaded.</summary>
    public static (long Used, long Total)? Info()
    {
        foreach (var name in Names)
        {
            if (!NativeLibrary.TryLoad(name, out var lib)) continue;
            if (!NativeLibrary.TryGetExport(lib, "cudaMemGetInfo", out var fn)) continue;
            int status = Marshal.GetDelegateForFunctionPointer<MemGetInfo>(fn)(out var free, out var total);
            if (status != 0) throw new InvalidOperationException($"cudaMemGetInfo failed with CUDA error {status}.");
            return ((long)(total - free), (long)total);
        }
        return null;
    }
}
