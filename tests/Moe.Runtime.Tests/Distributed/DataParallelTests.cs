using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Commands.Train;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>
/// Data parallel against the one-device run, TinyMixtral in float32 with in-process ranks: the same global batch
/// and micro-batch size give the same losses step for step and, after the first step, the same reduced gradients.
/// </summary>
[Collection("Console")]
public class DataParallelTests
{
    /// <summary>TinyMixtral with 2 layers and 64-token samples; global batch 8 of micro-batches of 2 (4 micro-batches on one device).</summary>
    private static RecipeSettings Tiny(int gpus, bool distributedOptimizer = true) => TrainCommand.ResolvePaths(new Moe.Recipes.TinyMixtral().ToSettings() with
    {
        Model = Model.TinyMixtral with { Layers = 2 },
        Parallelism = new Parallelism { Gpus = gpus },
        Data = new Moe.Recipes.TinyMixtral().Data with { SequenceLength = 64 },
        Training = new Moe.Recipes.TinyMixtral().Training with
        {
            Steps = 3, WarmupSteps = 1, GlobalBatchSize = 8, MicroBatchSize = 2, DistributedOptimizer = distributedOptimizer,
        },
    });

    private static (double[] Losses, Dictionary<string, Tensor> Gradients)[] Train(RecipeSettings s)
    {
        var p = s.Parallelism;
        var layout = new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
        return InProcessJob.Run(layout, TimeSpan.FromSeconds(60), rank =>
        {
            using var source = new IndexedSampleSource(s, s.Model.EosTokenId);
            using var metrics = new MetricsWriter(null);
            using var trainer = new Trainer(s, rank, TextWriter.Null);
            Dictionary<string, Tensor>? gradients = null;
            var result = trainer.Run(source, TextWriter.Null, metrics, logEvery: 1000, afterStep: step =>
            {
                if (step == 1) gradients = trainer.ReducedGradients();
            });
            return (result.Steps.Select(m => m.Loss).ToArray(), gradients!);
        });
    }

    private static void AssertClose(double expected, double actual, double relative, string what) =>
        Assert.True(Math.Abs(expected - actual) <= relative * Math.Abs(expected), $"{what}: {actual:R} vs one device {expected:R}");

    [Theory]
    [InlineData(2, true)]
    [InlineData(4, true)]
    [InlineData(2, false)]
    public void DataParallel_EqualsTheOneDeviceRun(int gpus, bool distributedOptimizer)
    {
        var one = Train(Tiny(1, distributedOptimizer)).Single();
        var ranks = Train(Tiny(gpus, distributedOptimizer));
        Assert.Equal(gpus, ranks.Length);
        foreach (var (losses, gradients) in ranks)
        {
            Assert.Equal(one.Losses.Length, losses.Length);
            for (int i = 0; i < losses.Length; i++) AssertClose(one.Losses[i], losses[i], 1e-5, $"loss of step {i + 1}");
            Assert.Equal(one.Gradients.Keys.Order(), gradients.Keys.Order());
            foreach (var (name, expected) in one.Gradients)
            {
                double error = (gradients[name] - expected).norm().item<float>(), scale = expected.norm().item<float>();
                Assert.True(error <= 1e-5 * scale, $"gradient of {name}: relative error {error / scale:E2}");
            }
        }
    }
}
