using System.Runtime.InteropServices;

namespace Moe.Runtime.Devices;

/// <summary>
/// The few CUDA driver API calls the distributed runtime needs beside libtorch: streams and events to order
/// NCCL's stream against libtorch's (TorchSharp binds neither; all libtorch work runs on the legacy default
/// stream, handle 0), the current context for other threads, and the device's compute capability.
/// </summary>
public static partial class CudaDriver
{
    private const string Lib = "libcuda.so.1";

    /// <summary>The legacy default stream, where TorchSharp's libtorch queues all its work.</summary>
    public static readonly IntPtr DefaultStream = IntPtr.Zero;

    public const int NotReady = 600;   // CUDA_ERROR_NOT_READY

    [LibraryImport(Lib)] internal static partial int cuInit(uint flags);
    [LibraryImport(Lib)] internal static partial int cuCtxGetCurrent(out IntPtr ctx);
    [LibraryImport(Lib)] internal static partial int cuCtxSetCurrent(IntPtr ctx);
    [LibraryImport(Lib)] internal static partial int cuCtxGetDevice(out int device);
    [LibraryImport(Lib)] internal static partial int cuDeviceGet(out int device, int ordinal);
    [LibraryImport(Lib)] internal static partial int cuDeviceGetAttribute(out int value, int attribute, int device);
    [LibraryImport(Lib)] internal static partial int cuStreamCreate(out IntPtr stream, uint flags);
    [LibraryImport(Lib)] internal static partial int cuStreamDestroy_v2(IntPtr stream);
    [LibraryImport(Lib)] internal static partial int cuStreamWaitEvent(IntPtr stream, IntPtr evt, uint flags);
    [LibraryImport(Lib)] internal static partial int cuStreamSynchronize(IntPtr stream);
    [LibraryImport(Lib)] internal static partial int cuEventCreate(out IntPtr evt, uint flags);
    [LibraryImport(Lib)] internal static partial int cuEventRecord(IntPtr evt, IntPtr stream);
    [LibraryImport(Lib)] internal static partial int cuEventQuery(IntPtr evt);
    [LibraryImport(Lib)] internal static partial int cuEventSynchronize(IntPtr evt);
    [LibraryImport(Lib)] internal static partial int cuEventDestroy_v2(IntPtr evt);
    [LibraryImport(Lib)] internal static partial int cuEventElapsedTime(out float milliseconds, IntPtr start, IntPtr end);
    [LibraryImport(Lib)] internal static partial int cuGetErrorName(int status, out IntPtr name);

    /// <summary>Throws naming <paramref name="call"/> and CUDA's error name unless <paramref name="status"/> is CUDA_SUCCESS.</summary>
    public static void Check(int status, string call)
    {
        if (status == 0) return;
        cuGetErrorName(status, out var namePtr);
        string name = namePtr == IntPtr.Zero ? status.ToString(System.Globalization.CultureInfo.InvariantCulture) : Marshal.PtrToStringAnsi(namePtr)!;
        throw new InvalidOperationException($"{call} failed: {name}");
    }

    /// <summary>The context current on this thread (libtorch makes the device's primary context current when it first uses CUDA).</summary>
    public static IntPtr CurrentContext()
    {
        Check(cuCtxGetCurrent(out var ctx), "cuCtxGetCurrent");
        if (ctx == IntPtr.Zero) throw new InvalidOperationException("No CUDA context is current on this thread; run a CUDA tensor operation first.");
        return ctx;
    }

    /// <summary>(major, minor) compute capability of device <paramref name="ordinal"/> (9.0 for H100/H200).</summary>
    public static (int Major, int Minor) ComputeCapability(int ordinal = 0)
    {
        Check(cuInit(0), "cuInit");
        Check(cuDeviceGet(out int device, ordinal), "cuDeviceGet");
        Check(cuDeviceGetAttribute(out int major, 75, device), "cuDeviceGetAttribute(major)");
        Check(cuDeviceGetAttribute(out int minor, 76, device), "cuDeviceGetAttribute(minor)");
        return (major, minor);
    }
}
