using Moe.Runtime.Data;
using Xunit;

namespace Moe.Data.Tests;

/// <summary>Packed samples with Megatron's masks (gpt_dataset._get_ltor_masks_and_position_ids), checked by hand.</summary>
public class PackingTests
{
    // Window of S + 1 = 9 tokens crossing two end-of-document tokens (eod = 2): doc A = 10 11 2, doc B = 12 2, doc C = 13 14 15 16.
    private static readonly long[] Window = [10, 11, 2, 12, 2, 13, 14, 15, 16];

    [Fact]
    public void InputsAndLabels_AreShiftedByOne()
    {
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, false, false, false));
        Assert.Equal(new long[] { 10, 11, 2, 12, 2, 13, 14, 15 }, s.Tokens);
        Assert.Equal(new long[] { 11, 2, 12, 2, 13, 14, 15, 16 }, s.Labels);
        Assert.Equal(Enumerable.Range(0, 8).Select(i => (long)i), s.PositionIds);
        Assert.All(s.LossMask, m => Assert.Equal(1f, m));
        Assert.All(s.DocumentIds, d => Assert.Equal(0L, d));
    }

    [Fact]
    public void ResetPositionIds_RestartAfterEachEod()
    {
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, true, false, false));
        Assert.Equal(new long[] { 0, 1, 2, 0, 1, 0, 1, 2 }, s.PositionIds);
    }

    [Fact]
    public void ResetAttentionMask_GivesEachDocumentItsOwnId()
    {
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, false, true, false));
        Assert.Equal(new long[] { 0, 0, 0, 1, 1, 2, 2, 2 }, s.DocumentIds);
    }

    [Fact]
    public void EodMaskLoss_ZeroesPositionsWhoseInputIsEod()
    {
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, false, false, true));
        Assert.Equal(new float[] { 1, 1, 0, 1, 0, 1, 1, 1 }, s.LossMask);
    }

    [Fact]
    public void DocumentCausalMask_MatchesMegatronsResetAttentionMask()
    {
        // Megatron: lower-triangular, then for each eod at i: mask[i+1:, :i+1] = 0.
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, false, true, false));
        var mask = Moe.Runtime.Modeling.MixtralModel.DocumentCausalMask(TorchSharp.torch.tensor(s.DocumentIds).unsqueeze(0));
        var expected = new bool[8, 8];
        for (int i = 0; i < 8; i++) for (int j = 0; j <= i; j++) expected[i, j] = true;
        foreach (int eod in new[] { 2, 4 })
            for (int i = eod + 1; i < 8; i++) for (int j = 0; j <= eod; j++) expected[i, j] = false;
        var actual = mask.squeeze(0).squeeze(0).data<bool>().ToArray();
        Assert.Equal(expected.Cast<bool>(), actual);
    }

    [Fact]
    public void Samples_AreSeededAndCoverTheStream()
    {
        using var ds = IndexedDataset.Open(Moe.Tests.TestPaths.Fixture("tokenizer-bpe-1k", "megatron_text_document"));
        var options = new SampleOptions(16, 2, true, true, true);
        var a = new GptDataset(ds, (0, ds.SequenceCount), 50, options, seed: 7);
        var b = new GptDataset(ds, (0, ds.SequenceCount), 50, options, seed: 7);
        var c = new GptDataset(ds, (0, ds.SequenceCount), 50, options, seed: 8);
        Assert.Equal(a.Sample(3).Tokens, b.Sample(3).Tokens);
        Assert.NotEqual(Enumerable.Range(0, 50).SelectMany(i => a.Sample(i).Tokens), Enumerable.Range(0, 50).SelectMany(i => c.Sample(i).Tokens));
    }
}
