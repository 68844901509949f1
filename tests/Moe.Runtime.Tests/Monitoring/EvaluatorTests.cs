using Moe.Dsl;
using Moe.Runtime.Commands.Train;
using Moe.Runtime.Modeling;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Monitoring;

public class EvaluatorTests
{
    [Fact]
    public void ValidationLoss_IsTheTokenWeightedMeanWithoutGradientsAndLeavesTrainingMode()
    {
        var s = TrainCommand.ResolvePaths(new Moe.Recipes.TinyMixtral().ToSettings() with
        {
            Model = Model.TinyMixtral with { Layers = 1 },
            Data = new Moe.Recipes.TinyMixtral().Data with { SequenceLength = 32 },
            Training = new Moe.Recipes.TinyMixtral().Training with { GlobalBatchSize = 4, MicroBatchSize = 2, EvalIters = 1 },
        });
        using var validation = new IndexedSampleSource(s, s.Model.EosTokenId, split: 1, samples: Evaluator.SampleCount(s));
        using var model = new MixtralModel(MixtralConfig.From(s.Model), MoeOptions.From(s), ScalarType.Float32, CPU);
        model.InitializeWeights(1);
        model.train();
        var rank = RankContext.Single(s, CPU);
        double loss = new Evaluator(model, validation, s, rank).Loss();
        rank.Groups.Dispose();

        Assert.True(model.training);
        Assert.All(model.parameters(), p => Assert.Null(p.grad));
        // Independently: one sample at a time, Σ loss_i·n_i / Σ n_i over the counted tokens n_i (EOD-masked, so n_i differ).
        double weighted = 0, tokens = 0;
        model.eval();
        using (torch.no_grad())
            for (int i = 0; i < 4; i++)
            {
                var x = validation.Sample(i);
                Tensor T(long[] a) => torch.tensor(a).view(1, 32);
                var mask = torch.tensor(x.LossMask).view(1, 32);
                var o = model.Forward(T(x.Tokens), T(x.Labels), mask, T(x.PositionIds), T(x.DocumentIds), returnLogits: false);
                double n = x.LossMask.Sum();
                weighted += o.LmLoss!.item<float>() * n;
                tokens += n;
            }
        Assert.Equal(weighted / tokens, loss, 4);
    }
}
