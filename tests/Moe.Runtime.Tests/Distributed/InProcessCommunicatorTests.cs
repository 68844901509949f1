using Moe.Dsl.Layout;
using Moe.Runtime.Distributed;
using Moe.Runtime.Distributed.InProcess;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>The in-process backend's collectives, by hand: every expected value is worked out in the test.</summary>
public class InProcessCommunicatorTests
{
    /// <summary>Runs <paramref name="body"/> on <paramref name="size"/> ranks of one world and returns each rank's result.</summary>
    internal static T[] OnRanks<T>(int size, Func<Communicator, T> body, double timeoutSeconds = 20)
    {
        var world = new InProcessWorld(size, TimeSpan.FromSeconds(timeoutSeconds));
        var results = new T[size];
        var errors = new Exception?[size];
        var threads = Enumerable.Range(0, size).Select(r => new Thread(() =>
        {
            try { results[r] = body(world.Communicator(r)); }
            catch (Exception e) { errors[r] = e; world.Abort(e.Message); }
        })).ToArray();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) t.Join();
        var first = errors.FirstOrDefault(e => e is not null);
        if (first is not null) throw first;
        return results;
    }

    private static float[] Values(Tensor t) => t.data<float>().ToArray();

    [Fact]
    public void AllReduce_SumsAverageAndMax()
    {
        // Rank r holds [r + 1, 10·(r + 1)]; over 3 ranks: sum [6, 60], average [2, 20], max [3, 30].
        var results = OnRanks(3, c =>
        {
            float[] Of(ReduceOp op)
            {
                var t = torch.tensor(new float[] { c.Rank + 1, 10 * (c.Rank + 1) });
                c.AllReduce(t, op);
                return Values(t);
            }
            return (Of(ReduceOp.Sum), Of(ReduceOp.Avg), Of(ReduceOp.Max));
        });
        Assert.All(results, r =>
        {
            Assert.Equal(new float[] { 6, 60 }, r.Item1);
            Assert.Equal(new float[] { 2, 20 }, r.Item2);
            Assert.Equal(new float[] { 3, 30 }, r.Item3);
        });
    }

    [Fact]
    public void ReduceScatterAndAllGather_GiveEachRankItsBlockAndBack()
    {
        // Two ranks, input of rank r = [1, 2, 3, 4] · (r + 1): the sum is [3, 6, 9, 12]; rank 0 keeps [3, 6], rank 1 [9, 12].
        var results = OnRanks(2, c =>
        {
            var input = torch.tensor(new float[] { 1, 2, 3, 4 }) * (c.Rank + 1);
            var block = torch.zeros(2);
            c.ReduceScatter(input, block);
            var whole = torch.zeros(4);
            c.AllGather(block, whole);
            return (Values(block), Values(whole));
        });
        Assert.Equal(new float[] { 3, 6 }, results[0].Item1);
        Assert.Equal(new float[] { 9, 12 }, results[1].Item1);
        Assert.All(results, r => Assert.Equal(new float[] { 3, 6, 9, 12 }, r.Item2));
    }

    [Fact]
    public void AllToAll_WithUnevenSplits_DeliversEachBlockToItsRank()
    {
        // Rank 0 sends rows [0] to itself and [1, 2] to rank 1; rank 1 sends [10, 11, 12] to rank 0 and nothing to itself.
        var results = OnRanks(2, c =>
        {
            var (input, send, recv) = c.Rank == 0
                ? (torch.tensor(new float[] { 0, 1, 2 }).view(3, 1), new long[] { 1, 2 }, new long[] { 1, 3 })
                : (torch.tensor(new float[] { 10, 11, 12 }).view(3, 1), new long[] { 3, 0 }, new long[] { 2, 0 });
            var output = torch.zeros(recv.Sum(), 1);
            c.AllToAll(input, send, output, recv);
            return Values(output.flatten());
        });
        Assert.Equal(new float[] { 0, 10, 11, 12 }, results[0]);
        Assert.Equal(new float[] { 1, 2 }, results[1]);
    }

    [Fact]
    public void Broadcast_AndPointToPoint_CarryTheSendersValues()
    {
        var results = OnRanks(2, c =>
        {
            var t = torch.tensor(new float[] { c.Rank == 1 ? 7 : 0 });
            c.Broadcast(t, root: 1);
            var mine = torch.tensor(new float[] { 100 + c.Rank });
            var theirs = torch.zeros(1);
            c.Exchange([new PeerTransfer(true, mine, 1 - c.Rank), new PeerTransfer(false, theirs, 1 - c.Rank)]);
            return (Values(t)[0], Values(theirs)[0]);
        });
        Assert.Equal((7f, 101f), results[0]);
        Assert.Equal((7f, 100f), results[1]);
    }

    [Fact]
    public void Split_FormsTheGroupsOfEachColourInKeyOrder()
    {
        // Four ranks, colour = rank % 2, members listed high to low: groups [2, 0] and [3, 1]; an all-reduce sums within the group.
        var results = OnRanks(4, c =>
        {
            var g = c.Split("pairs", c.Rank % 2, c.Rank % 2 == 0 ? [2, 0] : [3, 1])!;
            var t = torch.tensor(new float[] { c.Rank });
            g.AllReduce(t);
            return (g.Ranks, g.Rank, Values(t)[0]);
        });
        Assert.Equal(new[] { 2, 0 }, results[0].Ranks);
        Assert.Equal(1, results[0].Rank);
        Assert.Equal(2f, results[0].Item3);
        Assert.Equal(new[] { 3, 1 }, results[3].Ranks);
        Assert.Equal(4f, results[1].Item3);
    }

    [Fact]
    public void Split_WhereRanksDisagreeAboutTheGroups_IsReported()
    {
        var e = Assert.ThrowsAny<Exception>(() => OnRanks(2, c => c.Split("tp", 0, c.Rank == 0 ? [0, 1] : [1, 0])));
        Assert.Contains("the ranks disagree about the layout", e.Message);
    }

    [Fact]
    public void MismatchedCollectives_AreReportedNotHung()
    {
        var e = Assert.ThrowsAny<Exception>(() => OnRanks(2, c =>
        {
            var t = torch.zeros(c.Rank == 0 ? 2 : 3);
            c.AllReduce(t);
            return 0;
        }));
        Assert.Contains("does not match across members", e.Message);
        Assert.Contains("all_reduce Float32[2]", e.Message);
        Assert.Contains("all_reduce Float32[3]", e.Message);
    }

    [Fact]
    public void StoppedRank_OthersFailAtTheDeadlineWithTheReport()
    {
        // Rank 2 never reaches the all-reduce; ranks 0 and 1 must fail after about the 1 s deadline, naming the
        // group, its ranks, the operation, its sequence number, how long they waited and who is missing.
        var world = new InProcessWorld(3, TimeSpan.FromSeconds(1));
        var released = new ManualResetEventSlim();
        var errors = new Exception?[3];
        var watch = System.Diagnostics.Stopwatch.StartNew();
        var threads = Enumerable.Range(0, 3).Select(r => new Thread(() =>
        {
            var c = world.Communicator(r);
            try
            {
                c.Barrier();                                    // operation #1, everyone
                if (r == 2) { released.Wait(TimeSpan.FromSeconds(30)); return; }
                c.AllReduce(torch.ones(4));                     // operation #2, rank 2 never comes
            }
            catch (Exception e) { errors[r] = e; }
        })).ToArray();
        foreach (var t in threads) t.Start();
        threads[0].Join(TimeSpan.FromSeconds(20));
        threads[1].Join(TimeSpan.FromSeconds(20));
        double seconds = watch.Elapsed.TotalSeconds;
        released.Set();
        threads[2].Join();
        Assert.True(seconds < 10, $"the waiting ranks took {seconds:F1} s");
        foreach (int r in new[] { 0, 1 })
        {
            var e = Assert.IsType<CollectiveTimeoutException>(errors[r]);
            Assert.Contains($"global rank {r}: all_reduce #2 in group world [0, 1, 2] waited", e.Message);
            Assert.Contains("global rank(s) 2 never arrived", e.Message);
        }
        Assert.Null(errors[2]);
    }
}
