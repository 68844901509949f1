using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>
/// Pipeline parallel: the schedules' order against Megatron-Core's, derived by hand from
/// megatron/core/pipeline_parallel/schedules.py (forward_backward_pipelining_without_interleaving and
/// forward_backward_pipelining_with_interleaving: warm-up counts, the schedule table, reversed chunks in the
/// backward), and layouts with pipeline stages against the one-device run (<see cref="ParallelEquivalenceTests"/>).
/// </summary>
[Collection("Console")]
public class PipelineParallelTests
{
    private static string Order(int pp, int stage, int m, int chunks = 1, bool forwardOnly = false) =>
        string.Join(" ", PipelineSchedules.For(pp, stage, m, chunks, forwardOnly));

    [Theory]
    // pp 4, M 6: warm-up pp − stage − 1 forwards, then F/B in turn, then the remaining backwards.
    [InlineData(4, 0, 6, "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5")]
    [InlineData(4, 1, 6, "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5")]
    [InlineData(4, 2, 6, "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5")]
    [InlineData(4, 3, 6, "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5")]
    // Fewer micro-batches than stages: the warm-up is capped at M (Megatron's min(pp − rank − 1, M)).
    [InlineData(4, 0, 2, "F0 F1 B0 B1")]
    [InlineData(2, 0, 1, "F0 B0")]
    public void OneForwardOneBackward_FollowsMegatronsOrder(int pp, int stage, int m, string expected) =>
        Assert.Equal(expected, Order(pp, stage, m));

    [Theory]
    // pp 2, VPP 2, M 4: virtual micro-batch k is micro-batch (k div 4)·2 + k mod 2 through chunk (k mod 4) div 2;
    // backwards run the chunks in reverse. Warm-up: stage 0 (2−0−1)·2 + (2−1)·2 = 4, stage 1 0 + 2 = 2.
    [InlineData(2, 0, 4, "F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3")]
    [InlineData(2, 1, 4, "F0 F1 F0.1 B0.1 F1.1 B1.1 F2 B0 F3 B1 F2.1 B2.1 F3.1 B3.1 B2 B3")]
    // M = pp: every forward first, then every backward.
    [InlineData(2, 0, 2, "F0 F1 F0.1 F1.1 B0.1 B1.1 B0 B1")]
    [InlineData(2, 1, 2, "F0 F1 F0.1 F1.1 B0.1 B1.1 B0 B1")]
    public void Interleaved_FollowsMegatronsOrder(int pp, int stage, int m, string expected) =>
        Assert.Equal(expected, Order(pp, stage, m, chunks: 2));

    [Fact]
    public void InterleavedWarmup_IsMegatronsCount()
    {
        // pp 4, VPP 3, M 8: (4 − stage − 1)·2 + (3 − 1)·4.
        Assert.Equal(new[] { 14, 12, 10, 8 }, Enumerable.Range(0, 4).Select(s => PipelineSchedules.WarmupCount(4, s, 8, 3)));
        // Capped at M·VPP: pp 4, VPP 2, M 8 gives stage 0 (3·2 + 4) = 10 ≤ 16.
        Assert.Equal(10, PipelineSchedules.WarmupCount(4, 0, 8, 2));
    }

    [Fact]
    public void ForwardOnly_RunsEveryForwardInTableOrder()
    {
        Assert.Equal("F0 F1 F2", Order(2, 0, 3, forwardOnly: true));
        Assert.Equal("F0 F1 F0.1 F1.1 F2 F3 F2.1 F3.1", Order(2, 1, 4, chunks: 2, forwardOnly: true));
    }

    [Theory]
    [InlineData(3)]   // not a multiple of pp
    [InlineData(1)]   // fewer than pp
    public void InterleavedWithTooFewOrUnevenMicroBatches_IsAUserError(int m)
    {
        var e = Assert.Throws<UserError>(() => PipelineSchedules.For(2, 0, m, chunks: 2));
        Assert.Contains($"this step has {m}", e.Message);
        Assert.Contains("MOE0203", e.Message);
    }

    [Fact]
    public void EveryScheduleRunsEachForwardAndBackwardOnce()
    {
        foreach (var (pp, chunks, m) in new[] { (2, 1, 5), (4, 1, 3), (3, 2, 6), (4, 3, 8), (2, 2, 6) })
            for (int stage = 0; stage < pp; stage++)
            {
                var actions = PipelineSchedules.For(pp, stage, m, chunks);
                Assert.Equal(2 * m * chunks, actions.Distinct().Count());
                // A micro-batch's backward through a chunk comes after its forward through that chunk.
                foreach (var b in actions.Where(a => a.Backward))
                    Assert.True(actions.ToList().IndexOf(PipelineAction.F(b.MicroBatch, b.Chunk)) < actions.ToList().IndexOf(b), $"pp {pp} stage {stage}: {b}");
            }
    }

    [Fact]
    public void Pipeline2_EqualsTheOneDeviceRun() =>
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 2, Pipeline = 2 }));

    [Fact]
    public void Pipeline2WithVirtualPipeline2AndUnevenStages_EqualsTheOneDeviceRun() =>
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(
            new Parallelism { Gpus = 2, Pipeline = 2, VirtualPipeline = 2, FirstStageLayers = 2, LastStageLayers = 4 },
            s => s with { Model = s.Model with { Layers = 6 }, Router = s.Router with { ZLossCoeff = 1e-2 } }));   // z-loss too: both attached per layer

    [Theory]
    [InlineData(null)]   // 1F1B: middle stages receive and send both ways
    [InlineData(2)]      // interleaved: the last stage's chunk 0 feeds the first stage's chunk 1
    public void Pipeline4_EqualsTheOneDeviceRun(int? virtualPipeline) =>
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(
            new Parallelism { Gpus = 4, Pipeline = 4, VirtualPipeline = virtualPipeline },
            s => s with { Model = s.Model with { Layers = 4 * (virtualPipeline ?? 1) } }));

    [Fact]
    public void Pipeline2WithExpertParallel2_EqualsTheOneDeviceRun() =>
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 4, Pipeline = 2, Expert = 2 }));

    [Fact]
    public void EvaluatorWithPipeline2_EqualsTheOneDeviceLoss()
    {
        var s = ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 2, Pipeline = 2 }, s => s with { Training = s.Training with { EvalIters = 1 } });
        double Evaluate(RankContext rank)
        {
            using var validation = new IndexedSampleSource(s, s.Model.EosTokenId, split: 1, samples: Evaluator.SampleCount(s));
            var stage = PipelineStage.Of(s.Parallelism with { Pipeline = rank.Groups.Layout.Pipeline }, s.Model.Layers, rank.Groups.Coordinates.Pp);
            using var model = new MixtralModel(MixtralConfig.From(s.Model), MoeOptions.From(s), ScalarType.Float32, CPU, stage: stage);
            model.InitializeWeights(1);
            model.train();
            return new Evaluator(model, validation, s, rank).Loss();
        }
        var single = RankContext.Single(s, CPU);
        double one = Evaluate(single);
        single.Groups.Dispose();
        var ranks = InProcessJob.Run(new RankLayout(2, 1, 2, 1, 1, 1, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60), Evaluate);
        Assert.All(ranks, loss => Assert.True(Math.Abs(loss - one) <= 1e-5 * one, $"{loss:R} vs one device {one:R}"));
    }

    [Fact]
    public void StagesOwnTheWiringsLayersWithGlobalNames()
    {
        var p = new Parallelism { Gpus = 2, Pipeline = 2, VirtualPipeline = 2, FirstStageLayers = 2, LastStageLayers = 4 };
        var config = MixtralConfig.From(Model.TinyMixtral with { Layers = 6 });
        // Megatron: chunk c of stage s starts at c·L/v + (layers of the stages before s)/v: stage 0 {0}, {3}; stage 1 {1, 2}, {4, 5}.
        string Names(int stage)
        {
            using var model = new MixtralModel(config, new MoeOptions { TopK = config.TopK }, ScalarType.Float32, CPU, stage: PipelineStage.Of(p, 6, stage));
            return string.Join(" ", model.ParametersInForwardOrder().Select(x => x.Name).Where(n => !n.Contains(".layers.") || n.EndsWith("input_layernorm", StringComparison.Ordinal)));
        }
        Assert.Equal("model.embed_tokens model.layers.0.input_layernorm model.layers.3.input_layernorm", Names(0));
        Assert.Equal("model.layers.1.input_layernorm model.layers.2.input_layernorm model.layers.4.input_layernorm model.layers.5.input_layernorm model.norm lm_head", Names(1));
    }

    [Fact]
    public void BenchWithPipeline2_ReportsThroughputPerGpu()
    {
        var output = new StringWriter();
        Assert.Equal(0, Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 2, 32, 1, 2, "cpu", Gpus: 2, MicroBatches: 4, Pipeline: 2), output));
        using var doc = System.Text.Json.JsonDocument.Parse(output.ToString());
        Assert.Equal(2, doc.RootElement.GetProperty("pp").GetInt32());
        Assert.Equal(1, doc.RootElement.GetProperty("dp").GetInt32());
        double step = doc.RootElement.GetProperty("step_s").GetDouble(), perGpu = doc.RootElement.GetProperty("tokens_per_s_per_gpu").GetDouble();
        Assert.Equal(4 * 32 / step / 2, perGpu, 6);   // the pipeline's 4 micro-batches of 32 tokens, shared by its 2 GPUs
    }

    [Fact]
    public void BenchWithPipelineNotDividingTheLayers_IsAUserError()
    {
        var e = Assert.Throws<UserError>(() => Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 3, 32, 1, 2, "cpu", Gpus: 2, Pipeline: 2), TextWriter.Null));
        Assert.Contains("--pp 2 must divide --layers 3", e.Message);
    }

    [Fact]
    public void TrainerWithInterleavingAndMicroBatchesNotAMultipleOfStages_IsAUserErrorBeforeTraining()
    {
        // Global batch 6 of micro-batches of 2: three micro-batches for two stages (Megatron raises at the first step).
        var s = ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 2, Pipeline = 2, VirtualPipeline = 2 },
            s => s with { Model = s.Model with { Layers = 4 }, Training = s.Training with { GlobalBatchSize = 6 } });
        var e = Assert.Throws<UserError>(() => InProcessJob.Run(new RankLayout(2, 1, 2, 1, 1, 1, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60),
            rank => new Trainer(s, rank, TextWriter.Null)));
        Assert.Contains("this step has 3", e.Message);
        Assert.Contains("MOE0203", e.Message);
    }
}
