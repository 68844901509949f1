using Moe.Dsl;
using Moe.Runtime.Commands.Train;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Training;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Training;

/// <summary>The trainer's arithmetic against hand computation: clipping, AdamW's bias-corrected second step, accumulation.</summary>
[Collection("Console")]
public class TrainerMathTests
{
    /// <summary>An optimizer over <paramref name="parameters"/> on a one-rank world (every parameter decays unless 1-D).</summary>
    private static (GradientBuffer Buffer, DistributedOptimizer Optimizer) Optimizer(double weightDecay, params Parameter[] parameters)
    {
        var world = new InProcessWorld(1, TimeSpan.FromSeconds(10)).Communicator(0);
        var buffer = new GradientBuffer("dense", parameters.Select((p, i) => ($"p{i}", p, Trainer.Decays(p), true)).ToList(), world, 1 << 20, 1.0);
        return (buffer, new DistributedOptimizer([buffer], world, new AdamSettings(0.9, 0.95, 1e-8, weightDecay), sharded: true));
    }

    private static void SetGradient(Parameter p, params float[] g)
    {
        using var _ = torch.no_grad();
        p.grad!.copy_(torch.tensor(g).view(p.shape));
    }

    [Fact]
    public void GradientNorm_IsTheL2NormOfAllGradientsTogether()
    {
        // Two tensors: grads (3) and (4) → global norm 5.
        var a = new Parameter(torch.zeros(1, 1));
        var b = new Parameter(torch.zeros(1));
        var (buffer, opt) = Optimizer(0, a, b);
        SetGradient(a, 3f);
        SetGradient(b, 4f);
        Assert.Equal(5.0, opt.GradientNorm(), 6);
    }

    [Theory]
    // Megatron's clip_grad_norm_fp32: coefficient max / (norm + 1e-6), applied only below 1; 0 switches clipping off.
    [InlineData(5.0, 1.0, 1.0 / (5.0 + 1e-6))]
    [InlineData(5.0, 10.0, 1.0)]
    [InlineData(50.0, 0.0, 1.0)]
    public void ClipFactor_ScalesByLimitOverNormOnlyAboveTheLimit(double norm, double limit, double expected)
    {
        Assert.Equal(expected, Trainer.ClipFactor(norm, limit), 12);
    }

    [Fact]
    public void AdamW_SecondStep_MatchesTheBiasCorrectedFormula()
    {
        // p0 = 1, lr 0.1, wd 0.5, β1 0.9, β2 0.95, ε 1e-8; g1 = 0.3, g2 = −0.1.
        // Step 1: p ← 1·(1 − 0.05) = 0.95; m = 0.03, v = 0.0045; m̂ = 0.3, v̂ = 0.09 → p = 0.95 − 0.1·0.3/0.3 = 0.85.
        // Step 2: p ← 0.85·0.95 = 0.8075; m = 0.027 − 0.01 = 0.017, v = 0.004275 + 0.0005 = 0.004775;
        //         m̂ = 0.017/0.19 = 0.0894737, v̂ = 0.004775/0.0975 = 0.0489744, √v̂ = 0.2213017
        //         → p = 0.8075 − 0.1·0.0894737/0.2213017 = 0.8075 − 0.0404307 = 0.7670693.
        var p = new Parameter(torch.ones(1, 1));
        var (buffer, opt) = Optimizer(0.5, p);
        SetGradient(p, 0.3f);
        opt.Step(0.1, 1.0);
        Assert.Equal(0.85f, p.item<float>(), 5);
        buffer.BindGradients();
        SetGradient(p, -0.1f);
        opt.Step(0.1, 1.0);
        Assert.Equal(0.7670693f, p.item<float>(), 5);
    }

    [Fact]
    public void AdamW_FirstStep_DecaysMatricesButNotOneDimensionalWeights()
    {
        // First step: m̂ = g, v̂ = g², so the update is lr·g/(|g| + ε) after p ← p·(1 − lr·wd) for matrices only.
        var matrix = new Parameter(torch.tensor(new float[] { 1f, -2f }).view(1, 2));
        var norm = new Parameter(torch.tensor(new float[] { 1f, -2f }));
        var (_, opt) = Optimizer(0.5, matrix, norm);
        SetGradient(matrix, 0.3f, -0.4f);
        SetGradient(norm, 0.3f, -0.4f);
        opt.Step(0.1, 1.0);
        Assert.Equal(new[] { 1f * (1 - 0.05f) - 0.1f, -2f * (1 - 0.05f) + 0.1f }, matrix.detach().flatten().data<float>().ToArray(), new FloatTolerance(1e-5f));
        Assert.Equal(new[] { 1f - 0.1f, -2f + 0.1f }, norm.detach().data<float>().ToArray(), new FloatTolerance(1e-5f));
    }

    [Fact]
    public void ClipFactor_MultipliesTheGradientsOfTheStep()
    {
        // lr 0.1, wd 0, β1 0.9, β2 0.95. Step 1, g = 4: m = 0.4, v = 0.8, m̂ = 4, v̂ = 16 → p = −0.1.
        // Step 2, g = 4 clipped by 0.25 → 1: m = 0.36 + 0.1 = 0.46, v = 0.76 + 0.05 = 0.81; m̂ = 0.46/0.19 = 2.4210526,
        // v̂ = 0.81/0.0975 = 8.3076923, √v̂ = 2.8823067 → p = −0.1 − 0.1·2.4210526/2.8823067 = −0.1839973
        // (unclipped, g = 4 again: m̂ = 4, v̂ = 16 → p = −0.2).
        var p = new Parameter(torch.zeros(1, 1));
        var (buffer, opt) = Optimizer(0, p);
        SetGradient(p, 4f);
        opt.Step(0.1, 1.0);
        Assert.Equal(-0.1f, p.item<float>(), 5);
        buffer.BindGradients();
        SetGradient(p, 4f);
        opt.Step(0.1, 0.25);
        Assert.Equal(-0.1839973f, p.item<float>(), 5);
    }

    [Fact]
    public void AdamW_InChunks_IsBitEqualToOneChunk_AndHoldsNoMasks()
    {
        // The element-wise loops run in pieces to bound their temporaries (2^28 elements on a GPU); pieces of 3 elements
        // over tensors of 5 and 7 elements, a 1-D weight between two matrices (decay runs broken), clipping on, two steps.
        (float[] Params, float[] Main, double Norm) Run(long chunk)
        {
            torch.manual_seed(3);
            var ps = new[] { new Parameter(torch.randn(5, 1)), new Parameter(torch.randn(4)), new Parameter(torch.randn(7, 1)) };
            var world = new InProcessWorld(1, TimeSpan.FromSeconds(10)).Communicator(0);
            var buffer = new GradientBuffer("dense", ps.Select((p, i) => ($"p{i}", p, Trainer.Decays(p), true)).ToList(), world, 1 << 20, 1.0);
            using var opt = new DistributedOptimizer([buffer], world, new AdamSettings(0.9, 0.95, 1e-8, 0.3), sharded: true, chunkElements: chunk);
            double norm = 0;
            for (int step = 0; step < 2; step++)
            {
                buffer.BindGradients();
                foreach (var p in ps) SetGradient(p, torch.randn(p.shape).flatten().data<float>().ToArray());
                norm = opt.GradientNorm();
                opt.Step(0.01, Trainer.ClipFactor(norm, 1.0));
            }
            var main = opt.StateSlices().SelectMany(s => s.Main.data<float>().ToArray()).ToArray();
            return (ps.SelectMany(p => p.detach().flatten().data<float>().ToArray()).ToArray(), main, norm);
        }
        var whole = Run(1 << 28);
        var pieces = Run(3);
        Assert.Equal(whole.Params, pieces.Params);
        Assert.Equal(whole.Main, pieces.Main);
        Assert.Equal(whole.Norm, pieces.Norm, 12);
        Assert.True(whole.Norm > 1.0);   // clipping took part
    }

    private sealed class FloatTolerance(float tolerance) : IEqualityComparer<float>
    {
        public bool Equals(float x, float y) => Math.Abs(x - y) <= tolerance;
        public int GetHashCode(float obj) => 0;
    }

    [Fact]
    public void GradientAccumulation_TwoMicroBatchesOfTwo_EqualOneBatchOfFour()
    {
        // With every token in the loss and no batch-level aux loss, the mean of two equal-sized micro-batch
        // means is the batch mean, so step 1 (before any update) has the same lm_loss and gradient norm.
        RecipeSettings Settings(int micro) => TrainCommand.ResolvePaths(new Moe.Recipes.TinyMixtral().ToSettings() with
        {
            Model = Model.TinyMixtral with { Layers = 1 },
            Data = new Moe.Recipes.TinyMixtral().Data with { SequenceLength = 32, EodMaskLoss = false },
            Router = new Router { LoadBalancing = LoadBalancing.None },
            Training = new Moe.Recipes.TinyMixtral().Training with { Steps = 1, WarmupSteps = 0, GlobalBatchSize = 4, MicroBatchSize = micro },
        });
        StepMetrics First(RecipeSettings s)
        {
            using var source = new IndexedSampleSource(s, s.Model.EosTokenId);
            using var writer = new MetricsWriter(null);
            using var trainer = new Trainer(s, CPU, TextWriter.Null);
            return trainer.Run(source, writer).Steps[0];
        }
        var accumulated = Settings(2);
        Assert.Equal(2, accumulated.GradientAccumulationSteps);
        var a = First(accumulated);
        var b = First(Settings(4));
        Assert.Equal(b.LmLoss, a.LmLoss, 4);
        Assert.Equal(b.GradNorm, a.GradNorm, 3);
        Assert.Equal(b.TokensPerExpert.Single().Sum(), a.TokensPerExpert.Single().Sum());
    }

    [Fact]
    public void WeightDecay_SkipsExactlyTheNormWeights()
    {
        // Mixtral has no biases; its 1-D parameters are the two RMSNorms of each layer and the final norm.
        var settings = new Moe.Recipes.TinyMixtral().ToSettings() with { Model = Model.TinyMixtral with { Layers = 2 } };
        using var model = new MixtralModel(MixtralConfig.From(settings.Model), MoeOptions.From(settings), ScalarType.Float32, CPU);
        var exempt = model.named_parameters().Where(np => !Trainer.Decays(np.parameter)).Select(np => np.name).ToArray();
        Assert.Equal(2 * 2 + 1, exempt.Length);
        Assert.All(exempt, name => Assert.EndsWith("norm", name));
        Assert.Contains(model.named_parameters(), np => np.name.Contains("embed") && Trainer.Decays(np.parameter));
    }
}

/// <summary>The gradient buffer in bf16: micro-batches accumulate in fp32 main gradients, as Megatron's main_grad does.</summary>
public class GradientBufferTests
{
    [Fact]
    public void Bf16Parameters_AccumulateMicroBatchesInFp32()
    {
        // Three micro-batches each add 1 to a gradient that starts at 256: fp32 gives 259 exactly; bf16 (8 bits of
        // mantissa) cannot hold 257 and would round every step back to 256.
        var p = new Parameter(torch.zeros(1, 1, dtype: ScalarType.BFloat16));
        var world = new InProcessWorld(1, TimeSpan.FromSeconds(10)).Communicator(0);
        using var buffer = new GradientBuffer("dense", [("p", p, true, true)], world, 1 << 20, 1.0);
        float[] micro = [256f, 1f, 1f, 1f];
        buffer.BindGradients();
        foreach (float g in micro)
        {
            using (torch.no_grad()) p.grad!.add_(torch.full(1, 1, g, dtype: ScalarType.BFloat16));   // as a backward accumulates
            buffer.AccumulateMicroBatch();
        }
        buffer.Reduce(sharded: true);
        Assert.Equal(259f, buffer.MainGrad[0].item<float>());
        Assert.Equal(0f, p.grad!.to(ScalarType.Float32).item<float>());   // the bf16 view is cleared for the next micro-batch

        // A new step starts from zero again.
        buffer.BindGradients();
        using (torch.no_grad()) p.grad!.add_(torch.full(1, 1, 2f, dtype: ScalarType.BFloat16));
        buffer.AccumulateMicroBatch();
        Assert.Equal(2f, buffer.MainGrad[0].item<float>());
    }
}

/// <summary>Expert weight gradients straight into fp32 main gradients (bf16 training), as Megatron's gradient-accumulation fusion.</summary>
public class GradientSinkTests
{
    [Fact]
    public void DirectExpertBuffer_HoldsTheFp32SumOfEachMicroBatchsGradient()
    {
        torch.manual_seed(3);
        using var experts = new Moe.Runtime.MixtureOfExperts.Experts(2, 16, 32, ScalarType.BFloat16, CPU);
        using (torch.no_grad())
        {
            experts.GateUp.copy_(torch.randn(experts.GateUp.shape) * 0.2);
            experts.Down.copy_(torch.randn(experts.Down.shape) * 0.2);
        }
        var counts = torch.tensor(new long[] { 3, 5 });
        Tensor[] rows = [torch.randn(8, 16).to(ScalarType.BFloat16), torch.randn(8, 16).to(ScalarType.BFloat16)];
        void Backward(Tensor r) => experts.Forward(r, counts).to(ScalarType.Float32).square().sum().backward();

        // Reference: each micro-batch's gradients alone (autograd path into .grad), summed in fp32.
        var expectedGateUp = torch.zeros(experts.GateUp.shape);
        var expectedDown = torch.zeros(experts.Down.shape);
        foreach (var r in rows)
        {
            experts.GateUp.grad = null;
            experts.Down.grad = null;
            Backward(r);
            expectedGateUp += experts.GateUp.grad!.to(ScalarType.Float32);
            expectedDown += experts.Down.grad!.to(ScalarType.Float32);
        }

        var world = new InProcessWorld(1, TimeSpan.FromSeconds(10)).Communicator(0);
        using var buffer = new GradientBuffer("expert", [("gate_up", experts.GateUp, true, true), ("down", experts.Down, true, true)], world, 1 << 20, 1.0, direct: true);
        Assert.True(buffer.Direct);
        Assert.Null(buffer.ModelGrad);   // no bf16 copy of the expert gradients is kept
        experts.Sinks = new Moe.Runtime.MixtureOfExperts.ExpertGradientSinks(buffer.SinkOf(experts.GateUp), buffer.SinkOf(experts.Down));
        for (int step = 0; step < 2; step++)   // the second step must not see the first's sums
        {
            buffer.BindGradients();
            foreach (var r in rows)
            {
                Backward(r);
                buffer.AccumulateMicroBatch();
            }
            buffer.Reduce(sharded: true);
            Assert.Null(experts.GateUp.grad);
            Assert.True(torch.equal(buffer.SinkOf(experts.GateUp).MainGradient, expectedGateUp).all().item<bool>(), "gate_up main gradient");
            Assert.True(torch.equal(buffer.SinkOf(experts.Down).MainGradient, expectedDown).all().item<bool>(), "down main gradient");
        }
    }
}
