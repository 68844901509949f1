using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Modeling;
using Moe.Runtime.Tests.Distributed;
using Moe.Runtime.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Checkpoints;

/// <summary>Runs layouts in-process with saves, stops and loads, and compares their states element by element.</summary>
internal static class Resume
{
    /// <summary>A parameter's block, or a range of it, and its values.</summary>
    internal sealed record Part(string Name, BlockRange Range, Tensor Values);

    /// <summary>One rank's weights and optimizer state (main, exp_avg, exp_avg_sq), copied out.</summary>
    internal sealed record Snapshot(List<Part> Weights, List<Part> Main, List<Part> ExpAvg, List<Part> ExpAvgSq);

    /// <summary>One rank's run: its steps, and its state right after construction (restored, if loading) and at the end.</summary>
    internal sealed record RankRun(StepMetrics[] Steps, Snapshot AtStart, Snapshot AtEnd, string Log);

    /// <summary>ParallelEquivalenceTests' TinyMixtral (2 layers, 64-token samples, global batch 8 of micro-batches of 2) for <paramref name="steps"/> steps.</summary>
    internal static RecipeSettings Tiny(Parallelism parallelism, int steps = 10) =>
        ParallelEquivalenceTests.Tiny(parallelism, s => s with { Training = s.Training with { Steps = steps } });

    internal static Parallelism Layout(int gpus, int ep = 1, int? etp = null) => new() { Gpus = gpus, Expert = ep, ExpertTensor = etp };

    /// <summary>
    /// Trains <paramref name="s"/> on its layout (in-process ranks), loading <paramref name="load"/> first when given;
    /// after step <paramref name="stopAfter"/> saves into <paramref name="save"/> (when given) and stops.
    /// </summary>
    internal static RankRun[] Run(RecipeSettings s, string? load = null, string? save = null, int? stopAfter = null,
        CheckpointLoadOptions? options = null, Func<int, CheckpointStorage?>? storage = null)
    {
        var p = s.Parallelism;
        var layout = new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
        s = s with { Checkpoint = s.Checkpoint with { Load = load } };
        return InProcessJob.Run(layout, TimeSpan.FromSeconds(300), rank =>
        {
            var log = new StringWriter();
            using var source = new IndexedSampleSource(s, s.Model.EosTokenId);
            using var metrics = new MetricsWriter(null);
            using var trainer = new Trainer(s, rank, log, options);
            var start = Take(trainer);
            var result = trainer.Run(source, metrics, step =>
            {
                if (step != stopAfter) return;
                if (save is not null) CheckpointWriter.Save(trainer, save, step, log, storage?.Invoke(rank.Groups.Rank));
                trainer.StopRequested = true;
            });
            return new RankRun(result.Steps.ToArray(), start, Take(trainer), log.ToString());
        });
    }

    /// <summary>A copy of a trainer's weights (its blocks) and optimizer slices.</summary>
    internal static Snapshot Take(Trainer trainer)
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        // One part per block of a parameter: a q/k/v weight with replicated key-value heads has two, its k/v rows shared.
        var weights = trainer.Parameters.SelectMany(p => p.Blocks.Select(b =>
            new Part(p.Name, BlockRange.Whole(b.Block), p.Parameter.detach().flatten().narrow(0, b.Start, b.Length).clone().DetachFromDisposeScope()))).ToList();
        var parameters = trainer.Parameters.ToDictionary(p => p.Name);
        var main = new List<Part>();
        var m = new List<Part>();
        var v = new List<Part>();
        foreach (var slice in trainer.Optimizer.StateSlices())
        {
            foreach (var b in parameters[slice.Entry.Name].Blocks)
            {
                long from = Math.Max(slice.BlockStart, b.Start), to = Math.Min(slice.BlockStart + slice.Length, b.Start + b.Length);
                if (from >= to) continue;
                var range = BlockRange.Of(b.Block, from - b.Start, to - b.Start);
                Part Of(Tensor state) => new(slice.Entry.Name, range, state.narrow(0, from - slice.BlockStart, to - from).clone().DetachFromDisposeScope());
                main.Add(Of(slice.Main));
                m.Add(Of(slice.ExpAvg));
                v.Add(Of(slice.ExpAvgSq));
            }
        }
        return new Snapshot(weights, main, m, v);
    }

    /// <summary>
    /// The whole tensors that parts of several ranks make up, placed element by element from each part's block and
    /// range (index arithmetic written here, independent of the checkpoint code). Replicas must agree; every element
    /// must be covered.
    /// </summary>
    internal static Dictionary<string, float[]> Whole(IEnumerable<Part> parts, string what)
    {
        var whole = new Dictionary<string, float[]>();
        var covered = new Dictionary<string, bool[]>();
        foreach (var part in parts)
        {
            var r = part.Range;
            long size = r.GlobalShape.Aggregate(1L, (a, b) => a * b);
            if (!whole.TryGetValue(part.Name, out var values))
            {
                whole[part.Name] = values = new float[size];
                covered[part.Name] = new bool[size];
            }
            var seen = covered[part.Name];
            var data = part.Values.data<float>().ToArray();
            int rank = r.GlobalShape.Length;
            var local = new long[rank];
            for (long k = r.Start; k < r.End; k++)
            {
                long rest = k, g = 0;
                for (int d = rank - 1; d >= 0; d--)
                {
                    local[d] = rest % r.LocalShape[d];
                    rest /= r.LocalShape[d];
                }
                for (int d = 0; d < rank; d++) g = g * r.GlobalShape[d] + local[d] + r.Offsets[d];
                float value = data[k - r.Start];
                if (seen[g] && BitConverter.SingleToInt32Bits(values[g]) != BitConverter.SingleToInt32Bits(value))
                    Assert.Fail($"{what} of {part.Name}: replicas disagree at element {g}: {values[g]:R} and {value:R}");
                values[g] = value;
                seen[g] = true;
            }
        }
        foreach (var (name, seen) in covered)
            Assert.True(seen.All(x => x), $"{what} of {name}: {seen.Count(x => !x)} of {seen.Length} elements held by no rank");
        return whole;
    }

    /// <summary>Two sets of whole tensors are equal bit for bit.</summary>
    internal static void AssertBitEqual(Dictionary<string, float[]> expected, Dictionary<string, float[]> actual, string what)
    {
        Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
        foreach (var (name, e) in expected)
        {
            var a = actual[name];
            int first = Enumerable.Range(0, e.Length).FirstOrDefault(i => BitConverter.SingleToInt32Bits(e[i]) != BitConverter.SingleToInt32Bits(a[i]), -1);
            Assert.True(first < 0, $"{what} of {name} differs at element {first}: {(first < 0 ? 0 : a[first]):R} instead of {(first < 0 ? 0 : e[first]):R}");
        }
    }

    /// <summary>Every state of a snapshot set, whole: weights, main, exp_avg, exp_avg_sq.</summary>
    internal static Dictionary<string, float[]>[] WholeState(IEnumerable<Snapshot> ranks, string what)
    {
        var all = ranks.ToList();
        return
        [
            Whole(all.SelectMany(s => s.Weights), what + ": weights"),
            Whole(all.SelectMany(s => s.Main), what + ": fp32 main parameters"),
            Whole(all.SelectMany(s => s.ExpAvg), what + ": exp_avg"),
            Whole(all.SelectMany(s => s.ExpAvgSq), what + ": exp_avg_sq"),
        ];
    }
}
