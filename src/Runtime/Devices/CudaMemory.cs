using TorchSharp;

namespace Moe.Runtime.Devices;

/// <summary>The CUDA caching allocator's peak, read through TorchScript (TorchSharp binds no memory statistics).</summary>
public static class CudaMemory
{
    private static readonly Lazy<torch.jit.CompilationUnit?> Unit = new(() =>
    {
        try
        {
            return torch.jit.compile("def peak() -> int:\n    return torch.cuda.max_memory_allocated()\n");
        }
        catch (Exception)
        {
            return null;
        }
    });

    /// <summary>Peak allocated GiB since start, or null when this libtorch cannot say.</summary>
    public static double? MaxAllocatedGiB()
    {
        try
        {
            return Unit.Value is { } u ? Convert.ToDouble(u.invoke("peak")) / (1L << 30) : null;
        }
        catch (Exception)
        {
            return null;
        }
    }
}
