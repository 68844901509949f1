using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Commands.Train;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>
/// Every layout against the one-device run, TinyMixtral in float32 with in-process ranks: the same global batch and
/// micro-batch size must give the same losses step for step, the same per-expert token counts, and after the first
/// step the same reduced gradients — each rank's block of each whole gradient (≤ 1e-5 relative).
/// </summary>
[Collection("Console")]
public class ParallelEquivalenceTests
{
    /// <summary>One rank's run: its losses, metrics, reduced gradients after step 1 and its parameters' shards.</summary>
    public sealed record RankRun(StepMetrics[] Steps, Dictionary<string, Tensor> Gradients, IReadOnlyList<ModelParameter> Parameters);

    /// <summary>TinyMixtral with 2 layers and 64-token samples; global batch 8 of micro-batches of 2 (4 micro-batches on one device).</summary>
    internal static RecipeSettings Tiny(Parallelism parallelism, Func<RecipeSettings, RecipeSettings>? change = null)
    {
        var s = TrainCommand.ResolvePaths(new Moe.Recipes.TinyMixtral().ToSettings() with
        {
            Model = Model.TinyMixtral with { Layers = 2 },
            Parallelism = parallelism,
            Data = new Moe.Recipes.TinyMixtral().Data with { SequenceLength = 64 },
            Training = new Moe.Recipes.TinyMixtral().Training with { Steps = 3, WarmupSteps = 1, GlobalBatchSize = 8, MicroBatchSize = 2 },
        });
        return change is null ? s : change(s);
    }

    internal static RankRun[] Train(RecipeSettings s)
    {
        var p = s.Parallelism;
        var layout = new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
        return InProcessJob.Run(layout, TimeSpan.FromSeconds(120), rank =>
        {
            using var source = new IndexedSampleSource(s, s.Model.EosTokenId);
            var trainer = new Trainer(s, rank, TextWriter.Null);
            Dictionary<string, Tensor>? gradients = null;
            var result = trainer.Run(source, new TrainingObservers([]), step =>
            {
                if (step == 1) gradients = trainer.ReducedGradients();
            });
            return new RankRun(result.Steps.ToArray(), gradients!, trainer.Parameters);
        });
    }

    private static void AssertClose(double expected, double actual, double relative, string what) =>
        Assert.True(Math.Abs(expected - actual) <= relative * Math.Abs(expected), $"{what}: {actual:R} vs one device {expected:R}");

    /// <summary>Runs <paramref name="layout"/> and the one-device run of the same settings and compares them; returns both runs.</summary>
    internal static (RankRun One, RankRun[] Ranks) AssertEqualsOneDevice(RecipeSettings layout)
    {
        var one = Train(layout with { Parallelism = new Parallelism { Gpus = 1 } }).Single();
        var ranks = Train(layout);
        Assert.Equal(layout.Parallelism.Gpus, ranks.Length);
        foreach (var (run, r) in ranks.Select((run, r) => (run, r)))
        {
            Assert.Equal(one.Steps.Length, run.Steps.Length);
            for (int i = 0; i < run.Steps.Length; i++)
            {
                AssertClose(one.Steps[i].Loss, run.Steps[i].Loss, 1e-5, $"rank {r}: loss of step {i + 1}");
                Assert.Equal(one.Steps[i].TokensPerExpert, run.Steps[i].TokensPerExpert);
                Assert.Equal(one.Steps[i].DropRate, run.Steps[i].DropRate, 12);
            }
            foreach (var p in run.Parameters)
            {
                var whole = one.Gradients[p.Name];
                var expected = p.Slice(whole);
                var actual = run.Gradients[p.Name];
                double error = (actual - expected).norm().item<float>(), scale = expected.norm().item<float>();
                Assert.True(error <= 1e-5 * Math.Max(scale, 1e-12), $"rank {r}: gradient of {p.Name}: relative error {error / scale:E2}");
            }
        }
        return (one, ranks);
    }

    [Theory]
    [InlineData(2, true)]
    [InlineData(4, true)]
    [InlineData(2, false)]
    public void DataParallel_EqualsTheOneDeviceRun(int gpus, bool distributedOptimizer) =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = gpus }, s => s with { Training = s.Training with { DistributedOptimizer = distributedOptimizer } }));

    [Theory]
    [InlineData(2, 2)]   // EP 2: two experts per rank, dense data parallel 2
    [InlineData(4, 4)]   // EP 4: one expert per rank
    [InlineData(4, 2)]   // DP 4 × EP 2: expert data parallel 2
    public void ExpertParallel_EqualsTheOneDeviceRun(int gpus, int ep) =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = gpus, Expert = ep }));

    [Fact]
    public void ExpertParallelWithExpertTensorParallel_EqualsTheOneDeviceRun() =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = 4, Expert = 2, ExpertTensor = 2 }));

    [Fact]
    public void ExpertParallelWithCapacityAndProbsDrops_EqualsTheOneDeviceRun() =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = 2, Expert = 2 }, s => s with { Capacity = new Capacity { Factor = 1.0, DropPolicy = DropPolicy.Probs } }));

    [Fact]
    public void AllGatherDispatcher_EqualsTheOneDeviceRun() =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = 2, Expert = 2 }, s => s with { Dispatcher = TokenDispatcher.AllGather }));
}
