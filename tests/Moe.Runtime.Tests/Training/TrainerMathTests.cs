using Moe.Dsl;
using Moe.Runtime.Commands.Train;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
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
    private static Parameter Param(params float[] grad)
    {
        var p = new Parameter(torch.zeros(grad.Length));
        p.grad = torch.tensor(grad);
        return p;
    }

    [Fact]
    public void Clipping_AboveTheLimit_ScalesEveryGradientByLimitOverGlobalNorm()
    {
        // Two tensors: grads (3) and (4) → global norm 5; limit 1 scales both by 1/5 → 0.6 and 0.8.
        var a = Param(3f);
        var b = Param(4f);
        double norm = Trainer.ClipGradients([a, b], 1.0);
        Assert.Equal(5.0, norm, 5);
        Assert.Equal(0.6f, a.grad!.item<float>(), 4);
        Assert.Equal(0.8f, b.grad!.item<float>(), 4);
    }

    [Fact]
    public void Clipping_BelowTheLimitOrOff_LeavesGradientsAndReportsTheNorm()
    {
        var a = Param(3f, 4f);
        Assert.Equal(5.0, Trainer.ClipGradients([a], 10.0), 5);
        Assert.Equal(new[] { 3f, 4f }, a.grad!.data<float>().ToArray());
        var b = Param(30f, 40f);
        Assert.Equal(50.0, Trainer.ClipGradients([b], 0), 4);   // ClipGrad = 0: off
        Assert.Equal(new[] { 30f, 40f }, b.grad!.data<float>().ToArray());
    }

    [Fact]
    public void AdamW_SecondStep_MatchesTheBiasCorrectedFormula()
    {
        // p0 = 1, lr 0.1, wd 0.5, β1 0.9, β2 0.95, ε 1e-8; g1 = 0.3, g2 = −0.1.
        // Step 1: p ← 1·(1 − 0.05) = 0.95; m = 0.03, v = 0.0045; m̂ = 0.3, v̂ = 0.09 → p = 0.95 − 0.1·0.3/0.3 = 0.85.
        // Step 2: p ← 0.85·0.95 = 0.8075; m = 0.027 − 0.01 = 0.017, v = 0.004275 + 0.0005 = 0.004775;
        //         m̂ = 0.017/0.19 = 0.0894737, v̂ = 0.004775/0.0975 = 0.0489744, √v̂ = 0.2213017
        //         → p = 0.8075 − 0.1·0.0894737/0.2213017 = 0.8075 − 0.0404307 = 0.7670693.
        var p = new Parameter(torch.tensor(new float[] { 1f }));
        var opt = torch.optim.AdamW([new AdamW.ParamGroup([p], new AdamW.Options { LearningRate = 0.1, weight_decay = 0.5, beta1 = 0.9, beta2 = 0.95, eps = 1e-8 })],
            0.1, 0.9, 0.95, 1e-8, 0.5);
        p.grad = torch.tensor(new float[] { 0.3f });
        opt.step();
        Assert.Equal(0.85f, p.item<float>(), 5);
        p.grad = torch.tensor(new float[] { -0.1f });
        opt.step();
        Assert.Equal(0.7670693f, p.item<float>(), 5);
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
