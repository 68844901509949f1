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
/// Full activation recompute under pipeline parallelism (issues 13 and 17), as Megatron-Core runs it: each pipeline
/// stage, and each model chunk of a virtual pipeline, applies <c>--recompute-method uniform|block</c> with
/// <c>--recompute-num-layers</c> to its own layers (TransformerBlock._checkpointed_forward works per block). CPU,
/// float32, in-process ranks: after one step every reduced gradient is bit-equal to the same pipeline layout without
/// recompute, and the losses equal the one-device run's.
/// </summary>
[Collection("Console")]
public class PipelineRecomputeTests
{
    private static Recompute Full(RecomputeMethod method, int layers) =>
        new() { Granularity = RecomputeGranularity.Full, Method = method, NumLayers = layers };

    /// <summary>Two steps of TinyMixtral (<see cref="ParallelEquivalenceTests.Tiny"/>: global batch 8 in micro-batches of 2, so 4 per step).</summary>
    private static RecipeSettings Layout(Parallelism p, int layers, bool zLoss) => ParallelEquivalenceTests.Tiny(p, s => s with
    {
        Model = s.Model with { Layers = layers },
        Router = zLoss ? s.Router with { ZLossCoeff = 1e-2 } : s.Router,
        Training = s.Training with { Steps = 2 },
    });

    private static bool BitEqual(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && torch.equal(a, b).all().item<bool>();

    /// <summary>
    /// <paramref name="s"/> with <paramref name="recompute"/> against the same layout without it (gradients after step 1
    /// bit-equal, losses and token counts equal) and against the one-device run without it (losses ≤ 1e-5 relative).
    /// </summary>
    private static void AssertRecomputeChangesNothing(RecipeSettings s, Recompute recompute)
    {
        Assert.True(s.AuxLossCoeff > 0 && s.Router.LoadBalancing != LoadBalancing.None, "the per-layer aux-loss scaler must be on the path under test");
        var one = ParallelEquivalenceTests.Train(s with { Parallelism = new Parallelism { Gpus = 1 } }).Single();
        var plain = ParallelEquivalenceTests.Train(s);
        var recomputed = ParallelEquivalenceTests.Train(s with { Recompute = recompute });
        Assert.Equal(s.Parallelism.Gpus, recomputed.Length);
        for (int r = 0; r < recomputed.Length; r++)
        {
            Assert.Equal(plain[r].Steps.Length, recomputed[r].Steps.Length);
            for (int i = 0; i < recomputed[r].Steps.Length; i++)
            {
                double loss = recomputed[r].Steps[i].Loss, expected = one.Steps[i].Loss;
                Assert.True(Math.Abs(loss - expected) <= 1e-5 * Math.Abs(expected), $"rank {r}, step {i + 1}: loss {loss:R} vs one device {expected:R}");
                Assert.Equal(plain[r].Steps[i].Loss, loss);
                Assert.Equal(one.Steps[i].TokensPerExpert, recomputed[r].Steps[i].TokensPerExpert);
            }
            Assert.Equal(plain[r].Gradients.Keys.Order(), recomputed[r].Gradients.Keys.Order());
            foreach (var (name, g) in plain[r].Gradients)
            {
                Assert.True(g.abs().sum().item<float>() > 0, $"rank {r}: {name} has no gradient at all; the comparison would prove nothing");
                var other = recomputed[r].Gradients[name];
                Assert.True(BitEqual(g, other), $"rank {r}: gradient of {name} differs with recompute by up to {(g - other).abs().max().item<float>():E2}");
            }
        }
    }

    public static TheoryData<string, RecomputeMethod, int> Pipeline2Cases => new()
    {
        { "uniform 1: every layer its own unit", RecomputeMethod.Uniform, 1 },
        { "uniform 2: the stage's two layers one unit", RecomputeMethod.Uniform, 2 },
        { "block 1: the stage's first layer recomputed, its second kept", RecomputeMethod.Block, 1 },
    };

    [Theory]
    [MemberData(nameof(Pipeline2Cases))]
    public void Pipeline2WithFullRecompute_GradientsBitEqualAndLossesEqualOneDevice(string name, RecomputeMethod method, int layers)
    {
        _ = name;
        AssertRecomputeChangesNothing(Layout(new Parallelism { Gpus = 2, Pipeline = 2 }, 4, zLoss: false), Full(method, layers));
    }

    [Theory]
    // Stage 0 holds chunks {0} and {3}, stage 1 {1, 2} and {4, 5}; NumLayers is bounded by the largest stage (4).
    [InlineData(RecomputeMethod.Uniform, 2)]   // stage 0: each one-layer chunk whole; stage 1: each chunk one unit of two
    [InlineData(RecomputeMethod.Block, 1)]     // the first layer of every model chunk
    public void Pipeline2WithVirtualPipeline2AndUnevenStagesAndZLoss_FullRecomputeGradientsBitEqual(RecomputeMethod method, int layers) =>
        AssertRecomputeChangesNothing(
            Layout(new Parallelism { Gpus = 2, Pipeline = 2, VirtualPipeline = 2, FirstStageLayers = 2, LastStageLayers = 4 }, 6, zLoss: true),
            Full(method, layers));

    [Fact]
    public void Pipeline2WithExpertParallel2AndZLoss_FullRecomputeRerunsTheAllToAllAndGradientsBitEqual() =>
        // The recomputed units rerun their dispatchers' all-to-alls in the backward, in the same order on both EP ranks of a stage.
        AssertRecomputeChangesNothing(Layout(new Parallelism { Gpus = 4, Pipeline = 2, Expert = 2 }, 4, zLoss: true), Full(RecomputeMethod.Uniform, 2));

    [Theory]
    // The recomputed units rerun their tensor-parallel (sequence gather / reduce-scatter) and context-parallel
    // (key-value all-gather) collectives in the backward, in the same order on every rank of the group.
    [InlineData(2, 1)]
    [InlineData(1, 2)]
    public void Pipeline2WithTensorOrContextParallel2_FullRecomputeGradientsBitEqual(int tensor, int context) =>
        AssertRecomputeChangesNothing(
            Layout(new Parallelism { Gpus = 4, Pipeline = 2, Tensor = tensor, SequenceParallel = tensor > 1, Context = context }, 4, zLoss: false),
            Full(RecomputeMethod.Uniform, 2));

    [Fact]
    public void PlanUnderVirtualPipeline_AppliesTheMethodToEachModelChunkAsMegatron()
    {
        // 6 layers, PP 2, VPP 2, first stage 2, last 4: stage 0 holds model layers {0}, {3}; stage 1 {1, 2}, {4, 5}
        // (local indices 0 | 1 and 0 1 | 2 3). Megatron builds one TransformerBlock per chunk and applies the method
        // to its layers: uniform 3 → min(0 + 3, layers of the block) = the whole block; block 1 → the block's first.
        var p = new Parallelism { Gpus = 2, Pipeline = 2, VirtualPipeline = 2, FirstStageLayers = 2, LastStageLayers = 4 };
        var stage0 = PipelineStage.Of(p, 6, 0);
        var stage1 = PipelineStage.Of(p, 6, 1);
        Assert.Equal(4, stage0.LargestStageLayers);
        Assert.Equal(new[] { (0, 1), (1, 2) }, RecomputePlan.For(Full(RecomputeMethod.Uniform, 3), stage0).Chunks);
        Assert.Equal(new[] { (0, 2), (2, 4) }, RecomputePlan.For(Full(RecomputeMethod.Uniform, 3), stage1).Chunks);
        Assert.Equal(new[] { (0, 1), (1, 2), (2, 3), (3, 4) }, RecomputePlan.For(Full(RecomputeMethod.Uniform, 1), stage1).Chunks);
        Assert.Equal(new[] { (0, 1), (1, 2) }, RecomputePlan.For(Full(RecomputeMethod.Block, 1), stage0).Chunks);
        Assert.Equal(new[] { (0, 1), (2, 3) }, RecomputePlan.For(Full(RecomputeMethod.Block, 1), stage1).Chunks);
        Assert.Equal(new[] { (0, 1), (1, 2), (2, 3), (3, 4) }, RecomputePlan.For(Full(RecomputeMethod.Block, 4), stage1).Chunks);
        // Without a virtual pipeline a stage is one block: 8 layers over 2 stages, uniform 3 → [0, 3) [3, 4).
        Assert.Equal(new[] { (0, 3), (3, 4) }, RecomputePlan.For(Full(RecomputeMethod.Uniform, 3), PipelineStage.Of(new Parallelism { Gpus = 2, Pipeline = 2 }, 8, 1)).Chunks);
    }

    [Fact]
    public void NumLayersAboveTheLargestStage_IsAUserErrorNamingTheBound()
    {
        var e = Assert.Throws<UserError>(() => RecomputePlan.For(Full(RecomputeMethod.Uniform, 5),
            PipelineStage.Of(new Parallelism { Gpus = 2, Pipeline = 2, VirtualPipeline = 2, FirstStageLayers = 2, LastStageLayers = 4 }, 6, 0)));
        Assert.Contains("between 1 and 4", e.Message);
        Assert.Contains("largest of the 2 pipeline stages", e.Message);
        Assert.Contains("MOE0302", e.Message);
    }

    [Fact]
    public void TrainerWithPipelineAndNumLayersAboveAStage_IsAUserErrorBeforeTraining()
    {
        // 4 layers over 2 stages: at most 2 per stage (Megatron: between 1 and num_layers_per_pipeline_rank).
        var s = Layout(new Parallelism { Gpus = 2, Pipeline = 2 }, 4, zLoss: false) with { Recompute = Full(RecomputeMethod.Block, 3) };
        var e = Assert.Throws<UserError>(() => InProcessJob.Run(new RankLayout(2, 1, 2, 1, 1, 1, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60),
            rank => new Trainer(s, rank, TextWriter.Null)));
        Assert.Contains("between 1 and 2", e.Message);
        Assert.Contains("MOE0302", e.Message);
    }

    [Theory]
    [InlineData(false, 2.0)]   // kept activations: stage 0 ran F0 F1 before B0, and counted both micro-batches' routing then
    [InlineData(true, 1.0)]    // recomputed: the first passes ran without autograd; B0's rerun counted micro-batch 0 only
    public void PipelineRunnerWithFullRecompute_RerunsTheLayersInTheBackward(bool recompute, double microBatchesCountedAtFirstBackward)
    {
        // The expert-bias counts are taken with autograd on only: in the forward of a kept layer, in the backward's
        // rerun of a recomputed one. Stage 0 of PP 2 with two micro-batches runs F0 F1 B0 B1 (1F1B warm-up), so after
        // its first backward the counts tell whether the runner recomputed its layers.
        var config = MixtralConfig.From(Model.TinyMixtral with { Layers = 2 });
        var options = new MoeOptions { TopK = 2, ScoreFunction = ScoreFunction.Sigmoid, ExpertBias = true, AuxLossConvention = AuxLossConvention.Megatron, LoadBalancing = LoadBalancing.None };
        const int tokens = 16;
        var counted = InProcessJob.Run(new RankLayout(2, 1, 2, 1, 1, 1, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60), rank =>
        {
            var stage = PipelineStage.Of(new Parallelism { Gpus = 2, Pipeline = 2 }, config.Layers, rank.Groups.Coordinates.Pp);
            using var model = new MixtralModel(config, options, ScalarType.Float32, CPU, stage: stage);
            model.InitializeWeights(1);
            model.train();
            model.Recomputation = recompute ? RecomputePlan.For(Full(RecomputeMethod.Uniform, 1), stage) : RecomputePlan.None;
            var ids = torch.arange(tokens, dtype: ScalarType.Int64).view(1, tokens);
            var (labels, mask) = MixtralModel.ShiftedLabels(ids);
            var positions = torch.arange(tokens, dtype: ScalarType.Int64).view(1, tokens);
            var sums = torch.zeros(6 + 2 * config.Layers * config.Experts, dtype: ScalarType.Float64);
            var afterEachBackward = new List<double>();
            new PipelineRunner(model, rank.Groups.Pp, 0, 0).Step(_ => new MicroBatchInputs(ids, labels, mask, positions, null), 2, sums,
                afterBackward: () => afterEachBackward.Add(model.Layers[0].Moe.ExpertBias!.CountsE.sum().item<float>()));
            return afterEachBackward.ToArray();
        });
        double perMicroBatch = tokens * options.TopK;
        Assert.Equal(new[] { microBatchesCountedAtFirstBackward * perMicroBatch, 2 * perMicroBatch }, counted[0]);
        Assert.Equal(new[] { perMicroBatch, 2 * perMicroBatch }, counted[1]);   // stage 1 runs F0 B0 F1 B1: the same either way
    }

    [Fact]
    public void BenchWithPipeline2AndFullRecompute_Runs()
    {
        var output = new StringWriter();
        Assert.Equal(0, Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 4, 32, 1, 1, "cpu", Gpus: 2, MicroBatches: 2, Pipeline: 2,
            Recompute: Full(RecomputeMethod.Block, 2)), output));
        using var doc = System.Text.Json.JsonDocument.Parse(output.ToString());
        Assert.Equal(2, doc.RootElement.GetProperty("pp").GetInt32());
        Assert.Equal("full block 2", doc.RootElement.GetProperty("recompute").GetString());
    }

    [Fact]
    public void BenchWithPipeline2AndNumLayersAboveAStage_IsAUserError()
    {
        var e = Assert.Throws<UserError>(() => Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 4, 32, 1, 1, "cpu", Gpus: 2, Pipeline: 2,
            Recompute: Full(RecomputeMethod.Uniform, 3)), TextWriter.Null));
        Assert.Contains("between 1 and 2", e.Message);
    }
}
