using Moe.Dsl;
using Moe.Runtime.MixtureOfExperts;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>Megatron-Core's MoE semantics on small cases computed by hand.</summary>
public class MoeSemanticsTests
{
    private static Tensor T(params float[] v) => torch.tensor(v);

    private static float[] F(Tensor t) => t.to(ScalarType.Float32).data<float>().ToArray();

    [Theory]
    [InlineData(4096, 2, 8, 1.0, 1024)]   // ceil(4096·2/8·1.0)
    [InlineData(4096, 2, 8, 1.25, 1280)]
    [InlineData(10, 2, 8, 1.0, 3)]        // ceil(2.5)
    [InlineData(7, 1, 4, 1.5, 3)]         // ceil(2.625)
    public void Capacity_IsCeilOfTokensTimesTopKOverExpertsTimesFactor(long tokens, int k, int e, double factor, long expected)
    {
        Assert.Equal(expected, LocalTokenDispatcher.Capacity(tokens, k, e, factor));
    }

    [Fact]
    public void CountPerExpert_CountsEachIdIncludingAbsentOnes()
    {
        // Hand count: expert 0 twice, 1 never, 2 three times, 3 once.
        var counts = LocalTokenDispatcher.CountPerExpert(torch.tensor(new long[] { 2, 0, 2, 3, 0, 2 }), 4);
        Assert.Equal(new long[] { 2, 0, 3, 1 }, counts.data<long>().ToArray());
    }

    [Fact]
    public void Permute_SortsPairsByExpertKeepingTokenOrder()
    {
        // Tokens 0..2 with top-2 experts (1, 0), (0, 2), (1, 2): rows by expert are
        // e0: tokens 0, 1; e1: tokens 0, 2; e2: tokens 1, 2.
        var hidden = torch.arange(3 * 2, dtype: ScalarType.Float32).view(3, 2);
        var routing = new Routing(torch.zeros(3, 3), torch.zeros(3, 3), torch.full(3, 2, 0.5f),
            torch.tensor(new long[] { 1, 0, 0, 2, 1, 2 }).view(3, 2));
        var d = LocalTokenDispatcher.Permute(hidden, routing, 3, new MoeOptions { TopK = 2 });
        Assert.Equal(new long[] { 0, 1, 0, 2, 1, 2 }, d.TokenOfRowR.data<long>().ToArray());
        Assert.Equal(new long[] { 2, 2, 2 }, d.RowsPerExpertE.data<long>().ToArray());
        Assert.Equal(new float[] { 0, 1, 2, 3, 0, 1, 4, 5, 2, 3, 4, 5 }, d.RowsRH.data<float>().ToArray());
    }

    [Fact]
    public void DropPolicyProbs_KeepsTheHighestWeightsOfAnOverfullExpert()
    {
        // Expert 0 gets tokens 0,1,2 with weights 0.5, 0.9, 0.7; capacity 2 keeps tokens 1 and 2.
        var keep = LocalTokenDispatcher.KeepMask(torch.tensor(new long[] { 0, 0, 0, 1 }), T(0.5f, 0.9f, 0.7f, 0.6f), 2, 2, DropPolicy.Probs);
        Assert.Equal(new[] { false, true, true, true }, keep.data<bool>().ToArray());
    }

    [Fact]
    public void DropPolicyPosition_KeepsTheEarliestTokensOfAnOverfullExpert()
    {
        var keep = LocalTokenDispatcher.KeepMask(torch.tensor(new long[] { 0, 0, 0, 1 }), T(0.5f, 0.9f, 0.7f, 0.6f), 2, 2, DropPolicy.Position);
        Assert.Equal(new[] { true, true, false, true }, keep.data<bool>().ToArray());
    }

    private static Routing Fixed(long[] experts, float[] weights, int e)
    {
        var ids = torch.tensor(experts).view(-1, 1);
        return new Routing(torch.zeros(experts.Length, e), torch.zeros(experts.Length, e), torch.tensor(weights).view(-1, 1), ids);
    }

    [Fact]
    public void Capacity_DropsRowsAndCountsStayRouted()
    {
        var hidden = torch.arange(4 * 3, dtype: ScalarType.Float32).view(4, 3);
        var routing = Fixed([0, 0, 0, 1], [0.5f, 0.9f, 0.7f, 0.6f], 2);
        // T·K/E·factor = 4·1/2·1.0 = 2 rows per expert.
        var d = LocalTokenDispatcher.Permute(hidden, routing, 2, new MoeOptions { TopK = 1, CapacityFactor = 1.0 });
        Assert.Equal(new long[] { 3, 1 }, d.RoutedPerExpertE.data<long>().ToArray());
        Assert.Equal(new long[] { 2, 1 }, d.RowsPerExpertE.data<long>().ToArray());
        Assert.Equal(new long[] { 1, 2, 3 }, d.TokenOfRowR.data<long>().ToArray());
    }

    [Fact]
    public void PadToCapacity_FillsEveryExpertWithZeroWeightRows_AndLeavesTheResult()
    {
        var hidden = torch.randn(4, 3);
        var routing = Fixed([0, 0, 0, 1], [0.5f, 0.9f, 0.7f, 0.6f], 2);
        var plain = LocalTokenDispatcher.Permute(hidden, routing, 2, new MoeOptions { TopK = 1, CapacityFactor = 1.0 });
        var padded = LocalTokenDispatcher.Permute(hidden, routing, 2, new MoeOptions { TopK = 1, CapacityFactor = 1.0, PadToCapacity = true });
        Assert.Equal(new long[] { 2, 2 }, padded.RowsPerExpertE.data<long>().ToArray());
        Assert.Equal(0f, padded.WeightOfRowR[^1].item<float>());
        // Identity "experts": the combine of the rows is the same with and without padding.
        var a = LocalTokenDispatcher.Unpermute(plain.RowsRH, plain, 4);
        var b = LocalTokenDispatcher.Unpermute(padded.RowsRH, padded, 4);
        Assert.True(torch.allclose(a, b));
    }

    [Fact]
    public void SoftmaxAfterTopK_RenormalisesTheChosenWeights()
    {
        // softmax([0, 1, 2]) = [0.0900, 0.2447, 0.6652]; top-2 renormalised = softmax([2, 1]) = [0.7311, 0.2689].
        var r = TopKRouter.Route(torch.ones(1, 1), torch.tensor(new float[] { 0, 1, 2 }).view(3, 1), new MoeOptions { TopK = 2 });
        Assert.Equal(new long[] { 2, 1 }, r.ExpertsTK.data<long>().ToArray());
        Assert.Equal(0.7311f, F(r.WeightsTK)[0], 4);
        Assert.Equal(0.2689f, F(r.WeightsTK)[1], 4);
    }

    [Fact]
    public void PreSoftmax_KeepsTheFullSoftmaxWeights()
    {
        var r = TopKRouter.Route(torch.ones(1, 1), torch.tensor(new float[] { 0, 1, 2 }).view(3, 1), new MoeOptions { TopK = 2, PreSoftmax = true });
        Assert.Equal(0.6652f, F(r.WeightsTK)[0], 4);
        Assert.Equal(0.2447f, F(r.WeightsTK)[1], 4);
    }

    [Fact]
    public void Sigmoid_RenormalisesTheTopKSigmoidScores()
    {
        // σ(2) = 0.8808, σ(1) = 0.7311 → 0.5464, 0.4536.
        var r = TopKRouter.Route(torch.ones(1, 1), torch.tensor(new float[] { 0, 1, 2 }).view(3, 1), new MoeOptions { TopK = 2, ScoreFunction = ScoreFunction.Sigmoid });
        Assert.Equal(0.5464f, F(r.WeightsTK)[0], 4);
        Assert.Equal(0.4536f, F(r.WeightsTK)[1], 4);
    }

    [Fact]
    public void SwitchAuxLoss_IsExpertsOverKTSquaredTimesProbSumsTimesCounts()
    {
        // Balanced: 2/(1·2²)·(1·1 + 1·1) = 1.
        Assert.Equal(1.0f, AuxLosses.Switch(torch.tensor(new float[] { 0.75f, 0.25f, 0.25f, 0.75f }).view(2, 2), torch.tensor(new long[] { 1, 1 }), 1).item<float>(), 5);
        // All to expert 0: 2/(1·2²)·(1.7·2 + 0.3·0) = 1.7.
        Assert.Equal(1.7f, AuxLosses.Switch(torch.tensor(new float[] { 0.9f, 0.1f, 0.8f, 0.2f }).view(2, 2), torch.tensor(new long[] { 2, 0 }), 1).item<float>(), 5);
    }

    [Fact]
    public void SequenceAuxLoss_AveragesThePerSequenceSwitchLoss()
    {
        // Sequence 0: scores (1,0),(1,0), experts 0,0 → 2/(1·2²)·(2·2) = 2. Sequence 1: (0,1),(1,0), experts 1,0 → 2/4·(1·1 + 1·1) = 1.
        var scores = torch.tensor(new float[] { 1, 0, 1, 0, 0, 1, 1, 0 }).view(4, 2);
        var experts = torch.tensor(new long[] { 0, 0, 1, 0 }).view(4, 1);
        Assert.Equal(1.5f, AuxLosses.Sequence(scores, experts, 2, 1).item<float>(), 5);
        // The switch loss over the whole batch differs: 2/(1·4²)·(3·3 + 1·1) = 1.25.
        Assert.Equal(1.25f, AuxLosses.Switch(scores, torch.tensor(new long[] { 3, 1 }), 1).item<float>(), 5);
    }

    [Fact]
    public void ZLoss_IsMeanSquaredLogSumExp()
    {
        // logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4.
        var z = AuxLosses.ZLoss(torch.tensor(new float[] { 0, 0, (float)Math.Log(3), 0 }).view(2, 2)).item<float>();
        Assert.Equal((Math.Pow(Math.Log(2), 2) + Math.Pow(Math.Log(4), 2)) / 2, z, 5);
    }

    [Fact]
    public void TransformersAuxLoss_UniformRouterGivesTopK()
    {
        // Every token scores all experts equally: f sums to k over experts, P̄ = 1/E → E·k/E = k.
        var logits = torch.zeros(8, 4);
        Assert.Equal(2.0f, AuxLosses.Transformers([logits, logits], 4, 2).item<float>(), 5);
    }

    [Fact]
    public void RecipeSettings_MapToMegatronOptions()
    {
        var s = new Moe.Recipes.Mixtral8x22b().ToSettings();
        var o = MoeOptions.From(s);
        Assert.Equal((2, 1.25, DropPolicy.Probs, AuxLossConvention.Megatron, true), (o.TopK, o.CapacityFactor!.Value, o.DropPolicy, o.AuxLossConvention, o.ZLoss));
    }
}
