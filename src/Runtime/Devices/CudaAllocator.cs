namespace Moe.Runtime.Devices;

/// <summary>
/// The CUDA caching allocator's settings. libtorch reads PYTORCH_CUDA_ALLOC_CONF (PYTORCH_ALLOC_CONF from
/// PyTorch 2.9) once, when CUDA is first used. Unless the user set either, Moe turns on expandable segments:
/// blocks grow in place instead of leaving fixed-size segments half used, which on the throughput protocol
/// took device memory in use from 19.0 to 16.6 GB at the same speed (docs/performance.md).
/// </summary>
public static class CudaAllocator
{
    public const string Variable = "PYTORCH_CUDA_ALLOC_CONF";
    public const string Default = "expandable_segments:True";

    /// <summary>
    /// Sets <see cref="Variable"/> to <see cref="Default"/> in the native environment when neither allocator
    /// variable is set. Call before the first CUDA tensor; returns the setting in force.
    /// </summary>
    public static string ConfigureDefaults()
    {
        string? user = Environment.GetEnvironmentVariable(Variable) ?? Environment.GetEnvironmentVariable("PYTORCH_ALLOC_CONF");
        if (!string.IsNullOrEmpty(user)) return user;
        // .NET keeps its own copy of the environment on Unix; libtorch's getenv sees only the C library's.
        Distributed.Launch.NativeEnvironment.Set(Variable, Default);
        return Default;
    }
}
