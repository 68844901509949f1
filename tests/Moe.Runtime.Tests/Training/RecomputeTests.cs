using Moe.Dsl;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using Moe.Runtime.Tests.Distributed;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Training;

/// <summary>
/// Activation recompute must not change a single bit: on the CPU in float32 the loss and every parameter's gradient
/// with each recompute setting equal (torch.equal) those of the same model and batch without recompute — on one
/// device, and with expert parallel 2 (in-process ranks), where the MoE layer's all-to-all reruns in the backward.
/// </summary>
[Collection("Console")]
public class RecomputeTests
{
    private static readonly MixtralConfig Config = MixtralConfig.From(Model.TinyMixtral with { Layers = 3 });

    private static MoeOptions Options(bool megatron) => megatron
        ? new MoeOptions { TopK = 2, AuxLossConvention = AuxLossConvention.Megatron, ZLoss = true }
        : new MoeOptions { TopK = 2 };

    /// <summary>One forward and backward of a 3-layer TinyMixtral (seed 7) on two 32-token sequences: the loss and every gradient.</summary>
    private static (float Loss, Dictionary<string, Tensor> Grads, long[][] Counts) Step(RecomputePlan plan, bool megatron = false, bool documents = false)
    {
        using var model = MixtralModel.Random(Config, 7, ScalarType.Float32, CPU, Options(megatron));
        model.train();
        model.Recomputation = plan;
        var gen = new torch.Generator(3);
        var tokens = torch.randint(0, Config.VocabSize, [2, 32], generator: gen, dtype: ScalarType.Int64);
        var (labels, mask) = MixtralModel.ShiftedLabels(tokens);
        var docs = documents ? torch.tensor(Enumerable.Range(0, 64).Select(i => (long)(i % 32 / 12)).ToArray()).view(2, 32) : null;
        var o = model.Forward(tokens, labels, mask, documentIdsBS: docs, returnLogits: false);
        var loss = o.LmLoss! + 0.02 * o.AuxLoss + (o.ZLoss is null ? 0 : 1e-3 * o.ZLoss);
        loss.backward();
        ManagedBackward.Complete();
        var grads = model.ParametersInForwardOrder().ToDictionary(p => p.Name, p => p.Parameter.grad!.clone());
        var counts = o.Layers.Select(l => l.TokensPerExpert.data<long>().ToArray()).ToArray();
        return (loss.item<float>(), grads, counts);
    }

    /// <summary>Same shape and every element equal (torch.equal; TorchSharp's returns the element-wise comparison).</summary>
    private static bool BitEqual(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && torch.equal(a, b).all().item<bool>();

    private static void AssertBitEqual((float Loss, Dictionary<string, Tensor> Grads, long[][] Counts) plain, (float Loss, Dictionary<string, Tensor> Grads, long[][] Counts) recomputed)
    {
        Assert.Equal(plain.Loss, recomputed.Loss);
        Assert.Equal(plain.Counts, recomputed.Counts);
        Assert.Equal(plain.Grads.Keys, recomputed.Grads.Keys);
        foreach (var (name, g) in plain.Grads)
        {
            Assert.True(g.abs().sum().item<float>() > 0, $"{name}: no gradient at all, the comparison would prove nothing");
            Assert.True(BitEqual(g, recomputed.Grads[name]), $"{name}: gradient differs by up to {(g - recomputed.Grads[name]).abs().max().item<float>():E2}");
        }
    }

    public static TheoryData<string, Recompute> Settings => new()
    {
        { "full uniform 1", new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Uniform, NumLayers = 1 } },
        { "full uniform 2", new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Uniform, NumLayers = 2 } },
        { "full block 2", new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Block, NumLayers = 2 } },
        { "selective core_attn", new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.CoreAttn } },
        { "selective moe", new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.Moe } },
        { "selective core_attn moe_act moe", new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.CoreAttn | RecomputeModules.MoeAct | RecomputeModules.Moe } },
    };

    [Theory]
    [MemberData(nameof(Settings))]
    public void Recompute_GradientsBitEqual(string name, Recompute recompute)
    {
        var plan = RecomputePlan.For(recompute, Config.Layers);
        Assert.True(plan.Any, name);
        AssertBitEqual(Step(RecomputePlan.None), Step(plan));
    }

    [Theory]
    [MemberData(nameof(Settings))]
    public void RecomputeWithMegatronLossesAndDocumentMask_GradientsBitEqual(string name, Recompute recompute)
    {
        var plan = RecomputePlan.For(recompute, Config.Layers);
        Assert.True(plan.Any, name);
        AssertBitEqual(Step(RecomputePlan.None, megatron: true, documents: true), Step(plan, megatron: true, documents: true));
    }

    [Fact]
    public void Checkpoint_RunsTheRegionAgainInTheBackward()
    {
        // y = tanh(x·w) summed: the region runs once in the forward (without autograd) and once more in the backward,
        // and the gradients are those of the plain computation: ∂/∂x = (1 − tanh²)·w, ∂/∂w = Σ (1 − tanh²)·x.
        var x = torch.tensor(new float[] { 0.5f, -1f, 2f }).requires_grad_(true);
        var w = torch.tensor(new float[] { 0.3f }).requires_grad_(true);
        int runs = 0;
        bool gradInRerun = false;
        Tensor[] Region(Tensor[] i)
        {
            runs++;
            if (runs == 2) gradInRerun = torch.is_grad_enabled();
            return [torch.tanh(i[0] * w)];
        }
        var y = ActivationRecompute.Checkpoint("test", Region, x)[0];
        Assert.Equal(1, runs);
        y.sum().backward();
        ManagedBackward.Complete();
        Assert.Equal(2, runs);
        Assert.True(gradInRerun);
        var t = new[] { 0.5f, -1f, 2f }.Select(v => MathF.Tanh(v * 0.3f)).ToArray();
        Assert.Equal(t.Select(v => (1 - v * v) * 0.3f).ToArray(), x.grad!.data<float>().ToArray(), new FloatTolerance(1e-6f));
        Assert.Equal(new[] { 0.5f, -1f, 2f }.Select((v, i) => (1 - t[i] * t[i]) * v).Sum(), w.grad!.item<float>(), 5);
    }

    private sealed class FloatTolerance(float tolerance) : IEqualityComparer<float>
    {
        public bool Equals(float a, float b) => Math.Abs(a - b) <= tolerance;
        public int GetHashCode(float v) => 0;
    }

    [Fact]
    public void Plan_ChunksAsMegatron()
    {
        // 5 layers: uniform 2 → [0,2) [2,4) [4,5); block 2 → layers 0 and 1 alone, 2..4 keep their activations.
        var uniform = RecomputePlan.For(new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Uniform, NumLayers = 2 }, 5);
        Assert.Equal(new[] { (0, 2), (2, 4), (4, 5) }, uniform.Chunks);
        var block = RecomputePlan.For(new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Block, NumLayers = 2 }, 5);
        Assert.Equal(new[] { (0, 1), (1, 2) }, block.Chunks);
        var selective = RecomputePlan.For(new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.MoeAct }, 5);
        Assert.False(selective.Any);   // moe_act: the grouped experts always recompute SwiGLU
        Assert.Throws<UserError>(() => RecomputePlan.For(new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Uniform }, 5));
        Assert.Throws<UserError>(() => RecomputePlan.For(new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.Layernorm }, 5));
    }

    [Fact]
    public void BenchFlags_ParseAsMegatronsAndRunOnCpu()
    {
        var d = new Moe.Runtime.Commands.Bench.BenchCommandDefinition();
        var parse = d.Command.Parse(["--model", "tiny", "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"]);
        Assert.Empty(parse.Errors);
        var r = d.Recompute.Parse(parse);
        Assert.Equal(new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Block, NumLayers = 1 }, r);
        var selective = d.Recompute.Parse(d.Command.Parse(["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "moe"]));
        Assert.Equal(RecomputeModules.CoreAttn | RecomputeModules.Moe, selective.Modules);
        Assert.Equal(RecomputeModules.MoeAct | RecomputeModules.Moe, Moe.Runtime.Commands.RecomputeOptions.ParseModules(["moe_act,moe"]));
        var unknown = Assert.Throws<UserError>(() => Moe.Runtime.Commands.RecomputeOptions.ParseModules(["shared_experts"]));
        Assert.Contains("valid: core_attn, moe_act, layernorm, mlp, moe", unknown.Message);

        var output = new StringWriter();
        Assert.Equal(0, Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 2, 32, 1, 1, "cpu", Recompute: r), output));
        using var doc = System.Text.Json.JsonDocument.Parse(output.ToString());
        Assert.Equal("full block 1", doc.RootElement.GetProperty("recompute").GetString());
        // Full recompute without a method is refused before any work (MOE0302).
        var error = Assert.Throws<UserError>(() => Moe.Runtime.Commands.Bench.BenchCommand.Execute(
            new("tiny", 2, 32, 1, 1, "cpu", Recompute: new Recompute { Granularity = RecomputeGranularity.Full }), new StringWriter()));
        Assert.Contains("MOE0302", error.Message);
    }

    [Fact]
    public void ExpertBiasCounts_TakenOnceUnderRecompute()
    {
        // Sigmoid routing with the expert bias: the counts are taken only with gradients enabled, i.e. in the rerun.
        float[] Counts(RecomputePlan plan)
        {
            var options = new MoeOptions { TopK = 2, ScoreFunction = ScoreFunction.Sigmoid, ExpertBias = true, AuxLossConvention = AuxLossConvention.Megatron };
            using var model = MixtralModel.Random(Config, 7, ScalarType.Float32, CPU, options);
            model.train();
            model.Recomputation = plan;
            var tokens = torch.randint(0, Config.VocabSize, [2, 32], generator: new torch.Generator(5), dtype: ScalarType.Int64);
            var (labels, mask) = MixtralModel.ShiftedLabels(tokens);
            model.Forward(tokens, labels, mask, returnLogits: false).LmLoss!.backward();
            ManagedBackward.Complete();
            return model.Layers.SelectMany(l => l.Moe.ExpertBias!.CountsE.data<float>().ToArray()).ToArray();
        }
        var plain = Counts(RecomputePlan.None);
        Assert.Equal(3 * 64 * 2, plain.Sum());   // 3 layers × 64 tokens × top-2
        Assert.Equal(plain, Counts(RecomputePlan.For(Recompute.FullEveryLayer, 3)));
        Assert.Equal(plain, Counts(RecomputePlan.For(new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.Moe }, 3)));
    }

    [Theory]
    [InlineData(RecomputeGranularity.Full)]
    [InlineData(RecomputeGranularity.Selective)]
    public void ExpertParallel2_GradientsBitEqual(RecomputeGranularity granularity)
    {
        var recompute = granularity == RecomputeGranularity.Full
            ? Recompute.FullEveryLayer
            : new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.CoreAttn | RecomputeModules.Moe };
        var s = ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 2, Expert = 2 }, x => x with { Training = x.Training with { Steps = 1 } });
        var plain = ParallelEquivalenceTests.Train(s);
        var recomputed = ParallelEquivalenceTests.Train(s with { Recompute = recompute });
        for (int r = 0; r < 2; r++)
        {
            Assert.Equal(plain[r].Steps[0].Loss, recomputed[r].Steps[0].Loss);
            Assert.Equal(plain[r].Steps[0].TokensPerExpert, recomputed[r].Steps[0].TokensPerExpert);
            foreach (var (name, g) in plain[r].Gradients)
                Assert.True(BitEqual(g, recomputed[r].Gradients[name]), $"rank {r}: {name} differs by up to {(g - recomputed[r].Gradients[name]).abs().max().item<float>():E2}");
        }
    }
}
