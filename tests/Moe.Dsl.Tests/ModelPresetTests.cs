using Moe.Dsl;
using Xunit;

namespace Moe.Dsl.Tests;

/// <summary>Presets against the hub configs (shared/spec/mixtral-facts.md §1) and the published parameter counts.</summary>
public class ModelPresetTests
{
    [Fact]
    public void Mixtral8x7B_ParameterCounts_MatchThePublishedFigures()
    {
        Assert.Equal(46_702_792_704L, Model.Mixtral8x7B.ParameterCount);
        Assert.Equal(12_879_925_248L, Model.Mixtral8x7B.ActiveParameterCount);
    }

    [Fact]
    public void Mixtral8x22B_ParameterCounts_MatchThePublishedFigures()
    {
        Assert.Equal(140_630_071_296L, Model.Mixtral8x22B.ParameterCount);
        Assert.Equal(39_161_468_928L, Model.Mixtral8x22B.ActiveParameterCount);
    }

    [Fact]
    public void Mixtral8x22B_HasTheMistralaiVocabularyAndEightExperts()
    {
        var m = Model.Mixtral8x22B;
        Assert.Equal((6144, 16384, 56, 48, 8, 8, 2, 32768, 65536), (m.HiddenSize, m.IntermediateSize, m.Layers, m.AttentionHeads, m.KeyValueHeads, m.Experts, m.ExpertsPerToken, m.VocabSize, m.MaxPositionEmbeddings));
        Assert.Equal(0.001, m.RouterAuxLossCoef);
        Assert.Equal(128, m.EffectiveHeadDim);
    }

    [Fact]
    public void Mixtral8x7B_MatchesTheHubConfig()
    {
        var m = Model.Mixtral8x7B;
        Assert.Equal((4096, 14336, 32, 32, 8, 8, 2, 32000, 32768), (m.HiddenSize, m.IntermediateSize, m.Layers, m.AttentionHeads, m.KeyValueHeads, m.Experts, m.ExpertsPerToken, m.VocabSize, m.MaxPositionEmbeddings));
        Assert.Equal(0.02, m.RouterAuxLossCoef);
        Assert.Equal(1e6, m.RopeTheta);
        Assert.Equal(1e-5, m.RmsNormEps);
        Assert.Null(m.SlidingWindow);
        Assert.False(m.TieWordEmbeddings);
    }

    [Fact]
    public void InstructVariants_ShareTheArchitecture()
    {
        Assert.Equal(Model.Mixtral8x7B with { Name = "", HubId = "" }, Model.Mixtral8x7BInstruct with { Name = "", HubId = "" });
        Assert.Equal(Model.Mixtral8x22B with { Name = "", HubId = "" }, Model.Mixtral8x22BInstruct with { Name = "", HubId = "" });
        Assert.Equal("mistralai/Mixtral-8x22B-Instruct-v0.1", Model.Mixtral8x22BInstruct.HubId);
    }

    [Fact]
    public void DerivedSizes_AreComputedFromGpus()
    {
        var p = new Parallelism { Gpus = 32, Tensor = 2, Pipeline = 2, Expert = 8, SequenceParallel = true };
        Assert.Equal(8, p.DataParallel);
        Assert.Equal(1, p.ExpertDataParallel);
        Assert.Equal(2, (p with { ExpertTensor = 1 }).ExpertDataParallel);
    }
}
