using System.Diagnostics;

namespace Moe.Runtime.Devices;

/// <summary>
/// Host-side timestamps at named points of a step, on when MOE_HOST_TRACE=1: where the host thread spends
/// its time while it queues GPU work (a jump between two points that queue little means the host waited
/// for the device there). <c>moe bench</c> prints the median time of each point.
/// </summary>
public static class HostTrace
{
    public static readonly bool Enabled = Environment.GetEnvironmentVariable("MOE_HOST_TRACE") == "1";

    private static readonly Stopwatch Clock = Stopwatch.StartNew();
    private static readonly List<(string Point, double Ms)> Marks = new();
    private static double _start;

    /// <summary>Starts a step: later marks are milliseconds since now.</summary>
    public static void Start()
    {
        if (!Enabled) return;
        lock (Marks) { Marks.Clear(); _start = Clock.Elapsed.TotalMilliseconds; }
    }

    public static void Mark(string point)
    {
        MemoryTrace.Mark(point);
        if (!Enabled) return;
        lock (Marks) Marks.Add((point, Clock.Elapsed.TotalMilliseconds - _start));
    }

    /// <summary>The marks of the step so far, in order.</summary>
    public static IReadOnlyList<(string Point, double Ms)> Snapshot()
    {
        lock (Marks) return Marks.ToArray();
    }
}
