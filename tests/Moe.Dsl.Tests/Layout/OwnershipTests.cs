using Moe.Dsl.Layout;
using Xunit;

namespace Moe.Dsl.Tests.Layout;

/// <summary>Stage → layers and EP rank → experts, checked by hand against Megatron's rules (spec §2.4).</summary>
public class OwnershipTests
{
    [Fact]
    public void EvenSplit_56LayersOver2Stages()
    {
        Assert.Equal(new LayerRange(0, 28), Assert.Single(PipelineSplit.LayersOfStage(0, 56, 2)));
        Assert.Equal(new LayerRange(28, 28), Assert.Single(PipelineSplit.LayersOfStage(1, 56, 2)));
    }

    [Fact]
    public void UnevenSplit_FirstAndLastGiven_MiddleShareTheRest()
    {
        // 56 layers, 3 stages, first 20, last 20: the middle stage holds 16.
        Assert.Equal(new[] { 20, 16, 20 }, PipelineSplit.LayerCounts(56, 3, 20, 20));
        Assert.Equal(new LayerRange(20, 16), Assert.Single(PipelineSplit.LayersOfStage(1, 56, 3, firstStage: 20, lastStage: 20)));
        Assert.Equal(new LayerRange(36, 20), Assert.Single(PipelineSplit.LayersOfStage(2, 56, 3, firstStage: 20, lastStage: 20)));
        Assert.Null(PipelineSplit.LayerCounts(32, 4, 10, null)); // 22 layers for 3 middle stages
    }

    [Fact]
    public void VirtualPipeline_ChunksInterleaveAcrossStages()
    {
        // L = 32, PP = 4, v = 2: chunk c on stage p starts at c·16 + p·4 and holds 4 layers.
        Assert.Equal(new[] { new LayerRange(0, 4), new LayerRange(16, 4) }, PipelineSplit.LayersOfStage(0, 32, 4, 2));
        Assert.Equal(new[] { new LayerRange(12, 4), new LayerRange(28, 4) }, PipelineSplit.LayersOfStage(3, 32, 4, 2));
    }

    [Fact]
    public void VirtualPipeline_WithUnevenFirstAndLast_ChunksFollowMegatronsOffsets()
    {
        // L = 16, PP = 4, v = 2, first 2, last 2: stage counts 2, 6, 6, 2; each chunk spans L/v = 8 layers,
        // stage p's chunk holds count/v layers after the earlier stages' count/v (1 + 3 + 3 + 1 = 8).
        Assert.Equal(new[] { new LayerRange(0, 1), new LayerRange(8, 1) }, PipelineSplit.LayersOfStage(0, 16, 4, 2, firstStage: 2, lastStage: 2));
        Assert.Equal(new[] { new LayerRange(1, 3), new LayerRange(9, 3) }, PipelineSplit.LayersOfStage(1, 16, 4, 2, firstStage: 2, lastStage: 2));
        Assert.Equal(new[] { new LayerRange(4, 3), new LayerRange(12, 3) }, PipelineSplit.LayersOfStage(2, 16, 4, 2, firstStage: 2, lastStage: 2));
        Assert.Equal(new[] { new LayerRange(7, 1), new LayerRange(15, 1) }, PipelineSplit.LayersOfStage(3, 16, 4, 2, firstStage: 2, lastStage: 2));
        // A first-stage count of 3 cannot be cut into 2 chunks (R041).
        Assert.Throws<ArgumentException>(() => PipelineSplit.LayersOfStage(0, 16, 4, 2, firstStage: 3, lastStage: 1));
    }

    [Fact]
    public void Experts_AreContiguousBlocksPerEpRank()
    {
        Assert.Equal(new LayerRange(0, 2), ExpertSplit.ExpertsOfRank(0, 8, 4));
        Assert.Equal(new LayerRange(6, 2), ExpertSplit.ExpertsOfRank(3, 8, 4));
        Assert.Equal(new LayerRange(5, 1), ExpertSplit.ExpertsOfRank(5, 8, 8));
        Assert.Throws<ArgumentException>(() => ExpertSplit.ExpertsOfRank(0, 8, 16));
    }

    [Fact]
    public void Coordinates_FollowTheOrderString()
    {
        // Default order: tp fastest, then cp, dp, pp (spec §2.1 formula).
        var l = new RankLayout(16, 2, 2, 2, 4, 1, RankOrder.TpCpEpDpPp);
        Assert.Equal(1 + 2 * (1 + 2 * (0 + 2 * 1)), l.DenseRank(tp: 1, cp: 1, dp: 0, pp: 1));
        var c = l.Coordinates(11);
        Assert.Equal((1, 1, 0, 1), (c.Tp, c.Cp, c.Dp, c.Pp));
        Assert.Equal(11, l.ExpertRank(etp: 0, ep: c.Ep, edp: c.Edp, pp: c.Pp));
    }
}
