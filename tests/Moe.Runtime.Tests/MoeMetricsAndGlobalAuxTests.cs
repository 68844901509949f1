using Moe.Dsl;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>Megatron's global aux loss and the per-expert counts / drop rate, on hand-computed cases.</summary>
public class MoeMetricsAndGlobalAuxTests
{
    private static Routing Fixed(long[] experts, float[] weights, int e) =>
        new(torch.zeros(experts.Length, e), torch.zeros(experts.Length, e), torch.tensor(weights).view(-1, 1), torch.tensor(experts).view(-1, 1));

    [Fact]
    public void GlobalAuxLoss_UsesCountsAveragedOverTheMicroBatchesOfTheGlobalBatch()
    {
        // E = 2, K = 1, T = 2 per micro-batch.
        // Micro-batch 1: both tokens score (1, 0) and go to expert 0: counts (2, 0), average (2, 0),
        //   aux = 2/(1·2²)·(2·2 + 0·0) = 2.
        // Micro-batch 2: both tokens score (0, 1) and go to expert 1: counts (0, 2), average (1, 1),
        //   aux = 2/4·(0·1 + 2·1) = 1 (the per-micro-batch switch loss would say 2).
        using var tracker = new GlobalAuxLossTracker(2, CPU);
        var s1 = torch.tensor(new float[] { 1, 0, 1, 0 }).view(2, 2);
        var s2 = torch.tensor(new float[] { 0, 1, 0, 1 }).view(2, 2);
        Assert.Equal(2.0f, AuxLosses.Global(s1, tracker.Accumulate(torch.tensor(new long[] { 2, 0 })), 1).item<float>(), 5);
        Assert.Equal(1.0f, AuxLosses.Global(s2, tracker.Accumulate(torch.tensor(new long[] { 0, 2 })), 1).item<float>(), 5);
        Assert.Equal(2.0f, AuxLosses.Switch(s2, torch.tensor(new long[] { 0, 2 }), 1).item<float>(), 5);
        Assert.Equal(2, tracker.Steps);
        // A new global batch starts from nothing: micro-batch 2 alone gives 2 again.
        tracker.Reset();
        Assert.Equal(2.0f, AuxLosses.Global(s2, tracker.Accumulate(torch.tensor(new long[] { 0, 2 })), 1).item<float>(), 5);
    }

    [Fact]
    public void GlobalAuxLoss_AccumulatesOnlyInTrainingWithGradients()
    {
        var config = new MixtralConfig
        {
            VocabSize = 16, HiddenSize = 8, IntermediateSize = 12, Layers = 2, Heads = 2, KeyValueHeads = 1,
            HeadDim = 4, Experts = 4, TopK = 2,
        };
        using var model = new MixtralModel(config, new MoeOptions { TopK = 2, LoadBalancing = LoadBalancing.GlobalAuxLoss, AuxLossConvention = AuxLossConvention.Megatron }, ScalarType.Float32, CPU);
        model.InitializeWeights(seed: 3);
        var ids = torch.tensor(new long[] { 1, 2, 3, 4, 5, 6 }).view(1, 6);
        model.train();
        var first = model.Forward(ids);
        var second = model.Forward(ids);
        Assert.All(model.Layers, l => Assert.Equal(2, l.Moe.GlobalAuxLoss.Steps));
        // The same batch twice: the averaged counts equal this batch's, so the loss repeats the switch loss.
        double switchSum = first.Layers.Sum(m => AuxLosses.Switch(m.Routing.ScoresTE, m.RoutedPerExpert, 2).item<float>());
        Assert.Equal(switchSum, first.AuxLoss.item<float>(), 5);
        Assert.Equal(switchSum, second.AuxLoss.item<float>(), 5);
        using (torch.no_grad()) model.Forward(ids);
        model.eval();
        model.Forward(ids);
        Assert.All(model.Layers, l => Assert.Equal(2, l.Moe.GlobalAuxLoss.Steps));
        model.ResetGlobalAuxLoss();
        Assert.All(model.Layers, l => Assert.Equal(0, l.Moe.GlobalAuxLoss.Steps));
    }

    [Fact]
    public void CapacityDrops_AreCountedPerExpertAndAsADropRate()
    {
        // Expert 0 receives 3 of the 4 tokens, capacity ceil(4·1/2·1.0) = 2: one pair of four is dropped.
        var hidden = torch.arange(4 * 3, dtype: ScalarType.Float32).view(4, 3);
        var routing = Fixed([0, 0, 0, 1], [0.5f, 0.9f, 0.7f, 0.6f], 2);
        var d = LocalTokenDispatcher.Permute(hidden, routing, 2, new MoeOptions { TopK = 1, CapacityFactor = 1.0, PadToCapacity = true });
        Assert.Equal(new long[] { 3, 1 }, d.RoutedPerExpertE.data<long>().ToArray());
        Assert.Equal(new long[] { 2, 1 }, d.KeptPerExpertE.data<long>().ToArray());
        Assert.Equal(new long[] { 2, 2 }, d.RowsPerExpertE.data<long>().ToArray());     // padding rows are compute, not tokens
        Assert.Equal(new long[] { 1, 0 }, d.DroppedPerExpertE.data<long>().ToArray());
        Assert.Equal(0.25f, d.DropRate.item<float>(), 6);
    }

    [Fact]
    public void Dropless_HasNoDropsAndCountsEveryPair()
    {
        var hidden = torch.randn(4, 3);
        var routing = Fixed([0, 0, 0, 1], [0.5f, 0.9f, 0.7f, 0.6f], 2);
        var d = LocalTokenDispatcher.Permute(hidden, routing, 2, new MoeOptions { TopK = 1 });
        Assert.Equal(new long[] { 3, 1 }, d.KeptPerExpertE.data<long>().ToArray());
        Assert.Equal(0f, d.DropRate.item<float>());
    }

    [Fact]
    public void TopTwoDrop_KeepsTheTokensOtherSlotWithItsWeight()
    {
        // Three tokens, K = 2, E = 2: every token picks both experts; capacity ceil(3·2/2·0.5) = 2 per expert.
        // Expert 0 weights (0.6, 0.3, 0.8) → probs keeps tokens 2 and 0; expert 1 weights (0.4, 0.7, 0.2) → keeps 1 and 0.
        var hidden = torch.tensor(new float[] { 1, 10, 100 }).view(3, 1);
        var routing = new Routing(torch.zeros(3, 2), torch.zeros(3, 2),
            torch.tensor(new float[] { 0.6f, 0.4f, 0.3f, 0.7f, 0.8f, 0.2f }).view(3, 2), torch.tensor(new long[] { 0, 1, 0, 1, 0, 1 }).view(3, 2));
        var d = LocalTokenDispatcher.Permute(hidden, routing, 2, new MoeOptions { TopK = 2, CapacityFactor = 0.5 });
        Assert.Equal(new long[] { 0, 2, 0, 1 }, d.TokenOfRowR.data<long>().ToArray());
        // Identity experts: token 0 keeps 0.6 + 0.4 = 1, token 1 only its expert-1 share 0.7, token 2 only 0.8.
        var y = LocalTokenDispatcher.Unpermute(d.RowsRH, d, 3);
        Assert.Equal(new float[] { 1f, 7f, 80f }, y.flatten().data<float>().ToArray().Select(v => (float)Math.Round(v, 4)).ToArray());
        Assert.Equal(2f / 6f, d.DropRate.item<float>(), 6);
    }

    [Fact]
    public void SigmoidRouting_AuxScoresAreTheSigmoidsNormalisedPerToken()
    {
        // σ(0, 1, 2) = (0.5, 0.7311, 0.8808), sum 2.1119 → (0.2368, 0.3462, 0.4171) (Megatron compute_routing_scores_for_aux_loss).
        var r = TopKRouter.Route(torch.ones(1, 1), torch.tensor(new float[] { 0, 1, 2 }).view(3, 1), new MoeOptions { TopK = 2, ScoreFunction = ScoreFunction.Sigmoid });
        var scores = r.ScoresTE.flatten().data<float>().ToArray();
        Assert.Equal(0.2368f, scores[0], 4);
        Assert.Equal(0.3462f, scores[1], 4);
        Assert.Equal(0.4171f, scores[2], 4);
    }

    [Fact]
    public void TopOneWithoutPreSoftmax_GivesWeightOne_WithPreSoftmaxTheProbability()
    {
        // softmax(0, 1, 2)[2] = 0.6652. Post-softmax over one logit is 1 (no router gradient: Megatron rule R062).
        var gate = torch.tensor(new float[] { 0, 1, 2 }).view(3, 1);
        Assert.Equal(1f, TopKRouter.Route(torch.ones(1, 1), gate, new MoeOptions { TopK = 1 }).WeightsTK.item<float>(), 6);
        Assert.Equal(0.6652f, TopKRouter.Route(torch.ones(1, 1), gate, new MoeOptions { TopK = 1, PreSoftmax = true }).WeightsTK.item<float>(), 4);
    }
}
