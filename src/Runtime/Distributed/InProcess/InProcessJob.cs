using Moe.Dsl.Layout;
using Moe.Runtime.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Distributed.InProcess;

/// <summary>
/// Runs one body per rank of a layout on threads of this process, each with its own <see cref="ProcessGroups"/>
/// over an <see cref="InProcessWorld"/> and the CPU as device: the CPU tests' and <c>train --simulate</c>'s job.
/// </summary>
/// <remarks>
/// A rank that fails aborts the world, so the others stop at their next collective instead of waiting for the
/// deadline; the job then fails with the failing ranks' own messages (the others' "aborted" reports are
/// secondary and shown only when no rank failed first, i.e. when a deadline passed).
/// </remarks>
public static class InProcessJob
{
    /// <summary>Runs <paramref name="body"/> on every rank and returns the results in rank order.</summary>
    public static T[] Run<T>(IRankLayout layout, TimeSpan timeout, Func<RankContext, T> body)
    {
        var world = new InProcessWorld(layout.World, timeout);
        var results = new T[layout.World];
        var failures = new Exception?[layout.World];
        var threads = Enumerable.Range(0, layout.World).Select(rank => new Thread(() =>
        {
            try
            {
                using var groups = ProcessGroups.Create(world.Communicator(rank), layout);
                results[rank] = body(new RankContext(groups, CPU));
            }
            catch (Exception e)
            {
                failures[rank] = e;
                world.Abort($"global rank {rank} failed: {e.Message}");
            }
        }, maxStackSize: 16 << 20) { Name = $"rank {rank}", IsBackground = true }).ToArray();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) t.Join();
        ThrowIfFailed(failures);
        return results;
    }

    private static void ThrowIfFailed(Exception?[] failures)
    {
        var failed = failures.Select((e, rank) => (Rank: rank, Error: e)).Where(f => f.Error is not null).ToList();
        if (failed.Count == 0) return;
        // Ranks that failed on their own, not because another rank's failure aborted the world.
        var primary = failed.Where(f => f.Error is not CollectiveTimeoutException || !f.Error.Message.Contains("failed:", StringComparison.Ordinal)).ToList();
        if (primary.Count == 0) primary = failed;
        var messages = primary.Select(f => f.Error!.Message).Distinct(StringComparer.Ordinal).ToList();
        if (messages.Count == 1 && primary.Count == failed.Count && primary[0].Error is UserError single)
            throw single;   // every rank stopped for the same reason (a NaN loss is seen by all)
        string Describe((int Rank, Exception? Error) f) => $"  rank {f.Rank}: {f.Error!.Message}";
        throw new DistributedJobException($"{primary.Count} of {failures.Length} ranks failed:{Environment.NewLine}" +
            string.Join(Environment.NewLine, primary.Select(Describe)), primary[0].Error!);
    }
}

/// <summary>Ranks of a job failed; the message has one line per failing rank.</summary>
public sealed class DistributedJobException : Exception
{
    public DistributedJobException(string message, Exception first) : base(message, first) { }
}
