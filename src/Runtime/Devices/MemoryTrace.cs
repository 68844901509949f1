namespace Moe.Runtime.Devices;

/// <summary>
/// The caching allocator's bytes at named points of a step, on when MOE_MEMORY_TRACE=1 (CUDA, PyTorch 2.11's allocator:
/// <see cref="CudaAllocatorStats"/>): at each point the bytes allocated to tensors now, and the peak since the previous
/// point, so the step's peak can be placed between two points. The points are <see cref="HostTrace"/>'s in the forward
/// and the managed backwards' (once per layer). <c>moe bench</c> prints the last timed step's.
/// </summary>
public static class MemoryTrace
{
    public static readonly bool Enabled = Environment.GetEnvironmentVariable("MOE_MEMORY_TRACE") == "1";

    private static readonly List<(string Point, double Now, double PeakSince)> Marks = new();

    /// <summary>Starts a step: forgets the marks and resets the allocator's peak.</summary>
    public static void Start()
    {
        if (!Enabled) return;
        lock (Marks)
        {
            Marks.Clear();
            if (!CudaAllocatorStats.ResetPeaks(out var why)) throw new InvalidOperationException($"MOE_MEMORY_TRACE=1: {why}.");
        }
    }

    public static void Mark(string point)
    {
        if (!Enabled) return;
        lock (Marks)
        {
            var s = CudaAllocatorStats.Read(out var why) ?? throw new InvalidOperationException($"MOE_MEMORY_TRACE=1: {why}.");
            Marks.Add((point, s.AllocatedCurrent / (double)(1L << 30), s.AllocatedPeak / (double)(1L << 30)));
            CudaAllocatorStats.ResetPeaks(out _);
        }
    }

    /// <summary>The marks so far, as "point now/peak-since GiB" items.</summary>
    public static string Describe()
    {
        lock (Marks) return string.Join("  ", Marks.Select(m => $"{m.Point} {m.Now:F2}/{m.PeakSince:F2}"));
    }
}
